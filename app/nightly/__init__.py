"""The nightly run: planning, fan-out in batches of whole Powens users, sweeping."""
