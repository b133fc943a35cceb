"""``PIController(norm=...)`` under per-sample control: the user's norm, one sample at a time.

Per-sample control promises that a sample's steps are those it would take solved alone. So
the per-row meaning of a custom norm is the norm the shared driver would compute for that
sample alone: ``norm`` receives one sample's scaled error in y0's structure with a batch
dimension of 1 (the same scaling ``atol + rtol * max(|y_n|, |y_{n+1}|)``, floored where some
atol is zero) and returns a 0-d tensor (or a one-element one). It is vectorised over the rows with
:func:`torch.func.vmap`, so it must use torch operations only (no ``.item()``, ``float()`` or
Python branches on values); the initial step uses it too, as on the shared path.
"""

from __future__ import annotations

import dataclasses

import torch

from ._norms import error_scale

__all__ = ["RowUserNorm"]


class RowUserNorm:
    """The per-row counterpart of :class:`~neuralode._norms.ErrorNorm` for a user norm."""

    mixed = True  # (initial_norm then reduces through reduce(rows=True))

    def __init__(self, norm, spec):
        self.norm = norm
        shapes = tuple(torch.Size((1, *s[1:])) for s in spec.shapes)
        self.spec1 = dataclasses.replace(spec, shapes=shapes, batch=1)
        self._rows = torch.func.vmap(self._one)

    def _one(self, r: torch.Tensor) -> torch.Tensor:
        return self.norm(self.spec1.unflatten(r.unsqueeze(0)))

    def reduce(self, r: torch.Tensor, rows: bool = True) -> torch.Tensor:
        """The norm of each row of an already scaled ``r`` (A, M): (A,) float64."""
        with torch.no_grad():
            try:
                out = self._rows(r.detach())
            except RuntimeError as why:
                raise ValueError(
                    "with batch_control='per_sample' PIController(norm=...) is applied to each "
                    "sample's scaled error (batch dimension 1) through torch.func.vmap, which "
                    f"failed: {why}. Write the norm with torch operations only (no .item(), "
                    "float() or Python branches on values)"
                ) from why
        A = r.shape[0]
        if (
            isinstance(out, torch.Tensor)
            and out.dim() > 1
            and out.shape[0] == A
            and out[0].numel() == 1
        ):
            out = out.reshape(A)  # a one-element tensor per sample, as the shared driver takes
        if not isinstance(out, torch.Tensor) or out.shape != (A,):
            got = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                "PIController(norm=...) must return a 0-d tensor (or a one-element one: the "
                f"norm of one sample's scaled error), got {got}"
            )
        return out.real.to(torch.float64) if out.is_complex() else out.to(torch.float64)

    def rows(self, err, y, y_new, rtol, atol, floor: bool) -> torch.Tensor:
        """The scaled norm of each row's error: (A,) float64."""
        scale = error_scale(y.detach().abs(), y_new.detach().abs(), rtol, atol, floor)
        return self.reduce(err / scale)
