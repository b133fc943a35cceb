"""Shared pieces of the models: solver settings, NFE accounting and simple vector fields.

Everything here sits on the public API (:func:`neuralode.solve`, :mod:`neuralode.solvers`,
:mod:`neuralode.gradients`, :mod:`neuralode.controllers`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

import neuralode
from neuralode.controllers import Controller
from neuralode.gradients import Direct, get_gradient
from neuralode.solvers import get_tableau

__all__ = [
    "CountsNFE",
    "SolverSettings",
    "NFECounter",
    "MLPVectorField",
    "StepRecord",
    "recording_steps",
    "solve_tracked",
]

# Model defaults, looser than solve()'s (1e-6 / 1e-8): the vector field is a network fitted to
# noisy data, so integrating it far below the data's noise buys nothing (Chen et al. 2018 train
# ODE-Nets at 1e-3; Rubanova et al. 2019 at rtol 1e-3, atol 1e-4).
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4


@dataclass(frozen=True)
class SolverSettings:
    """How a model integrates its vector field: solver, step control and gradient method.

    Parameters
    ----------
    solver : str or ButcherTableau, default "dopri5"
        Method name (see :mod:`neuralode.solvers`) or a tableau.
    rtol, atol : float, optional
        Tolerances of the adaptive step-size control. Default 1e-3 and 1e-4 for adaptive
        solvers (not allowed together with ``dt`` or ``controller``).
    dt : float, optional
        Fixed step size, in the model's time units (required for fixed-step solvers unless a
        ``controller`` is given).
    controller : Controller, optional
        A step-size controller object (:class:`~neuralode.PIController`,
        :class:`~neuralode.ConstantStep`, :class:`~neuralode.StepToGrid`).
    gradient : str or gradient method, default "direct"
        ``"direct"``, ``"backsolve"`` / ``"adjoint"``, ``"checkpoint"`` or a
        :class:`~neuralode.Direct`, :class:`~neuralode.Backsolve`,
        :class:`~neuralode.Checkpointed` instance.
    max_steps : int, optional
        Step limit of each solve (default: none).

    Raises
    ------
    ValueError
        For an unknown solver or gradient name, a non-positive tolerance or step, ``dt``
        together with ``rtol``/``atol``, a fixed-step solver without ``dt``, or tolerances next
        to a ``controller``.
    TypeError
        For arguments of the wrong type.
    """

    solver: object = "dopri5"
    rtol: float | None = None
    atol: float | None = None
    dt: float | None = None
    controller: Controller | None = None
    gradient: object = "direct"
    max_steps: int | None = None

    def __post_init__(self) -> None:
        tab = get_tableau(self.solver)
        object.__setattr__(self, "gradient", get_gradient(self.gradient))
        for name in ("rtol", "atol", "dt"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a float or None, got {type(v).__name__}")
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if self.controller is not None:
            if not isinstance(self.controller, Controller):
                raise TypeError(
                    "controller must be a Controller (PIController, ConstantStep, StepToGrid or a "
                    "subclass of neuralode.controllers.Controller), got "
                    f"{type(self.controller).__name__}"
                )
            given = [n for n in ("rtol", "atol", "dt") if getattr(self, n) is not None]
            if given:
                raise ValueError(
                    f"pass {', '.join(given)} inside the controller, not next to it "
                    "(e.g. PIController(rtol=..., atol=...) or ConstantStep(dt))"
                )
        elif self.dt is not None:
            if self.rtol is not None or self.atol is not None:
                raise ValueError(
                    "rtol/atol have no effect with a fixed step dt; pass either dt or rtol/atol"
                )
        elif not tab.adaptive:
            raise ValueError(
                f"solver {tab.name!r} is a fixed-step method: pass dt=... (or an adaptive "
                "solver such as 'dopri5')"
            )
        else:
            object.__setattr__(self, "rtol", DEFAULT_RTOL if self.rtol is None else self.rtol)
            object.__setattr__(self, "atol", DEFAULT_ATOL if self.atol is None else self.atol)
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
        ):
            raise TypeError(f"max_steps must be an int or None, got {self.max_steps!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")

    def solve_kwargs(self) -> dict:
        """Keyword arguments for :func:`neuralode.solve`."""
        kw = dict(solver=self.solver, gradient=self.gradient, max_steps=self.max_steps)
        if self.controller is not None:
            kw["controller"] = self.controller
        elif self.dt is not None:
            kw["dt"] = self.dt
        else:
            kw.update(rtol=self.rtol, atol=self.atol)
        return kw


class NFECounter:
    """Counts evaluations of the vector field over the solves of one model call.

    ``forward`` sums ``stats["nfe"]`` of the recorded solves. ``backward`` sums
    ``stats["nfe_backward"]`` (filled in by the backsolve and checkpointed gradient methods
    during ``loss.backward()``); for :class:`~neuralode.Direct`, which leaves that entry
    empty, it counts the vector-Jacobian products autograd computes through the vector field's
    outputs (one tensor hook per evaluation).
    """

    def __init__(self) -> None:
        self._stats: list[dict] = []
        self._vjps = [0]

    def reset(self) -> None:
        """Start a new call: forget the solves recorded so far."""
        self._stats = []
        self._vjps = [0]

    def record(self, stats: dict) -> None:
        """Keep a reference to a solve's (shared, later updated) stats dict."""
        self._stats.append(stats)

    def hooked(self, func):
        """``func`` wrapped so that autograd's pass through each output is counted."""
        box = self._vjps

        def tick(_grad):
            box[0] += 1

        def counted(t, y):
            out = func(t, y)
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(tick)
            return out

        return counted

    @property
    def n_solves(self) -> int:
        """Number of solves recorded since the last :meth:`reset`."""
        return len(self._stats)

    @property
    def forward(self) -> int:
        return int(sum(s.get("nfe", 0) for s in self._stats))

    @property
    def backward(self) -> int | None:
        if not self._stats:
            return None
        engine = [s["nfe_backward"] for s in self._stats if "nfe_backward" in s]
        if not engine and self._vjps[0] == 0:
            return None  # no backward pass yet
        return int(sum(engine)) + self._vjps[0]


