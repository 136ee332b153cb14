"""The machinery around a training run, not the method: its files and identity,
logging, preemption, the non-finite guard, the MLPerf log, export and the
running sums. Nothing here imports from the method (``conadv/``) above it."""
