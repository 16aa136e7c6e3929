"""For development only: the Powens-compatible sandbox server (``sandbox``, ``sandbox_push``) and the
demo (``demo``, ``demo_push``). Nothing of production imports it: the shell's ``sandbox serve`` and
``demo`` commands load it when they run (enforced by ``[tool.structure]`` in pyproject.toml).
"""
