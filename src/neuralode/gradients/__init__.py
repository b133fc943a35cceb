"""Gradient methods: how a solve is differentiated.

- :class:`Direct` -- autograd through the solver's own operations: the exact gradient of the
  discrete solve; memory grows with the number of steps.
- :class:`Backsolve` -- the adjoint sensitivity method (Chen et al. 2018): the forward solve keeps
  no graph; the backward pass integrates the state, the adjoint state and the parameter integral
  backward in time. Memory constant in the number of steps; the gradient approximates the
  continuous one to the adjoint tolerances.
- :class:`Checkpointed` -- exact gradients (equal to Direct to rounding) with bounded memory: the
  forward pass stores the state at accepted steps (at most ``max_checkpoints`` of them), the
  backward pass recomputes each step with autograd.
- :class:`Reversible` -- exact gradients of an algebraically reversible version of the explicit
  Runge--Kutta method (McCallum & Foster 2024) in memory constant in the number of steps: the
  backward pass reconstructs every state by inverting the steps.

Pass one as ``neuralode.solve(..., gradient=...)``; the strings ``"direct"``, ``"backsolve"``
(alias ``"adjoint"``), ``"checkpoint"`` and ``"reversible"`` select the defaults.
"""

from __future__ import annotations

from ._common import capable
from .adjoint import Backsolve
from .checkpoint import Checkpointed
from .direct import Direct
from .reversible import Reversible

__all__ = ["Direct", "Backsolve", "Checkpointed", "Reversible", "get_gradient", "capable"]


def get_gradient(gradient):
    """Resolve a gradient method given by name or instance.

    Raises
    ------
    ValueError
        For an unknown name.
    TypeError
        For anything else.
    """
    if isinstance(gradient, (Direct, Backsolve, Checkpointed, Reversible)):
        return gradient
    if isinstance(gradient, str):
        key = gradient.lower()
        if key == "direct":
            return Direct()
        if key in ("backsolve", "adjoint"):
            return Backsolve()
        if key in ("checkpoint", "checkpointed"):
            return Checkpointed()
        if key == "reversible":
            return Reversible()
        raise ValueError(
            f"unknown gradient method {gradient!r}; choose 'direct', 'backsolve' (or 'adjoint'), "
            "'checkpoint', 'reversible', or pass Direct(), Backsolve(...), Checkpointed(...), "
            "Reversible(...)"
        )
    raise TypeError(
        f"gradient must be a name or a gradient method object, got {type(gradient).__name__}"
    )
