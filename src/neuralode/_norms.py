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

from ._tree import TreeSpec, flat_tolerance

if TYPE_CHECKING:  # type hints only (the loop imports this module)
    from ._loop import Problem

__all__ = ["ErrorNorm", "ErrorNormWork", "error_scale", "user_scaled_norm", "initial_norm"]
__all__ += ["tolerances", "zero_atol", "rms_rows"]


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
    atol is zero; ``out`` may be ``a``); ``b`` None: ``atol + rtol * a``, in place in ``a``."""
    scale = (a if b is None else torch.maximum(a, b, out=out)).mul_(rtol).add_(atol)
    if floor:
        scale.clamp_(min=torch.finfo(scale.dtype).tiny)
    return scale


def _norm(prob: Problem, scaled: torch.Tensor) -> torch.Tensor:
    return prob.norm(prob.spec.unflatten(scaled))


#: A reduction per component beats the scatter-add over the columns (one kernel for any number
#: of components) from this many columns per component; measured on one CPU thread: a
#: reduction costs ~3 us a component, the scatter-add ~3 ns a column with one row and ~0.2 us
#: with several (a kernel per column), e.g. 0.11 ms against 3 ms for 10 components of 10^5.
_PER_COMPONENT = {True: 1024, False: 16}  # (one row?) -> columns per component


def rms_rows(r: torch.Tensor, sizes=None, parts: int | None = None, ids=None, inv_sizes=None):
    """The engine's scaled error norm of each row of ``r`` ``(R, n, M)``: ``(R,)`` float64.

    A row is ``n`` samples of ``M`` scaled error components each: one sample under per-sample
    control (``n = 1``), the whole batch when one step size serves it (``R = 1``). A tensor
    state (``sizes`` None) takes the RMS over the row's ``n * M`` values; a tuple/dict state
    (``sizes`` the columns of each component) the maximum over its components of each
    component's RMS (Hairer, Norsett & Wanner I, sec. II.4; torchdiffeq's mixed norm), over
    the first ``parts`` components only (a seminorm), empty components left out (0/0). Every
    driver's norm is this one (:class:`ErrorNorm`, compiled stepping's step).

    ``ids`` (the component of each column, ``(M,)`` long) and ``inv_sizes`` (``1 / m`` per
    component, ``(C,)``) allow, eagerly, one scatter-add over the columns in place of a
    reduction per component where the components are many and small (the adjoint's augmented
    state has one per parameter tensor). Without them (compiled stepping) a reduction per
    component, which Inductor fuses (a traced scatter-add would be atomic adds in no fixed
    order).
    """
    R, n = r.shape[0], r.shape[1]
    if sizes is None:
        width = math.prod(r.shape[1:])
        return torch.linalg.vector_norm(r.reshape(R, -1), dim=1).double() * (
            1.0 / math.sqrt(max(width, 1))
        )
    used = [i for i, m in enumerate(sizes[:parts]) if m]
    if not used:
        return torch.zeros(R, dtype=torch.float64, device=r.device)
    sq = (r.abs() if r.is_complex() else r).square()
    # (R, M): over the row's samples (one row: a 2-D sum, the cheapest reduction)
    cols = (
        sq.reshape(R, -1)
        if n == 1
        else sq.view(n, -1).sum(0, keepdim=True)
        if R == 1
        else sq.sum(1)
    )
    C = len(sizes)
    if ids is None or cols.shape[1] >= _PER_COMPONENT[R == 1] * C:
        offs = [sum(sizes[:i]) for i in range(C)]
        ms = torch.stack([cols[:, offs[i] : offs[i] + sizes[i]].sum(1) / sizes[i] for i in used], 1)
    else:
        if R == 1:
            ms = cols.new_zeros(C).index_add_(0, ids, cols.view(-1)).mul_(inv_sizes).unsqueeze(0)
        else:
            ms = cols.new_zeros(R, C).index_add_(1, ids, cols).mul_(inv_sizes)
        ms = ms if len(used) == C else ms[:, used]
    rms = ms.amax(1).sqrt_().double()
    return rms if n == 1 else rms * (1.0 / math.sqrt(n))


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
    arithmetic. The reduction is :func:`rms_rows` (tuple and dict states: its scatter-add over
    the columns where the components are many and small). ``n_components`` restricts the norm
    to the first components (seminorm).
    """

    def __init__(self, y: torch.Tensor, spec: TreeSpec, n_components: int | None = None):
        real = y.real.dtype if y.is_complex() else y.dtype
        self.a = torch.empty(y.shape, dtype=real, device=y.device)
        self.b = torch.empty_like(self.a)
        self.of = None  # the state whose |.| self.a holds
        self._tols = None  # (rtol, atol, as tensors): made on first use, for those objects
        self.inv_sqrt_n = 1.0 / math.sqrt(max(y.numel(), 1))
        self.sizes = self.ids = self.inv_sizes = None  # (a tensor state)
        self.parts = n_components
        self.mixed = spec.kind != "tensor"
        if self.mixed:
            self.sizes = tuple(spec.sizes)
            sizes = torch.tensor(spec.sizes, device=y.device)
            comp = torch.arange(len(spec.sizes), device=y.device)
            self.ids = torch.repeat_interleave(comp, sizes)  # the component of each column
            self.inv_sizes = 1.0 / sizes.to(real).clamp(min=1)

    def reduce(self, r: torch.Tensor, rows: bool = False):
        """The norm (:func:`rms_rows`) of an already scaled ``r`` (B, M): over the whole batch
        (a float: the step's one host read), or of each row ((B,) float64)."""
        if not rows and not self.mixed:  # (rms_rows of one row, without its tensor arithmetic)
            return float(torch.linalg.vector_norm(r)) * self.inv_sqrt_n
        r3 = r.unsqueeze(1) if rows else r.unsqueeze(0)
        out = rms_rows(r3, self.sizes, self.parts, self.ids, self.inv_sizes)
        return out if rows else float(out)

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
        # (error_scale inlined: a per-step cost on small states.)
        scale = torch.maximum(a, b, out=a).mul_(tols[2]).add_(tols[3])
        if prob.atol_zero:
            scale.clamp_(min=torch.finfo(scale.dtype).tiny)
        # b now holds |y_new|: the next step's |y| if this one is accepted.
        self.a, self.b, self.of = b, a, y_new
        if self.mixed:
            return self.reduce(err.div_(scale))
        return float(torch.linalg.vector_norm(err.div_(scale))) * self.inv_sqrt_n

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
        a = y0.detach().abs()
        scale = error_scale(a, None, rtol, atol, floor)  # (|y_n| alone)

    def norm(*xs):
        if prob is not None and prob.norm is not None:
            vals = [float(_norm(prob, x / scale)) for x in xs]
        elif not rows and not work.mixed:
            vals = rms_rows(torch.stack(xs).div_(scale).reshape(len(xs), 1, -1)).tolist()
        else:
            vals = [work.reduce(x / scale, rows=rows) for x in xs]
        return vals[0] if len(vals) == 1 else tuple(vals)

    return norm
