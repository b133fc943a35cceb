"""What each ``--set KEY=VALUE`` option of ``neuralode train`` means: its unit and a description.

The options and their defaults are defined by the tasks (``Task.options`` and the ``--quick``
overrides in ``Task.quick``, see :mod:`neuralode.cli.tasks`); this table says what they mean.
The documentation's command-line page is generated from both at build time, and a test checks
that every option of every task is described here (and nothing else is), so a new option cannot
go undocumented.

``OPTION_HELP[key]`` is ``(unit, description)``; a key ``"TASK.key"`` overrides ``"key"`` for one
task where the same name means something different there.
"""

from __future__ import annotations

__all__ = ["OPTION_HELP", "option_help"]

#: ``--set`` option (or ``"TASK.option"``) -> ``(unit, description)``.
OPTION_HELP: dict[str, tuple[str, str]] = {
    # -- data and splits (all irregular-series tasks; odenet has its own fractions) ------------
    "val_fraction": (
        "fraction of subjects",
        "Share of the subjects held out for validation (picks ``best.pt``); "
        "``val_fraction + test_fraction < 1``.",
    ),
    "test_fraction": (
        "fraction of subjects",
        "Share of the subjects held out for the final evaluation.",
    ),
    "odenet.val_fraction": (
        "fraction of images",
        "Share of the training images held out for validation (picks ``best.pt``).",
    ),
    "odenet.test_fraction": (
        "fraction of images",
        "Share of the images held out (stratified) for the final evaluation; "
        "``val_fraction + test_fraction < 1``.",
    ),
    "time_scale": (
        "data time units",
        'Times are divided by this before the ODE sees them: ``"max"`` divides by the longest '
        "training follow-up (so training times span [0, 1]); a positive number divides by it "
        "(e.g. ``48`` for 48-hour ICU stays; ``1``: unchanged).",
    ),
    "max_subjects": (
        "subjects",
        "Use only the first N subjects with at least one observation (``0``: all of them).",
    ),
    "classify": (
        "flag",
        "Train a classification head on the final state when the data has 0/1 labels of both "
        "classes (PhysioNet in-hospital mortality, a CSV ``label_col``); reports its AUROC.",
    ),
    "n_samples": (
        "samples",
        "Latent trajectories drawn per subject when evaluating the latent ODE (validation uses "
        "a quarter of them, at least 2); the ODE-RNN is deterministic and ignores it.",
    ),
    "id_col": ("CSV column", "Column of the subject identifier."),
    "time_col": (
        "CSV column",
        "Column of the observation time, in the data's own unit.",
    ),
    "time_unit": (
        "name, or ``null``",
        "The unit of the CSV's time column (e.g. ``days``), for axis labels, reports and "
        ':attr:`~neuralode.TrainedRun.time_unit`; ``null``: "unspecified".',
    ),
    "variable_col": ("CSV column", "Column naming the measured channel."),
    "value_col": ("CSV column", "Column of the measured value."),
    "label_col": (
        "CSV column or ``null``",
        "Column of a per-subject 0/1 label for the classification head; ``null``: no label.",
    ),
    "physionet_sets": (
        "comma-separated names",
        "Which PhysioNet 2012 sets to read from the data folder, e.g. ``set-a`` or "
        "``set-a,set-b``.",
    ),
    # -- model sizes ---------------------------------------------------------------------------
    "latent_dim": ("dimensions", "Size of the latent state ``z`` of the latent ODE."),
    "rec_hidden": ("units", "Hidden size of the ODE-RNN encoder (GRU state)."),
    "ode_hidden": (
        "units",
        "Width of the MLP vector fields (two linear layers with tanh) of the encoder and the "
        "latent dynamics.",
    ),
    "ode-rnn.ode_hidden": (
        "units",
        "Width of the MLP vector field that evolves the hidden state between observations.",
    ),
    "decoder_hidden": (
        "units",
        "Hidden width of the observation model from ``z`` to the channels; ``0``: a linear map "
        "(as in Rubanova et al. 2019).",
    ),
    "hidden": ("units", "Hidden size of the ODE-RNN (GRU state and the ODE's state)."),
    "spiral.hidden": ("units", "Hidden width of the MLP vector field ``f(y) = MLP(y^3)``."),
    "width": (
        "channels",
        "Channels of the ODE block (``field=conv``), or width of its state (``field=mlp``).",
    ),
    "field": (
        "``conv`` or ``mlp``",
        "Vector field of the ODE block: a convolutional one on the downsampled image, or a "
        "time-dependent MLP on a linear embedding of the flattened image.",
    ),
    # -- likelihood and loss ---------------------------------------------------------------------
    "obs_std": (
        'normalised data units, or ``"learned"``',
        "Observation noise of the latent ODE's Gaussian likelihood: a fixed positive number, or "
        '``"learned"`` for one learned value per channel.',
    ),
    "train_samples": (
        "samples",
        "Latent trajectories drawn per subject for the training ELBO (more than 1: the IWAE "
        "bound).",
    ),
    "kl_warmup": (
        "optimisation steps",
        "The KL term's weight rises linearly from ``1/kl_warmup`` to 1 over this many steps.",
    ),
    "bce_weight": (
        "weight",
        "Weight of the classification head's binary cross-entropy in the loss (with ``classify``).",
    ),
    "lr_decay": (
        "factor per epoch",
        "The learning rate is multiplied by this after each epoch (``1``: constant).",
    ),
    # -- odenet ------------------------------------------------------------------------------------
    "max_train": (
        "images",
        "Use only the first N training images (``0``: all of them).",
    ),
    "shift": (
        "pixels",
        "Data augmentation: translate each training image by a random offset in "
        "``[-shift, shift]`` in each direction, zero-filled (``0``: none).",
    ),
    # -- cnf ---------------------------------------------------------------------------------------
    "cnf.hidden": ("units", "Width of the hidden layers of the MLP vector field (softplus)."),
    "n_layers": (
        "layers",
        "Linear layers of the CNF's MLP vector field (``n_layers - 1`` hidden layers).",
    ),
    "trace": (
        "``auto``, ``exact`` or ``hutchinson``",
        "How the divergence ``tr(df/dz)`` is computed during training: exactly (``d`` "
        "vector-Jacobian products per evaluation) or by Hutchinson's estimator (FFJORD); "
        "``auto``: exact up to 8 dimensions. Held-out log-likelihoods always use the exact trace.",
    ),
    "noise": (
        "``rademacher`` or ``gaussian``",
        "Distribution of the noise vector of Hutchinson's estimator (with ``trace=hutchinson``).",
    ),
    "kinetic": (
        "weight",
        "Weight of the RNODE kinetic-energy regulariser ``int ||f||^2 dt`` in the loss "
        "(``0``: off).",
    ),
    "acceleration": (
        "weight",
        "Weight of TayNODE's second-order regulariser ``int ||d^2 z/dt^2||^2 dt`` (Kelly et al. "
        "2020) in the loss (``0``: off).",
    ),
    "jacobian": (
        "weight",
        "Weight of the RNODE Jacobian Frobenius-norm regulariser ``int ||df/dz||_F^2 dt`` in "
        "the loss (``0``: off).",
    ),
    "t1": (
        "flow time",
        "End time of the flow: the base density lives at 0, the data at ``t1``.",
    ),
    "cnf.val_fraction": (
        "fraction of samples",
        "Share of the data held out for validation (picks ``best.pt``); "
        "``val_fraction + test_fraction < 1``.",
    ),
    "cnf.test_fraction": (
        "fraction of samples",
        "Share of the data held out for the final evaluation (held-out NLL).",
    ),
    "cnf.max_train": ("samples", "Use only the first N training samples (``0``: all of them)."),
    "n_toy": (
        "samples",
        "Points drawn from a toy density (``8gaussians``, ``moons``, ``checkerboard``) before "
        "the split; at least 50.",
    ),
    # -- spiral ------------------------------------------------------------------------------------
    "window": (
        "samples",
        "Length of the windows of consecutive samples fitted per step (each integrated from its "
        "first noisy sample).",
    ),
    "steps_per_epoch": ("optimisation steps", "Batches of random windows per epoch."),
    "noise_std": (
        "state units",
        "Standard deviation of the Gaussian noise added to the spiral's samples.",
    ),
}


def option_help(task: str, key: str) -> tuple[str, str]:
    """``(unit, description)`` of the ``--set`` option ``key`` of ``task``.

    Raises
    ------
    KeyError
        If the option is not described in :data:`OPTION_HELP`.
    """
    found = OPTION_HELP.get(f"{task}.{key}") or OPTION_HELP.get(key)
    if found is None:
        raise KeyError(
            f"--set option {key!r} of task {task!r} is not described in "
            "neuralode.cli.option_help.OPTION_HELP; add its unit and description there."
        )
    return found
