"""Scaled error norms and the initial step size: what step-size control measures.

The error of a step is scaled componentwise by ``atol + rtol * max(|y_n|, |y_{n+1}|)`` and
reduced by the RMS norm (tensor states) or the maximum over components of each component's RMS
(tuple/dict states, the adjoint's augmented state; Hairer, Norsett & Wanner I, sec. II.4).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ._tree import TreeSpec, rms_norm

if TYPE_CHECKING:  # type hints only (the loop imports this module)
    from ._loop import Problem, VectorField

__all__ = ["ErrorNormWork", "initial_step", "user_scaled_norm"]


def _norm(prob: Problem, scaled: torch.Tensor) -> torch.Tensor:
    if prob.norm is not None:
        return prob.norm(prob.spec.unflatten(scaled))
    if prob.norm_components is not None:
        comps = prob.spec.components(scaled)[: prob.norm_components]
        return torch.stack([c.abs().square().mean().sqrt() for c in comps]).max()
    return rms_norm(prob.spec, scaled)


def user_scaled_norm(prob: Problem, err, y, y_new) -> float:
    """The scaled error norm with the controller's own ``norm`` (on the state's structure)."""
    with torch.no_grad():
        scale = torch.maximum(y.abs(), y_new.abs()).mul_(prob.rtol).add_(prob.atol)
        if prob.atol_zero:
            # Pure relative control meets a zero component: floor the scale so that the error
            # is huge (the step shrinks) instead of NaN.
            scale.clamp_(min=torch.finfo(scale.dtype).tiny)
        return float(_norm(prob, err / scale))


class ErrorNormWork:
    """The scaled error norm with the default (RMS / mixed) norm, in a few fused passes.

    Two buffers of ``|state|`` serve every step of one solve, and ``|y|`` of an accepted state is
    carried to the next step as its ``|y_old|`` (one pass over the state fewer per step). Large
    temporaries allocated per step cost page faults on CPU that can exceed the arithmetic. For
    tuple and dict states the per-component mean squares come from one scatter-add over the
    columns instead of a reduction per component (the augmented state of the adjoint has one
    component per parameter tensor). ``n_components`` restricts the norm to the first components
    (seminorm). Returns the norm as a float: the step's one host read.
    """

    def __init__(self, y: torch.Tensor, spec: TreeSpec, n_components: int | None = None):
        real = y.real.dtype if y.is_complex() else y.dtype
        self.a = torch.empty(y.shape, dtype=real, device=y.device)
        self.b = torch.empty_like(self.a)
        self.of = None  # the state whose |.| self.a holds
        self.inv_sqrt_n = 1.0 / math.sqrt(max(y.numel(), 1))
        self.mixed = spec.kind != "tensor"
        if self.mixed:
            sizes = torch.tensor(spec.sizes, device=y.device)
            comp = torch.arange(len(spec.sizes), device=y.device)
            self.ids = torch.repeat_interleave(comp, sizes)
            used = list(spec.sizes[:n_components] if n_components is not None else spec.sizes)
            # Empty components take no part (their mean square would be 0/0).
            self.used = [i for i, n in enumerate(used) if n > 0]
            self.inv_counts = 1.0 / (sizes.to(real) * spec.batch).clamp(min=1)
            self.sums = torch.zeros(len(spec.sizes), dtype=real, device=y.device)

    def __call__(self, prob: Problem, err, y, y_new) -> float:
        a, b = self.a, self.b
        if self.of is not y:
            torch.abs(y.detach() if y.requires_grad else y, out=a)
        torch.abs(y_new.detach() if y_new.requires_grad else y_new, out=b)
        scale = torch.maximum(a, b, out=a).mul_(prob.rtol).add_(prob.atol)
        if prob.atol_zero:
            scale.clamp_(min=torch.finfo(scale.dtype).tiny)
        # b now holds |y_new|: the next step's |y| if this one is accepted.
        self.a, self.b, self.of = b, a, y_new
        r = err.div_(scale)
        if not self.mixed:
            return float(torch.linalg.vector_norm(r)) * self.inv_sqrt_n
        sq = (r.abs() if r.is_complex() else r).square().sum(0)  # (M,)
        ms = self.sums.zero_().index_add_(0, self.ids, sq).mul_(self.inv_counts)
        if len(self.used) < ms.numel():
            ms = ms[self.used]
        return math.sqrt(float(ms.max())) if ms.numel() else 0.0


def _norm_of(prob: Problem, x, scale) -> float:
    return float(_norm(prob, x / scale))


def initial_step(prob: Problem, f: VectorField, y0, k1, order: int, dt_max: float) -> float:
    """Hairer's starting step size (Hairer, Norsett & Wanner I, sec. II.4, algorithm p. 169).

    Costs one evaluation of f. Never steps outside [t0, t_end].
    """
    with torch.no_grad():
        scale = y0.abs().mul(prob.rtol).add(prob.atol)
        if prob.atol_zero:
            scale.clamp_(min=torch.finfo(scale.dtype).tiny)
        plain = prob.norm is None and prob.norm_components is None and prob.spec.kind == "tensor"
        if plain:  # RMS norms of y0 and f0 in one reduction and one host read
            inv = 1.0 / math.sqrt(max(y0.numel(), 1))
            both = torch.stack([y0, k1]).div_(scale).reshape(2, -1)
            d0, d1 = (x * inv for x in torch.linalg.vector_norm(both, dim=1).tolist())
        elif prob.norm is None:  # one host read for both norms
            d0, d1 = torch.stack([_norm(prob, y0 / scale), _norm(prob, k1 / scale)]).tolist()
        else:  # a user norm may return a Python number
            d0, d1 = _norm_of(prob, y0, scale), _norm_of(prob, k1, scale)
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
        span = abs(prob.t_end - prob.t0)
        h0 = min(h0, span, dt_max)
        y1 = y0 + (prob.direction * h0) * k1
        f1 = f(prob.t0 + prob.direction * h0, y1)
        if plain:
            d2 = float(torch.linalg.vector_norm((f1 - k1).div_(scale))) * inv / h0
        else:
            d2 = _norm_of(prob, f1 - k1, scale) / h0
        dmax = max(d1, d2)
        if not math.isfinite(dmax):
            h1 = h0 * 1e-3
        elif dmax <= 1e-15:
            h1 = max(1e-6, h0 * 1e-3)
        else:
            h1 = (0.01 / dmax) ** (1.0 / order)
        return min(100 * h0, h1, span, dt_max)
