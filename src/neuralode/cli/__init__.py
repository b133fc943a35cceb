"""The ``neuralode`` command: train, evaluate and plot neural ODE models on real data.

``neuralode train TASK ...`` writes a run directory (resolved configuration, per-epoch
metrics, atomic checkpoints with RNG states, the best model, plots and an evaluation summary);
``neuralode evaluate RUN_DIR`` and ``neuralode plot RUN_DIR`` work on a finished or interrupted
run; :func:`neuralode.load_run` opens a run directory from Python (the trained model, its
configuration and normaliser). Entry point: :func:`neuralode.cli.main.main`.
"""

from .errors import CLIError

__all__ = ["CLIError"]
