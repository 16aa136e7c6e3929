"""For development, the demo and the benchmark only: the Powens sandbox and the demo."""
