"""The start of a repeated compiled solve inside its first call (see :mod:`neuralode._compiled`).

An adaptive compiled solve begins with two evaluations of f outside the chunk: ``f(t0, y0)``
(the first stage, with its graph under autograd) and the one of Hairer's initial step size,
whose two norms are read back to the host. On a small problem (a training step of a few
adaptive steps) that eager prologue, and the backward pass of its graph, cost about as much as
two compiled steps. When the same func has already been solved with the same setup (its output
checked by the eager call, and the solve fitted in one call), :func:`chunk_from_start` computes
both in the compiled call itself, in front of the unchanged :func:`~neuralode._compiled_step.chunk`
-- with the engine's own formulas: the controller's
:meth:`~neuralode.controllers.PIController.initial_step` on tensors and
:func:`~neuralode._norms.initial_norm` over the whole batch as one row, as shared control's
error norm is. The step size is the eager prologue's up to the summation order of the norms.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._compiled_step import chunk
from ._norms import ErrorNorm, initial_norm

__all__ = ["Start", "chunk_from_start"]


class Start(NamedTuple):
    """What :func:`chunk_from_start` needs besides the chunk's inputs (compared by value: it is
    part of the compiled entry's key, and its guards are filtered out like the chunk's ``C``)."""

    ctrl: object  # the adaptive controller (its initial_step)
    spec: object  # the state's TreeSpec (a single tensor)
    order: int  # the tableau's error order
    rtol: float
    atol: float


def chunk_from_start(f, C, s: dict, k: dict, S: Start) -> dict:
    """``f(t0, y0)`` and the first step size into ``s`` (which has neither ``k1`` nor a
    meaningful ``h``), then :func:`~neuralode._compiled_step.chunk`. Shared control of a single
    tensor state: one row (``R = 1``), the norms over the whole batch."""
    y0, t0 = s["y"], s["t"]
    shape = C.layout[2][0]

    def call(tt, yy):  # (1,) float64 times and a (1, B*M) state, as one row
        return f(tt[0].to(C.time_dtype), yy.view(shape)).reshape(1, -1)

    row = y0.reshape(1, -1)
    k1 = call(t0, row)
    with torch.no_grad():  # step sizes are constants of the discrete solve
        nrm = initial_norm(ErrorNorm(row, S.spec), row, S.rtol, S.atol, C.floor, rows=True)
        span = (k["t_end"] - t0).abs()
        h0 = S.ctrl.initial_step(nrm, call, t0, row.detach(), k1.detach(), k["sdir"], span,
                                 S.order)  # fmt: skip
    return chunk(f, C, dict(s, k1=k1.view(y0.shape), h=h0), k)
