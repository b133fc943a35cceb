"""``PIController(norm=...)`` inside compiled stepping (see :mod:`neuralode._compiled_step`).

The chunk's error norm is :func:`~neuralode._norms.rms_rows` unless the controller carries a
custom norm; then each row's scaled error (the same scale ``atol + rtol * max(|y_n|,
|y_{n+1}|)``, floored where some atol is zero) goes through the user's norm exactly as in the
eager drivers:

- shared control (one row): ``norm`` of the whole batch's scaled error in y0's structure, as
  :func:`~neuralode._norms.user_scaled_norm` (the host-float driver) takes it;
- per-sample control (one row per sample): ``norm`` of each sample alone (batch dimension 1),
  vectorised over the rows by :class:`~neuralode._norm_rows.RowUserNorm` (``torch.func.vmap``,
  which ``torch.compile`` traces).

The norm is traced into the compiled graph, so it must be traceable by ``torch.compile``
(torch operations only). :class:`CompiledNorm` is part of the chunk's constants and so of the
compiled function's cache key: it compares by the norm's identity, so two norms never share a
compiled graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._norm_rows import RowUserNorm
from ._tree import TreeSpec

__all__ = ["CompiledNorm", "compiled_norm"]


class CompiledNorm:
    """A custom error norm as a constant of the chunk. It compares (and hashes) by the norm's
    identity, the state structure and the kind of control: a norm object that compares equal
    to another one by value, or does not hash, still gets its own compiled code (the code's
    guards on the chunk's constants are filtered out, so sharing code between two objects
    would run one with the other's attributes)."""

    __slots__ = ("norm", "spec", "rows")

    def __init__(self, norm: Callable, spec: TreeSpec, rows: bool):
        self.norm = norm  # the user's norm(scaled_error_in_y0_structure) -> 0-d tensor
        self.spec = spec  # the whole batch's state structure
        self.rows = rows  # per-sample control: the norm of each sample alone

    def _key(self) -> tuple:
        return (id(self.norm), self.spec, self.rows)

    def __eq__(self, other) -> bool:
        return isinstance(other, CompiledNorm) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        """The norm of each row of the scaled error ``r`` ``(R, n, M)``: ``(R,)`` float64."""
        R, n, M = r.shape
        if self.rows:
            return RowUserNorm(self.norm, self.spec).reduce(r.reshape(R * n, M))
        out = self.norm(self.spec.unflatten(r.reshape(n, M)))
        out = torch.as_tensor(out).reshape(1)  # (a 0-d or one-element tensor, as float() takes)
        return (out.real if out.is_complex() else out).to(torch.float64)


def compiled_norm(C, norm, spec: TreeSpec, rows: bool):
    """The chunk's constants ``C`` with the custom error norm ``norm`` (None: ``C`` unchanged,
    the engine's RMS / mixed norm)."""
    if norm is None or not C.ctrl.adaptive:
        return C
    return C._replace(norm=CompiledNorm(norm, spec, bool(rows)))