class CountsNFE:
    """Mixin for models whose solves are recorded in ``self._counter`` (an :class:`NFECounter`)."""

    _counter: NFECounter

    @property
    def nfe_forward(self) -> int | None:
        """Evaluations of the vector field in the last forward pass (None before any)."""
        return self._counter.forward if self._counter.n_solves else None

    @property
    def nfe_backward(self) -> int | None:
        """Evaluations in the backward pass through the last forward pass (None before it)."""
        return self._counter.backward


class StepRecord:
    """Accepted / rejected steps and integrated time spans of the solves made by the models
    inside a :func:`recording_steps` block (forward solves)."""

    def __init__(self) -> None:
        self.n_solves = 0
        self.n_accepted = 0.0
        self.n_rejected = 0.0
        self.span = 0.0

    def add(self, stats: dict, t: torch.Tensor) -> None:
        """Count one solve over the output times ``t``: ``(T,)``, or ``(B, T)`` per sample (then
        step counts and spans are averages over the samples)."""
        tt = torch.as_tensor(t).detach()
        self.n_solves += 1
        self.n_accepted += _mean(stats.get("n_accepted", 0))
        self.n_rejected += _mean(stats.get("n_rejected", 0))
        self.span += float((tt[..., -1] - tt[..., 0]).abs().double().mean()) if tt.numel() else 0.0

    @property
    def mean_step(self) -> float | None:
        """Average accepted step size (time integrated per accepted step); ``None`` without steps."""
        return self.span / self.n_accepted if self.n_accepted else None


def _mean(x) -> float:
    return float(torch.as_tensor(x, dtype=torch.float64).mean())


_STEP_RECORDS: list[StepRecord] = []


@contextmanager
def recording_steps():
    """Record the step counts of every :func:`solve_tracked` solve inside the block.

    Yields
    ------
    StepRecord
        Filled in as the models solve (costs one host read per solve; nothing outside a block).
    """
    record = StepRecord()
    _STEP_RECORDS.append(record)
    try:
        yield record
    finally:
        _STEP_RECORDS.remove(record)


def solve_tracked(settings: SolverSettings, counter: NFECounter, func, y0, t):
    """``neuralode.solve(func, y0, t, **settings)``: the trajectory ``ys``, NFE recorded."""
    f = func
    # Workaround: the Direct gradient method leaves stats["nfe_backward"] unset (the Solution
    # docstring promises it after a backward pass), so count the VJPs with tensor hooks here.
    if isinstance(settings.gradient, Direct) and torch.is_grad_enabled():
        f = counter.hooked(func)
    sol = neuralode.solve(f, y0, t, **settings.solve_kwargs())
    counter.record(sol.stats)
    for record in _STEP_RECORDS:
        record.add(sol.stats, t)
    return sol.ys


_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "elu": nn.ELU}


def check_positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class MLPVectorField(nn.Module):
    """A multilayer perceptron vector field ``f(t, y)`` on states of shape ``(..., dim)``.

    Parameters
    ----------
    dim : int
        State dimension (last axis of ``y``).
    hidden : int, default 64
        Width of the hidden layers.
    n_layers : int, default 2
        Number of linear layers (>= 1; ``n_layers - 1`` hidden layers).
    activation : {"tanh", "relu", "softplus", "elu"}, default "tanh"
        Nonlinearity between the layers (tanh as in Rubanova et al. 2019).
    time_dependent : bool, default False
        Concatenate ``t`` to the input of every layer (Chen et al. 2018's ``ConcatLinear``).
        With False the field is autonomous: ``t`` is accepted and ignored.

    Raises
    ------
    ValueError
        For non-positive sizes or an unknown activation.

    References
    ----------
    Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations", NeurIPS
    2018 (MLP vector fields with time concatenation). Rubanova, Chen, Duvenaud, "Latent ODEs for
    Irregularly-Sampled Time Series", NeurIPS 2019 (autonomous tanh MLP fields).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 64,
        n_layers: int = 2,
        activation: str = "tanh",
        time_dependent: bool = False,
    ) -> None:
        super().__init__()
        check_positive_int(dim, "dim")
        check_positive_int(hidden, "hidden")
        check_positive_int(n_layers, "n_layers")
        self.dim = dim
        self.time_dependent = bool(time_dependent)
        extra = 1 if self.time_dependent else 0
        sizes = [dim] + [hidden] * (n_layers - 1) + [dim]
        self.layers = nn.ModuleList(nn.Linear(a + extra, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = _ACTIVATIONS[activation]() if activation in _ACTIVATIONS else None
        if self.act is None:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}"
            )

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``dy/dt`` with the shape and dtype of ``y`` (``(..., dim)``)."""
        h = y
        tt = None
        if self.time_dependent:
            tt = torch.as_tensor(t, dtype=y.dtype, device=y.device)
            if tt.dim() == 1 and y.dim() > 1:  # per-sample times (batch_control="per_sample")
                tt = tt.reshape(-1, *([1] * (y.dim() - 1)))
            tt = tt.expand(*y.shape[:-1], 1)
        for i, layer in enumerate(self.layers):
            if tt is not None:
                h = torch.cat([h, tt], dim=-1)
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h
