"""Continuous normalising flows (FFJORD) with RNODE regularisation, on the public API.

A CNF transports a base density ``p0`` at time ``t0`` to the data density at ``t1`` along the
ODE ``dz/dt = f(t, z)``. The log-density follows the instantaneous change of variables
(Chen et al. 2018) ``d log p(z(t)) / dt = -tr(df/dz)``, so for data ``x = z(t1)``::

    log p(x) = log p0(z(t0)) - int_{t0}^{t1} tr(df/dz)(t, z(t)) dt,

computed by one solve of the augmented state ``(z, Delta)`` from ``t1`` back to ``t0`` with
``dDelta/dt = -tr(df/dz)`` (``Delta(t0)`` is the integral above). The RNODE regularisers are two
more components of the same solve, computed from the same evaluation of ``f`` and the same
vector-Jacobian product (Hutchinson) or Jacobian rows (exact) as the trace.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

import neuralode
from neuralode.regularizers import jacobian_terms, kinetic_energy, sample_noise, total_derivative

from .base import CountsNFE, NFECounter, SolverSettings

__all__ = ["CNF", "CNFLoss"]

_REGULARIZERS = ("kinetic", "jacobian", "acceleration")


@dataclass
class CNFLoss:
    """What :meth:`CNF.loss` returns.

    Attributes
    ----------
    loss : Tensor
        0-d: the mean negative log-likelihood plus the weighted mean regularisers (minimise it).
    nll : Tensor
        0-d: the mean negative log-likelihood in nats (attached to the graph).
    regularizers : dict of str to Tensor
        0-d mean of each regulariser integral (``"kinetic"``, ``"jacobian"``,
        ``"acceleration"``), unweighted.
    nfe : int
        Evaluations of the vector field in the forward solve.
    """

    loss: torch.Tensor
    nll: torch.Tensor
    regularizers: dict
    nfe: int


class _Dynamics(nn.Module):
    """``(f, -tr J, -||f||^2, -||J||_F^2, -||d^2z/dt^2||^2)`` on the state ``(z, Delta, ...)``
    (the regularisers that are on), for a solve that runs from t1 back to t0 (the negative
    signs make the regulariser integrals positive there). An ``nn.Module`` owning the field, so
    that Backsolve/Checkpointed find its parameters; the Hutchinson noise is fixed for the
    solve."""

    def __init__(self, field, estimator: str, e, regs: tuple, tick=None):
        super().__init__()
        self.field, self.estimator, self.e = field, estimator, e
        self.kinetic, self.jacobian, self.acceleration = (k in regs for k in _REGULARIZERS)
        self.tick = tick  # counts autograd's passes through each evaluation (Direct's backward)

    def forward(self, t, state):
        z = state[0]
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            zz = z if z.requires_grad else z.detach().requires_grad_()
            tt = t
            if self.acceleration:
                # df/dt enters the acceleration, so t must be in the graph. Not as a new leaf
                # (gradient methods would take it for a parameter they miss): through a path
                # from z with weight 0, which adds exactly nothing to derivatives w.r.t. z.
                tt = t.detach() + (zz.reshape(-1)[0] * 0).to(t.dtype)
            dz = self.field(tt, zz)
            if not isinstance(dz, torch.Tensor) or dz.shape != zz.shape:
                got = tuple(dz.shape) if isinstance(dz, torch.Tensor) else type(dz).__name__
                raise ValueError(
                    f"the CNF's field must return dz/dt of the state's shape {tuple(zz.shape)}, "
                    f"got {got}"
                )
            div, frob = jacobian_terms(
                dz,
                zz,
                estimator=self.estimator,
                e=self.e,
                frobenius=self.jacobian,
                create_graph=create,
            )
            acc = None
            if self.acceleration:
                acc = total_derivative(dz, zz, tt, create_graph=create).square().sum(1)
        out = [dz if create else dz.detach(), -div if create else -div.detach()]
        if self.tick is not None and create:
            # An alias of dz that only the solver uses: its gradient hook fires once per
            # evaluation in the backward pass (not in the trace's own vector-Jacobian products).
            out[0] = dz.view_as(dz)
            out[0].register_hook(self.tick)
        if self.kinetic:
            out.append(-kinetic_energy(out[0]))
        if self.jacobian:
            out.append(-frob if create else -frob.detach())
        if self.acceleration:
            out.append(-acc if create else -acc.detach())
        return tuple(out)


class CNF(CountsNFE, nn.Module):
    """A continuous normalising flow (FFJORD) with optional RNODE regularisers.

    Parameters
    ----------
    field : nn.Module or callable
        The vector field ``field(t, z) -> dz/dt`` on batches ``z: (B, d)``; ``t`` is a 0-d
        tensor. Samples must not interact (the trace is taken per sample). An ``nn.Module``
        (e.g. :class:`~neuralode.models.MLPVectorField` with ``time_dependent=True``) so that its
        parameters are trained.
    trace : {"exact", "hutchinson"}, default "exact"
        The divergence ``tr(df/dz)``: exact (``d`` vector-Jacobian products per evaluation; for
        small ``d``) or Hutchinson's unbiased estimate ``e^T (df/dz) e`` with one noise draw per
        solve, fixed during it (FFJORD).
    noise : {"rademacher", "gaussian"}, default "rademacher"
        Distribution of Hutchinson's noise.
    t0, t1 : float, default 0.0, 1.0
        The base density lives at ``t0``, the data at ``t1`` (FFJORD's convention; ``t0 != t1``).
    base : torch.distributions.Distribution, optional
        Base density with ``log_prob(z) -> (B,)`` and ``sample((n,)) -> (n, d)``. Default: the
        standard normal in ``d`` dimensions.
    regularizers : mapping of str to float, optional
        RNODE weights, e.g. ``{"kinetic": 0.01, "jacobian": 0.01}``: ``"kinetic"`` integrates
        ``||f||^2`` and ``"jacobian"`` ``||df/dz||_F^2`` (exact with ``trace="exact"``, else
        ``||e^T df/dz||^2`` with the trace's noise) along the trajectories, ``"acceleration"``
        integrates ``||d^2 z/dt^2||^2 = ||df/dt + (df/dz) f||^2`` (TayNODE's second-order
        term, Kelly et al. 2020; two more reverse passes per evaluation); :meth:`loss` adds
        ``weight * mean(integral)``. Default: none.
    dim : int, optional
        Data dimension, for :meth:`sample` (default: ``base.event_shape`` or ``field.dim``).
    regularizers_in_error_norm : bool, default False
        Whether the regulariser integrals take part in step-size control. By default they are
        left out (they do not feed back into the dynamics; their local errors would only
        shorten steps), so the regularised solve takes the steps of the unregularised one.
        With adaptive tolerances given as numbers (``rtol``/``atol`` or a ``PIController``).
    solver, rtol, atol, dt, controller, gradient, max_steps
        How the flow is integrated (:class:`~neuralode.models.SolverSettings`); the default
        tolerances are FFJORD's, ``rtol = atol = 1e-5``.

    Raises
    ------
    ValueError, TypeError
        For an unknown trace/noise/regulariser name, a negative weight, ``t0 == t1``, or invalid
        solver settings.

    Notes
    -----
    The regularisers change the trained field, not the log-density: :meth:`log_prob` is exact
    (up to the solver tolerance and, with Hutchinson, the estimator's noise, which averages out
    over a batch). ``nfe_forward`` / ``nfe_backward`` (from :class:`CountsNFE`) give the NFE of
    the last call; with ``gradient="direct"`` ``nfe_backward`` counts autograd's vector-Jacobian products through
    the recorded evaluations (one per evaluation that the result depends on).

    References
    ----------
    Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations", NeurIPS
    2018 (instantaneous change of variables). Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud,
    "FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models", ICLR 2019
    (Hutchinson's trace estimator, data at t1, tolerances 1e-5). Finlay, Jacobsen, Nurbekyan,
    Oberman, "How to train your neural ODE: the world of Jacobian and kinetic regularization",
    ICML 2020 (RNODE). Kelly, Bettencourt, Johnson, Duvenaud, "Learning Differential Equations
    that are Easy to Solve", NeurIPS 2020 (TayNODE).

    Examples
    --------
    >>> import torch
    >>> from neuralode.models import CNF, MLPVectorField
    >>> flow = CNF(MLPVectorField(2, hidden=16, time_dependent=True), regularizers={"kinetic": 0.1})
    >>> out = flow.loss(torch.randn(8, 2))
    >>> out.loss.backward()
    >>> flow.sample(5).shape
    torch.Size([5, 2])
    """

    def __init__(
        self,
        field,
        *,
        trace: str = "exact",
        noise: str = "rademacher",
        t0: float = 0.0,
        t1: float = 1.0,
        base=None,
        regularizers: Mapping | None = None,
        dim: int | None = None,
        regularizers_in_error_norm: bool = False,
        solver="dopri5",
        rtol: float | None = None,
        atol: float | None = None,
        dt: float | None = None,
        controller=None,
        gradient="direct",
        max_steps: int | None = None,
    ) -> None:
        super().__init__()
        if not callable(field):
            raise TypeError(f"field must be callable as field(t, z), got {type(field).__name__}")
        if trace not in ("exact", "hutchinson"):
            raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")
        t0, t1 = float(t0), float(t1)
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
            raise ValueError(f"t0 and t1 must be finite and different, got t0={t0}, t1={t1}")
        weights = dict(regularizers or {})
        for name, w in weights.items():
            if name not in _REGULARIZERS:
                raise ValueError(
                    f"unknown regulariser {name!r}; choose from {_REGULARIZERS} "
                    "(e.g. regularizers={'kinetic': 0.01, 'jacobian': 0.01})"
                )
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise ValueError(f"regularizers[{name!r}] must be a number >= 0, got {w!r}")
        if base is not None and not (hasattr(base, "log_prob") and hasattr(base, "sample")):
            raise TypeError(
                "base must be a torch.distributions.Distribution (log_prob and sample), got "
                f"{type(base).__name__}"
            )
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if (
            controller is None
            and dt is None
            and rtol is None
            and atol is None
            and neuralode.solvers.get_tableau(solver).adaptive
        ):
            rtol = atol = 1e-5
        self.settings = SolverSettings(
            solver=solver,
            rtol=rtol,
            atol=atol,
            dt=dt,
            controller=controller,
            gradient=gradient,
            max_steps=max_steps,
        )
        self.field = field
        self.trace, self.noise, self.t0, self.t1 = trace, noise, t0, t1
        self.base = base
        self.weights = {k: float(v) for k, v in weights.items()}
        self.dim = dim
        if not isinstance(regularizers_in_error_norm, bool):
            raise TypeError(
                f"regularizers_in_error_norm must be a bool, got {regularizers_in_error_norm!r}"
            )
        self.regularizers_in_error_norm = regularizers_in_error_norm
        self._counter = NFECounter()

    # -- densities -------------------------------------------------------------------------
    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """``log p0(z)`` per sample, ``(B,)``."""
        if self.base is None:
            return -0.5 * (z.square().sum(1) + z.shape[1] * math.log(2 * math.pi))
        out = self.base.log_prob(z)
        if out.shape != z.shape[:1]:
            raise ValueError(
                f"base.log_prob(z) must return one value per sample, shape {tuple(z.shape[:1])}, "
                f"got {tuple(out.shape)} (wrap a Normal in torch.distributions.Independent)"
            )
        return out

    def log_prob_and_regularizers(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``log p(x)`` per sample and the regulariser integrals along x's trajectories.

        Parameters
        ----------
        x : Tensor (B, d)
            Data (floating point, the field's dtype).

        Returns
        -------
        (Tensor (B,), dict of str to Tensor (B,))
            Log-density in nats, and ``int ||f||^2 dt`` / ``int ||df/dz||_F^2 dt`` per sample
            for the regularisers with a weight.

        Raises
        ------
        ValueError
            If ``x`` is not ``(B, d)`` floating point.
        """
        self._check_x(x)
        regs_on = tuple(k for k in _REGULARIZERS if k in self.weights)
        e = sample_noise(x, self.noise) if self.trace == "hutchinson" else None
        self._counter.reset()
        tick = None
        if isinstance(self.settings.gradient, neuralode.Direct) and torch.is_grad_enabled():
            box = self._counter._vjps  # NFECounter's count of vector-Jacobian products

            def tick(_grad):
                box[0] += 1

        dyn = _Dynamics(self.field, self.trace, e, regs_on, tick)
        zero = x.new_zeros(x.shape[0])
        state = (x, zero) + (zero,) * len(regs_on)
        t = torch.tensor([self.t1, self.t0], dtype=torch.float64)
        kw = self._solve_kwargs(len(state) - 2, x.dtype)
        sol = neuralode.solve(dyn, state, t, **kw)
        self._counter.record(sol.stats)
        z0, delta = sol.ys[0][-1], sol.ys[1][-1]
        # _Dynamics integrates -r from t1 to t0, which is +int r dt only for t1 > t0: the
        # regularisers are integrals over the interval, positive whichever way time runs.
        sign = 1.0 if self.t1 > self.t0 else -1.0
        regs = {name: sign * sol.ys[2 + i][-1] for i, name in enumerate(regs_on)}
        return self.base_log_prob(z0) - delta, regs

    def _solve_kwargs(self, n_reg: int, dtype: torch.dtype) -> dict:
        """Solver options for the state ``(z, Delta, regularisers...)``.

        The regulariser integrals are not fed back into the dynamics and only their gradient
        matters, so by default they are left out of step-size control (``rtol = 0`` and an
        absolute tolerance at the dtype's largest number make their scaled error zero; the
        mixed norm then takes the maximum over ``z`` and ``Delta`` only): the steps are those of
        the unregularised log-density solve, and the regularisers do not cost steps of their own.
        """
        kw = self.settings.solve_kwargs()
        if not n_reg or self.regularizers_in_error_norm:
            return kw
        big = torch.finfo(dtype).max
        ctrl = kw.get("controller")
        if "rtol" in kw:
            kw["rtol"] = (kw["rtol"],) * 2 + (0.0,) * n_reg
            kw["atol"] = (kw["atol"],) * 2 + (big,) * n_reg
        elif isinstance(ctrl, neuralode.PIController) and all(
            isinstance(v, (int, float)) for v in (ctrl.rtol, ctrl.atol)
        ):
            kw["controller"] = dataclasses.replace(
                ctrl,
                rtol=(ctrl.rtol,) * 2 + (0.0,) * n_reg,
                atol=(ctrl.atol,) * 2 + (big,) * n_reg,
            )
        return kw

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` in nats per sample, ``(B,)`` (see :meth:`log_prob_and_regularizers`)."""
        return self.log_prob_and_regularizers(x)[0]

    def loss(self, x: torch.Tensor) -> CNFLoss:
        """Mean negative log-likelihood of ``x`` (B, d) plus the weighted regularisers.

        Returns
        -------
        CNFLoss
            ``loss`` to minimise, ``nll``, the unweighted mean regularisers and the forward NFE.
        """
        logp, regs = self.log_prob_and_regularizers(x)
        nll = -logp.mean()
        means = {k: v.mean() for k, v in regs.items()}
        total = nll
        for k, v in means.items():
            total = total + self.weights[k] * v
        return CNFLoss(loss=total, nll=nll, regularizers=means, nfe=int(self.nfe_forward or 0))

    # -- sampling and trajectories ---------------------------------------------------------
    def _dim_and_dtype(self) -> tuple[int, torch.dtype, torch.device]:
        d = self.dim
        if d is None and self.base is not None and len(getattr(self.base, "event_shape", ())):
            d = int(self.base.event_shape[0])
        if d is None:
            d = getattr(self.field, "dim", None)
        if d is None:
            raise ValueError(
                "the CNF does not know its dimension: pass CNF(..., dim=d) (or a base with an "
                "event_shape, or a field with a .dim attribute)"
            )
        p = next(iter(self.parameters()), None)
        return (
            d,
            (p.dtype if p is not None else torch.get_default_dtype()),
            (p.device if p is not None else torch.device("cpu")),
        )

    def sample_base(self, n: int) -> torch.Tensor:
        """``n`` draws from the base density, ``(n, d)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        d, dtype, device = self._dim_and_dtype()
        if self.base is None:
            return torch.randn(n, d, dtype=dtype, device=device)
        return self.base.sample((n,)).to(dtype)

    def flow(self, z: torch.Tensor, t) -> torch.Tensor:
        """The states of the flow from ``z`` at ``t[0]`` at the times ``t`` (T,): ``(T, B, d)``.

        ``flow(z0, [t0, ..., t1])`` pushes base points to data space (the trajectories);
        ``flow(x, [t1, t0])`` maps data back to the base.
        """
        self._check_x(z, "z")
        t = torch.as_tensor(t, dtype=torch.float64)
        self._counter.reset()
        sol = neuralode.solve(self.field, z, t, **self.settings.solve_kwargs())
        self._counter.record(sol.stats)
        return sol.ys

    def sample(self, n: int) -> torch.Tensor:
        """``n`` samples of the learned density, ``(n, d)``: base draws pushed from t0 to t1."""
        return self.flow(self.sample_base(n), [self.t0, self.t1])[-1]

    @staticmethod
    def _check_x(x, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            got = (
                f"shape {tuple(x.shape)}, dtype {x.dtype}"
                if isinstance(x, torch.Tensor)
                else type(x).__name__
            )
            raise ValueError(f"{name} must be a floating-point batch (B, d), got {got}")
