"""A neural ODE layer: a vector field network integrated by :func:`neuralode.solve`."""

from __future__ import annotations

import torch
from torch import nn

from .base import CountsNFE, NFECounter, SolverSettings, check_positive_int, solve_tracked

__all__ = ["NeuralODE"]


class NeuralODE(CountsNFE, nn.Module):
    """Continuous-depth layer ``y(t) = y0 + int_{t0}^{t} func(s, y(s)) ds``.

    Parameters
    ----------
    func : nn.Module
        The vector field ``func(t, y) -> dy/dt``; ``t`` is a 0-d float64 tensor, ``y`` has the
        (augmented) state's shape and dtype and the output must match it.
    solver : str or ButcherTableau, default "dopri5"
        Integration method (see :mod:`neuralode.solvers`).
    rtol, atol : float, optional
        Tolerances of adaptive step control; default 1e-3 and 1e-4 (looser than
        :func:`neuralode.solve`'s, as usual for neural ODEs).
    dt : float, optional
        Fixed step size (instead of ``rtol``/``atol``; required for fixed-step solvers).
    controller : Controller, optional
        A step-size controller object instead of ``rtol``/``atol``/``dt``.
    gradient : str or gradient method, default "direct"
        How the solve is differentiated: ``"direct"``, ``"backsolve"`` (adjoint),
        ``"checkpoint"`` or a :class:`~neuralode.Direct` / :class:`~neuralode.Backsolve` /
        :class:`~neuralode.Checkpointed` instance.
    augment_dim : int, default 0
        Augmented Neural ODE: ``augment_dim`` zero channels are appended to the state along
        dimension 1 (the feature / channel axis of a batched state ``(B, D, ...)``) before the
        solve and stripped from the output. ``func`` then acts on ``D + augment_dim`` features.
    max_steps : int, optional
        Step limit per solve.

    Attributes
    ----------
    nfe_forward : int or None
        Evaluations of ``func`` in the most recent forward solve (``None`` before any).
    nfe_backward : int or None
        Evaluations of ``func`` (or of its vector-Jacobian product) in the backward pass of the
        most recent forward solve; ``None`` until ``backward()`` has run through it.

    Raises
    ------
    TypeError
        If ``func`` is not an ``nn.Module`` (needed for parameter discovery by the adjoint and
        checkpointed gradients), or for solver settings of the wrong type.
    ValueError
        For invalid solver settings or a negative ``augment_dim``.

    Examples
    --------
    >>> import torch
    >>> from neuralode.models import MLPVectorField, NeuralODE
    >>> ode = NeuralODE(MLPVectorField(2, hidden=16), rtol=1e-4, atol=1e-6)
    >>> ode(torch.zeros(5, 2), torch.linspace(0, 1, 4)).shape
    torch.Size([4, 5, 2])
    >>> ode(torch.zeros(5, 2)).shape  # final state at t = 1: a continuous-depth layer
    torch.Size([5, 2])

    References
    ----------
    Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations", NeurIPS
    2018 (the continuous-depth layer and its NFE as a measure of cost). Dupont, Doucet, Teh,
    "Augmented Neural ODEs", NeurIPS 2019 (zero augmentation of the state).
    """

    def __init__(
        self,
        func: nn.Module,
        *,
        solver="dopri5",
        rtol: float | None = None,
        atol: float | None = None,
        dt: float | None = None,
        controller=None,
        gradient="direct",
        augment_dim: int = 0,
        max_steps: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(func, nn.Module):
            raise TypeError(
                f"func must be an nn.Module computing func(t, y), got {type(func).__name__}; "
                "wrap a function in an nn.Module so its parameters can be found"
            )
        self.func = func
        self.settings = SolverSettings(
            solver=solver,
            rtol=rtol,
            atol=atol,
            dt=dt,
            controller=controller,
            gradient=gradient,
            max_steps=max_steps,
        )
        self.augment_dim = check_positive_int(augment_dim, "augment_dim", minimum=0)
        self._counter = NFECounter()

    def _augment(self, y0: torch.Tensor) -> torch.Tensor:
        if not self.augment_dim:
            return y0
        if y0.dim() < 2:
            raise ValueError(
                f"augment_dim={self.augment_dim} needs a batched state (B, D, ...) to append "
                f"zeros along dimension 1; got y0 of shape {tuple(y0.shape)}. Add a batch "
                "dimension (y0[None])"
            )
        shape = list(y0.shape)
        shape[1] = self.augment_dim
        return torch.cat([y0, y0.new_zeros(shape)], dim=1)

    def forward(self, y0: torch.Tensor, t=None) -> torch.Tensor:
        """Integrate from ``y0`` and return the state at the times ``t``.

        Parameters
        ----------
        y0 : Tensor, shape ``(*shape)``; ``(B, D, ...)`` with ``augment_dim``
            Initial state at ``t[0]`` (or ``t[:, 0]``), floating point.
        t : Tensor ``(T,)`` or ``(B, T)``, or sequence of float, optional
            Output times. 1-D: shared and strictly monotone. 2-D: one grid per sample (rows
            monotone, all starting at the same time; repeats allowed). ``None``: return only
            the final state at ``t = 1`` from ``t = 0`` (see :meth:`final`).

        Returns
        -------
        Tensor
            ``(T, *y0.shape)`` for a 1-D ``t``; ``(T, B, ...)`` for a 2-D ``t`` with
            ``ys[j, b]`` the state of sample ``b`` at ``t[b, j]``; ``y0.shape`` when ``t`` is
            None. Augmented channels are stripped.

        Raises
        ------
        TypeError
            If ``y0`` is not a floating tensor.
        ValueError
            For invalid times (from :func:`neuralode.solve`) or an augmented state without a
            batch dimension.
        neuralode.SolveError
            If the solve fails (step size underflow, step limit, non-finite state).
        """
        _check_dtype(self, y0)
        if t is None:
            return self.final(y0)
        if not isinstance(y0, torch.Tensor) or not y0.is_floating_point():
            raise TypeError(
                f"y0 must be a floating point tensor, got {type(y0).__name__}"
                + (f" of dtype {y0.dtype}" if isinstance(y0, torch.Tensor) else "")
            )
        self._counter.reset()
        ys = solve_tracked(self.settings, self._counter, self.func, self._augment(y0), t)
        if self.augment_dim:
            ys = ys.narrow(2, 0, y0.shape[1])
        return ys

    def final(self, y0: torch.Tensor, t0: float = 0.0, t1: float = 1.0) -> torch.Tensor:
        """The state at ``t1`` starting from ``y0`` at ``t0``: shape ``y0.shape``.

        Raises
        ------
        ValueError
            If ``t0 == t1`` or they are not finite.
        """
        t0, t1 = float(t0), float(t1)
        if t0 == t1:
            raise ValueError(f"t0 and t1 must differ, got t0 = t1 = {t0}")
        return self.forward(y0, torch.tensor([t0, t1], dtype=torch.float64))[-1]

    def extra_repr(self) -> str:
        s = self.settings
        tol = f"dt={s.dt}" if s.dt is not None else f"rtol={s.rtol}, atol={s.atol}"
        grad = type(s.gradient).__name__
        return f"solver={s.solver!r}, {tol}, gradient={grad}, augment_dim={self.augment_dim}"


def _check_dtype(module: nn.Module, x: torch.Tensor) -> None:
    """A clear error when the input's dtype differs from the parameters' (instead of a matmul
    error deep inside the vector field)."""
    p = next(module.parameters(), None)
    if (
        isinstance(x, torch.Tensor)
        and p is not None
        and x.is_floating_point()
        and x.dtype != p.dtype
    ):
        raise TypeError(
            f"the input has dtype {x.dtype} but the model's parameters are {p.dtype}; cast one "
            f"to the other (model.to({x.dtype}) or x.to({p.dtype}))"
        )
