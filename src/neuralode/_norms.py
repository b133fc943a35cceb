"""The scaled error norm: what step-size control measures, written once for every driver.

The error of a step is scaled componentwise by ``atol + rtol * max(|y_n|, |y_{n+1}|)`` and
reduced by the RMS norm (tensor states) or the maximum over components of each component's RMS
(tuple/dict states, the adjoint's augmented state; Hairer, Norsett & Wanner I, sec. II.4). The
reduction runs over the whole batch (one step size shared by the batch: a float, the step's one
host read) or over each row (per-sample control: a ``(B,)`` tensor, no host read). Where some
absolute tolerance is zero the scale is floored at the smallest normal number, so that pure
relative control meeting a component that stays 0 measures a zero (or huge) error instead of
0/0 = NaN -- in every driver alike.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ._tree import TreeSpec, flat_tolerance, rms_norm

if TYPE_CHECKING:  # type hints only (the loop imports this module)
    from ._loop import Problem

__all__ = ["ErrorNorm", "ErrorNormWork", "error_scale", "user_scaled_norm", "initial_norm"]
__all__ += ["tolerances", "zero_atol"]


def tolerances(spec: TreeSpec, ctrl, fixed: float):
    """``(rtol, atol, floor)`` of a solve: the controller's tolerances laid out like the flat
    state (floats or ``(B, M)`` tensors; ``fixed`` for both without an error norm) and whether
    the error scale needs its floor (some absolute tolerance is zero)."""
    if not ctrl.adaptive:
        return fixed, fixed, False
    atol = flat_tolerance(spec, ctrl.atol, "atol")
    return flat_tolerance(spec, ctrl.rtol, "rtol"), atol, zero_atol(atol)


def zero_atol(atol) -> bool:
    """Whether some absolute tolerance is zero (the error scale then needs its floor)."""
    return atol == 0 if isinstance(atol, float) else bool((atol == 0).any())


def error_scale(a, b, rtol, atol, floor: bool, out=None) -> torch.Tensor:
    """``atol + rtol * max(a, b)`` with ``a = |y_n|``, ``b = |y_{n+1}|`` (floored when some
    atol is zero; ``out`` may be ``a``)."""
    scale = torch.maximum(a, b, out=out).mul_(rtol).add_(atol)
    if floor:
        scale.clamp_(min=torch.finfo(scale.dtype).tiny)
    return scale


def _norm(prob: Problem, scaled: torch.Tensor) -> torch.Tensor:
    if prob.norm is not None:
        return prob.norm(prob.spec.unflatten(scaled))
    return rms_norm(prob.spec, scaled, prob.norm_components)


def user_scaled_norm(prob: Problem, err, y, y_new) -> float:
    """The scaled error norm with the controller's own ``norm`` (on the state's structure)."""
    with torch.no_grad():
        scale = error_scale(y.abs(), y_new.abs(), prob.rtol, prob.atol, prob.atol_zero)
        return float(_norm(prob, err / scale))


class ErrorNorm:
    """The scaled error norm with the default (RMS / mixed) norm, over the batch or per row.

    Two buffers of ``|state|`` serve every step of one shared solve, and ``|y|`` of an accepted
    state is carried to the next step as its ``|y_old|`` (one pass over the state fewer per
    step): large temporaries allocated per step cost page faults on CPU that can exceed the
    arithmetic. For tuple and dict states the per-component mean squares come from one
    scatter-add over the columns instead of a reduction per component (the augmented state of
    the adjoint has one component per parameter tensor). ``n_components`` restricts the norm to
    the first components (seminorm).
    """

    def __init__(self, y: torch.Tensor, spec: TreeSpec, n_components: int | None = None):
        real = y.real.dtype if y.is_complex() else y.dtype
        self.a = torch.empty(y.shape, dtype=real, device=y.device)
        self.b = torch.empty_like(self.a)
        self.of = None  # the state whose |.| self.a holds
        self._tols = None  # (rtol, atol, as tensors): made on first use, for those objects
        self.inv_sqrt_n = 1.0 / math.sqrt(max(y.numel(), 1))
        self.inv_sqrt_m = 1.0 / math.sqrt(max(y.shape[-1], 1))
        self.mixed = spec.kind != "tensor"
        if self.mixed:
            sizes = torch.tensor(spec.sizes, device=y.device)
            comp = torch.arange(len(spec.sizes), device=y.device)
            self.ids = torch.repeat_interleave(comp, sizes)
            used = list(spec.sizes[:n_components] if n_components is not None else spec.sizes)
            # Empty components take no part (their mean square would be 0/0).
            self.used = [i for i, n in enumerate(used) if n > 0]
            self.inv_sizes = 1.0 / sizes.to(real).clamp(min=1)
            self.inv_counts = 1.0 / (sizes.to(real) * spec.batch).clamp(min=1)
            self.sums = torch.zeros(len(spec.sizes), dtype=real, device=y.device)

    @staticmethod
    def rms_rows(r: torch.Tensor) -> torch.Tensor:
        """RMS of each row of a scaled ``r`` (B, M) (a tensor state): (B,) float64."""
        return torch.linalg.vector_norm(r, dim=1).double() * (1.0 / math.sqrt(max(r.shape[1], 1)))

    def reduce(self, r: torch.Tensor, rows: bool = False):
        """The norm of an already scaled ``r`` (B, M): a float, or (B,) float64 per row."""
        if not self.mixed:
            if rows:
                return self.rms_rows(r)
            return float(torch.linalg.vector_norm(r)) * self.inv_sqrt_n
        sq = (r.abs() if r.is_complex() else r).square()
        if rows:
            ms = r.new_zeros((r.shape[0], len(self.inv_sizes)), dtype=sq.dtype)
            ms = ms.index_add_(1, self.ids, sq).mul_(self.inv_sizes)[:, self.used]
            return ms.amax(1).sqrt().double() if self.used else sq.new_zeros(r.shape[0]).double()
        ms = self.sums.zero_().index_add_(0, self.ids, sq.sum(0)).mul_(self.inv_counts)
        if len(self.used) < ms.numel():
            ms = ms[self.used]
        return math.sqrt(float(ms.max())) if ms.numel() else 0.0

    def __call__(self, prob: Problem, err, y, y_new) -> float:
        """The scaled norm of the error ``err`` of a step ``y -> y_new`` over the whole batch
        (the step's one host read); ``err`` is overwritten."""
        a, b = self.a, self.b
        if self.of is not y:
            torch.abs(y.detach() if y.requires_grad else y, out=a)
        torch.abs(y_new.detach() if y_new.requires_grad else y_new, out=b)
        rtol, atol, tols = prob.rtol, prob.atol, self._tols
        if tols is None or tols[0] is not rtol or tols[1] is not atol:
            tols = self._tols = (rtol, atol, self._tensor(rtol), self._tensor(atol))
        scale = error_scale(a, b, tols[2], tols[3], prob.atol_zero, out=a)
        # b now holds |y_new|: the next step's |y| if this one is accepted.
        self.a, self.b, self.of = b, a, y_new
        return self.reduce(err.div_(scale))

    def _tensor(self, tol):
        """A float tolerance as a 0-d tensor of the norm's dtype (the same value the float
        converts to in the arithmetic): an in-place op with a Python number costs about twice
        one with a tensor, a per-step cost on small states."""
        if isinstance(tol, torch.Tensor):
            return tol
        return torch.full((), tol, dtype=self.a.dtype, device=self.a.device)

    def rows(self, err, y, y_new, rtol, atol, floor: bool) -> torch.Tensor:
        """The scaled norm of each row's error: (A,) float64 (``err`` is overwritten)."""
        scale = error_scale(y.detach().abs(), y_new.detach().abs(), rtol, atol, floor)
        return self.reduce(err.div_(scale), rows=True)


ErrorNormWork = ErrorNorm  # the earlier name


def initial_norm(work: ErrorNorm, y0, rtol, atol, floor: bool, rows=False, prob=None):
    """``norm(*xs)``: ``||x / (atol + rtol |y0|)||`` of each ``x`` for Hairer's initial step (a
    float, or (B,) per row; a tuple for several ``x``). With ``prob`` carrying a user norm, that
    norm (shared control only). A shared tensor state takes several norms in one reduction and
    one host read."""
    with torch.no_grad():
        scale = y0.detach().abs().mul_(rtol).add_(atol)
        if floor:
            scale.clamp_(min=torch.finfo(scale.dtype).tiny)

    def norm(*xs):
        if prob is not None and prob.norm is not None:
            vals = [float(_norm(prob, x / scale)) for x in xs]
        elif not rows and not work.mixed:
            both = torch.stack(xs).div_(scale).reshape(len(xs), -1)
            vals = [v * work.inv_sqrt_n for v in torch.linalg.vector_norm(both, dim=1).tolist()]
        else:
            vals = [work.reduce(x / scale, rows=rows) for x in xs]
        return vals[0] if len(vals) == 1 else tuple(vals)

    return norm
