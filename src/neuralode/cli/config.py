"""The run configuration: one immutable record, saved as ``config.json`` in the run directory.

A configuration is resolved in three layers, later ones winning: the task's defaults (which
depend on ``--quick``), a ``--config FILE`` (typically the ``config.json`` of an earlier run)
and the flags given on the command line. The resolved record is what is saved, so a run can be
repeated exactly with ``neuralode train --config RUN_DIR/config.json --out OTHER_DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CLIError

__all__ = ["RunConfig", "load_config_file", "read_run_config", "config_diff", "parse_set"]

CONFIG_NAME = "config.json"

#: Settings that may change when a run is resumed (more epochs; nothing that changes the model,
#: the data or the optimiser).
RESUMABLE_CHANGES = ("epochs",)

#: Step attempts allowed per solve. The models trained here take tens to hundreds of steps per
#: solve; one that needs far more (a tiny --step-size, tolerances the dtype cannot meet,
#: dynamics gone stiff in training) would keep every step for backpropagation until the
#: machine runs out of memory (``--method euler --step-size 1e-9`` on the spiral filled 21 GB):
#: it fails instead, saying where and with which step size.
MAX_STEPS_PER_SOLVE = 10_000

GRADIENTS = ("direct", "adjoint", "checkpoint")
DTYPES = ("float32", "float64")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a training run.

    Parameters
    ----------
    task : str
        ``"latent-ode"``, ``"ode-rnn"``, ``"odenet"`` or ``"spiral"``.
    data : str
        Dataset kind: ``"pbcseq"``, ``"physionet"``, ``"csv"`` (irregular series), ``"digits"``
        (odenet) or ``"spiral"`` (synthetic).
    data_path : str or None
        Folder (physionet) or file (csv), stored as an absolute path; ``None`` otherwise.
    epochs, batch_size : int
        Passes over the training data and samples per optimisation step (the global batch,
        split over the processes of a distributed run).
    lr : float
        Learning rate.
    optimizer : {"adam", "sgd"}
        Adam (default) or plain stochastic gradient descent.
    method : str
        Solver name (:func:`neuralode.solvers.available`).
    rtol, atol : float or None
        Tolerances of adaptive solvers (``None`` for fixed-step ones).
    step_size : float or None
        Step of fixed-step solvers, in the model's time unit (``None`` for adaptive ones).
    max_steps : int
        Step attempts allowed per solve (default ``MAX_STEPS_PER_SOLVE`` = 10,000); a solve that
        needs more fails training with the time and step size it reached.
    gradient : {"direct", "adjoint", "checkpoint"}
        How the solves are differentiated (``"adjoint"`` is the backsolve adjoint method).
    seed : int
        Seeds the data split, the initialisation and the shuffling generator.
    quick : bool
        Tiny settings that run in seconds (tests, smoke checks); the same code path.
    device : {"auto", "cpu", "cuda"}
        ``"auto"``: CUDA when available.
    dtype : {"float32", "float64"}
        Floating dtype of the model and the data.
    options : dict
        Task-specific settings (model sizes, splits, ...), see ``neuralode train TASK --help``;
        change them with ``--set KEY=VALUE``.
    """

    task: str
    data: str
    data_path: str | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    method: str = "dopri5"
    rtol: float | None = 1e-3
    atol: float | None = 1e-4
    step_size: float | None = None
    max_steps: int = MAX_STEPS_PER_SOLVE
    gradient: str = "direct"
    seed: int = 0
    quick: bool = False
    device: str = "auto"
    dtype: str = "float32"
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_int(self.epochs, "epochs", 1)
        _check_int(self.batch_size, "batch-size", 1)
        _check_int(self.seed, "seed", 0)
        _check_int(self.max_steps, "max-steps", 1)
        _check_float(self.lr, "lr")
        # The library's names are accepted too and stored in the CLI's spelling.
        aliases = {"backsolve": "adjoint", "checkpointed": "checkpoint"}
        if self.gradient in aliases:
            object.__setattr__(self, "gradient", aliases[self.gradient])
        if self.gradient not in GRADIENTS:
            raise CLIError(f"--gradient must be one of {list(GRADIENTS)}; got {self.gradient!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise CLIError(
                f"--optimizer must be one of {list(OPTIMIZERS)}; got {self.optimizer!r}."
            )
        if self.dtype not in DTYPES:
            raise CLIError(f"dtype must be one of {list(DTYPES)}; got {self.dtype!r}.")
        if self.device not in DEVICES:
            raise CLIError(f"--device must be one of {list(DEVICES)}; got {self.device!r}.")
        from neuralode.solvers import ADAPTIVE, available

        if self.method not in available():
            raise CLIError(f"unknown --method {self.method!r}; choose one of {list(available())}.")
        if self.method in ADAPTIVE:
            if self.step_size is not None:
                raise CLIError(
                    f"--step-size has no effect with the adaptive method {self.method!r}; use "
                    "--rtol/--atol, or a fixed-step method such as rk4."
                )
            if self.rtol is None or self.atol is None:
                raise CLIError(f"the adaptive method {self.method!r} needs --rtol and --atol.")
            _check_float(self.rtol, "rtol")
            _check_float(self.atol, "atol")
        else:
            if self.step_size is None:
                raise CLIError(
                    f"the fixed-step method {self.method!r} needs --step-size (e.g. 0.05)."
                )
            _check_float(self.step_size, "step-size")
        if not isinstance(self.options, dict):
            raise CLIError(f"options must be a JSON object; got {self.options!r}.")

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-ready dict of all fields."""
        d = dataclasses.asdict(self)
        d["options"] = dict(sorted(self.options.items()))
        return d

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``run_dir/config.json`` atomically; return its path."""
        path = Path(run_dir) / CONFIG_NAME
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> RunConfig:
        """Build from a dict as written by :meth:`to_dict`.

        Raises
        ------
        CLIError
            For unknown keys, missing ``task`` / ``data`` or values of the wrong type.
        """
        if not isinstance(d, dict):
            raise CLIError(f"{source}: expected a JSON object; got {type(d).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CLIError(f"{source}: unknown setting(s) {unknown}; known: {sorted(names)}.")
        for key in ("task", "data"):
            if key not in d:
                raise CLIError(f"{source}: missing setting {key!r}.")
        return cls(**d)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def solver_gradient(self) -> str:
        """The engine's name of the gradient method."""
        return {"direct": "direct", "adjoint": "backsolve", "checkpoint": "checkpoint"}[
            self.gradient
        ]

    def solver_kwargs(self) -> dict:
        """Keyword arguments of :func:`neuralode.solve` for this configuration."""
        kw: dict[str, Any] = {
            "solver": self.method,
            "gradient": self.solver_gradient,
            "max_steps": self.max_steps,
        }
        if self.step_size is not None:
            kw["dt"] = self.step_size
        else:
            kw.update(rtol=self.rtol, atol=self.atol)
        return kw


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CLIError(f"--{name} must be an integer >= {minimum}; got {value!r}.")


def _check_float(value, name: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise CLIError(f"--{name} must be a positive number; got {value!r}.")


def load_config_file(path: str | os.PathLike) -> dict:
    """Read a configuration JSON file (e.g. an earlier run's ``config.json``) as a dict."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_NAME
    if not p.is_file():
        raise CLIError(f"--config file not found: {p}")
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CLIError(f"--config {p}: not a valid JSON file ({exc}).") from None
    if not isinstance(d, dict):
        raise CLIError(f"--config {p}: expected a JSON object; got {type(d).__name__}.")
    return d


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    """The configuration saved in ``run_dir``.

    Raises
    ------
    CLIError
        If ``run_dir`` is not a run directory (no ``config.json``) or the file is invalid.
    """
    path = Path(run_dir) / CONFIG_NAME
    if not Path(run_dir).is_dir():
        raise CLIError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise CLIError(f"{run_dir} is not a neuralode run directory (no {CONFIG_NAME}).")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CLIError(f"{path}: not a valid JSON file ({exc}).") from None
    return RunConfig.from_dict(d, source=str(path))


def config_diff(old: RunConfig, new: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences ``key: old -> new`` (options flattened as ``options.key``)."""
    a, b = old.to_dict(), new.to_dict()
    oa, ob = a.pop("options"), b.pop("options")
    a.update({f"options.{k}": v for k, v in oa.items()})
    b.update({f"options.{k}": v for k, v in ob.items()})
    out = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        va, vb = a.get(key, "<unset>"), b.get(key, "<unset>")
        if va != vb:
            out.append(f"{key}: {va!r} -> {vb!r}")
    return out


def parse_set(items: list[str], known: dict, rules: dict | None = None) -> dict:
    """``["hidden=64", "classify=false"]`` -> ``{"hidden": 64, "classify": False}``.

    Values are read as JSON where possible (numbers, true/false, null, lists) and as strings
    otherwise; keys must be among ``known`` (the task's options). A value of another type than
    the default is refused unless the option's rule in ``rules`` (the task's
    ``option_rules``) allows it, e.g. ``obs_std="learned"`` besides numbers.
    """
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"--set expects KEY=VALUE; got {item!r}.")
        if key not in known:
            raise CLIError(f"--set: unknown option {key!r} for this task; known: {sorted(known)}.")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        default = known[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        # Numbers and flags must keep their type; str / None defaults also take numbers
        # (e.g. time_scale="max" or 14.0, obs_std="learned" or 0.3): the task validates them.
        allowed = rules is not None and key in rules and rules[key].ok(value)
        if (
            isinstance(default, (bool, int, float))
            and type(value) is not type(default)
            and not allowed
        ):
            raise CLIError(
                f"--set {key}: expected a value like {default!r} "
                f"({type(default).__name__}); got {text!r}."
            )
        out[key] = value
    return out
