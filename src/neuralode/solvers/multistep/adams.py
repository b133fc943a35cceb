"""Adams methods with variable-step coefficients: ``explicit_adams``, ``implicit_adams``,
``fixed_adams``.

An Adams step integrates the polynomial through past derivatives ``f_{n-j} = f(t_{n-j},
y_{n-j})``::

    y_{n+1} = y_n + h sum_j w_j f_{n-j},     w_j = (1/h) int_{t_n}^{t_n + h} l_j(t) dt

with ``l_j`` the Lagrange basis on the *actual* past times, so the formulas are exact for
polynomials of the stated degree on any grid (uniform or not). The weights are computed per
step from the scaled nodes ``s_j = (t_{n-j} - t_n) / h`` by Gauss--Legendre quadrature of the
Lagrange basis in product form, which is exact and well conditioned (no Vandermonde solve).
This is the variable-coefficient Adams formulation of Krogh (1969) and Shampine & Gordon (1975)
written in Lagrange rather than divided-difference form; both give the same polynomial.

- ``explicit_adams`` (Adams--Bashforth of order ``max_order``, one evaluation per step): fixed
  steps only.
- ``implicit_adams`` (Adams--Bashforth predictor of order ``max_order - 1``, Adams--Moulton
  corrector of order ``max_order`` iterated to convergence, at most ``max_iters`` times:
  P(EC)^m E). Adaptive: the predictor--corrector difference estimates the local error (Milne's
  device), the corrected value is propagated (local extrapolation). The order is fixed; a solve
  starts at order 1 and raises it by one per step as the history fills (Shampine & Gordon's
  start; the step-size controller keeps these first steps small). torchdiffeq semantics:
  ``max_order`` is the corrector's order.
- ``fixed_adams``: ``implicit_adams`` without the error estimate (fixed steps only; torchdiffeq's
  alias).

On fixed steps the first ``max_order - 1`` steps are taken by the 8th-order Dormand--Prince
method (DOP853's tableau) so the history is accurate to the method's order; torchdiffeq uses
RK4 for this, which limits its Adams methods to order 4 in practice.

Default orders are stable ones: 4 for both. torchdiffeq's ``explicit_adams`` defaults to order
12, whose tiny stability region makes ``y' = -y`` blow up at ``h = 0.01`` (error ~1e39 at
``t = 5``); Adams--Bashforth of order 4 is stable for ``h |lambda| < 0.3``.

Multistep methods carry a history between steps, so a single step cannot be recomputed on its
own (``single_step_replay = False``): ``Checkpointed`` gradients and
``Backsolve(outputs="replay")`` are refused by the solve (ValueError). ``Direct`` gradients and
``Backsolve`` work (its default ``outputs="auto"`` then stops the adjoint solve at every output
time instead of replaying forward steps; events included).

References
----------
F. T. Krogh, A variable step variable order multistep method for the numerical solution of
ordinary differential equations, IFIP Congress 1968 (1969). L. F. Shampine, M. K. Gordon,
Computer Solution of Ordinary Differential Equations: the Initial Value Problem, Freeman 1975
(variable-step Adams, PECE with local extrapolation, start at order 1). Hairer, Norsett & Wanner
I, sec. III.5 (variable step size multistep methods).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from ..implicit.base import HermiteStepper, MethodFace

__all__ = ["Adams", "EXPLICIT_ADAMS", "IMPLICIT_ADAMS", "FIXED_ADAMS", "adams_weights"]

_MAX_ORDER = 12


@cache
def _gauss_legendre01(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1.0) / 2.0, w / 2.0


def adams_weights(nodes) -> list[float]:
    """``w_j = int_0^1 l_j(s) ds`` for the Lagrange basis on the scaled ``nodes`` ``s_j``.

    Exact for every polynomial of degree ``len(nodes) - 1`` (Gauss--Legendre with
    ``ceil(m / 2)`` points), computed with the basis in product form.
    """
    s = np.asarray(nodes, dtype=float)
    m = len(s)
    x, wq = _gauss_legendre01(max(1, (m + 1) // 2))
    out = []
    for j in range(m):
        others = np.delete(s, j)
        lj = np.prod((x[:, None] - others[None, :]) / (s[j] - others[None, :]), axis=1)
        out.append(float(wq @ lj))
    return out


@dataclass(frozen=True)
class Adams(MethodFace):
    """A variable-step Adams method.

    Parameters
    ----------
    name : str
        ``"explicit_adams"``, ``"implicit_adams"`` or ``"fixed_adams"`` (or a name of your own).
    implicit : bool
        Adams--Moulton corrector after the Adams--Bashforth predictor.
    max_order : int, default 4
        Order of the method (1..12): the predictor's for explicit Adams, the corrector's for
        implicit Adams (whose predictor has order ``max_order - 1``).
    max_iters : int, default 4
        Corrector iterations per step at most (implicit only); they stop early once the
        correction is below the tolerance.
    error_estimate : bool
        Whether the method offers its predictor--corrector difference to an adaptive controller
        (implicit only).
    corrector_tol : float, optional
        Tolerance of the corrector iteration on fixed steps (relative and absolute; default
        1e-12 in float64, 100 x machine epsilon otherwise). Adaptive steps iterate until the
        change is below a tenth of the controller's tolerance.

    Raises
    ------
    ValueError
        For ``max_order`` outside 1..12 (2..12 for implicit) or ``max_iters < 1``.
    """

    name: str
    implicit: bool
    max_order: int = 4
    max_iters: int = 4
    error_estimate: bool = False
    corrector_tol: float | None = None

    def __post_init__(self):
        lo = 2 if self.implicit else 1
        if not (isinstance(self.max_order, int) and lo <= self.max_order <= _MAX_ORDER):
            raise ValueError(
                f"{self.name}: max_order must be an integer in [{lo}, {_MAX_ORDER}], got "
                f"{self.max_order!r}"
            )
        if not (isinstance(self.max_iters, int) and self.max_iters >= 1):
            raise ValueError(
                f"{self.name}: max_iters must be a positive integer, got {self.max_iters!r}"
            )
        if self.error_estimate and not self.implicit:
            raise ValueError(f"{self.name}: only implicit Adams has an error estimate")

    fsal = True
    # A step depends on the history of earlier steps: it cannot be recomputed on its own from
    # its start state (gradient methods that replay single steps read this).
    single_step_replay = False

    @property
    def order(self) -> int:
        return self.max_order

    @property
    def embedded_order(self):
        return self.max_order - 1 if self.error_estimate else None

    def with_options(self, **options) -> Adams:
        """A copy with other settings, e.g. ``get_tableau("implicit_adams").with_options(
        max_order=6)``."""
        return dataclasses.replace(self, **options)

    def make_stepper(self, dtype, device):
        return AdamsStepper(self, dtype, device)

    def __repr__(self) -> str:
        return f"Adams({self.name!r}, order {self.max_order}, adaptive={self.adaptive})"


EXPLICIT_ADAMS = Adams("explicit_adams", implicit=False)
IMPLICIT_ADAMS = Adams("implicit_adams", implicit=True, error_estimate=True)
FIXED_ADAMS = Adams("fixed_adams", implicit=True)


class AdamsStepper(HermiteStepper):
    """Per-solve state of an Adams method: the history ``[(t_j, f_j)]``, newest last."""

    fsal = True

    def __init__(self, method: Adams, dtype, device):
        self.method = self.tab = method
        self.dtype, self.device = dtype, device
        real = dtype.to_real() if dtype.is_complex else dtype
        self.eps = torch.finfo(real).eps
        self.hist: list[tuple[float, torch.Tensor]] = []
        self.adaptive_ctrl = False
        self.rtol = self.atol = None
        self._starter = None

    # ------------------------------------------------------------------ engine hooks
    def bind(self, prob) -> None:
        """A new solve (or segment) starts: empty history, tolerances of the controller."""
        self.hist = []
        self.adaptive_ctrl = bool(getattr(prob.controller, "adaptive", False))
        if self.adaptive_ctrl:
            self.rtol, self.atol, self.ctol = prob.rtol, prob.atol, 0.1
        else:
            tol = self.method.corrector_tol
            tol = max(1e-12, 100 * self.eps) if tol is None else tol
            self.rtol = self.atol = tol
            self.ctol = 1.0

    def accept(self, t, t_new, y, y_new, K) -> None:
        """Called by the loop after an accepted step: ``f(t_new, y_new)`` joins the history."""
        self.hist.append((t_new, self.last_stage(K)))
        keep = self.method.max_order
        if len(self.hist) > keep:
            del self.hist[: len(self.hist) - keep]

    # ------------------------------------------------------------------ the step
    def _sync_history(self, t, k1):
        kv = k1.reshape(-1)
        if self.hist and self.hist[-1][0] == t and self.hist[-1][1].data_ptr() == kv.data_ptr():
            return  # continuing the run (or retrying a rejected step)
        if self.hist and self.hist[-1][0] != t:
            raise RuntimeError(
                f"{self.method.name}: a multistep method cannot recompute a single step (from "
                f"t={t:.17g}) out of its history; gradient='checkpoint' is not supported with "
                "Adams methods, nor 'backsolve' with output times strictly inside steps. Use "
                "gradient='direct', or land the steps on the output times (StepToGrid, or "
                "PIController(step_t=t))"
            )
        # First step, or f was evaluated afresh (a discontinuity in jump_t): restart.
        self.hist = [(t, kv)]

    def _scale(self, y0):
        rtol, atol = self.rtol, self.atol
        if rtol is None:
            rtol = atol = max(1e-12, 100 * self.eps)
        if isinstance(rtol, torch.Tensor):
            rtol = rtol.reshape(-1)
        if isinstance(atol, torch.Tensor):
            atol = atol.reshape(-1)
        return torch.clamp(y0.abs() * rtol + atol, min=torch.finfo(y0.abs().dtype).tiny)

    def step(self, f, t: float, h: float, y, k1, t_last: float, track_grad: bool):
        shape = y.shape
        self._sync_history(t, k1)
        meth = self.method
        yv = y.reshape(-1)
        n_hist = len(self.hist)
        need = meth.max_order if not meth.implicit else meth.max_order - 1
        if not self.adaptive_ctrl and n_hist < need:
            return self._starter_step(f, t, h, y, k1, t_last, track_grad)
        ts = [tj for tj, _ in self.hist]
        fs = [fj for _, fj in self.hist]
        # Predictor: Adams--Bashforth through the newest q_p derivatives.
        q_p = min(n_hist, need)
        nodes = [(ts[-1 - j] - t) / h for j in range(q_p)]
        wp = adams_weights(nodes)
        y_pred = yv
        for j, w in enumerate(wp):
            y_pred = y_pred + (h * w) * fs[-1 - j]
        err = None
        if not meth.implicit:
            y_new = y_pred
        else:
            # Corrector (order q_p + 1): the new point plus the q_p newest past derivatives.
            wc = adams_weights([1.0] + nodes)
            base = yv
            for j, w in enumerate(wc[1:]):
                base = base + (h * w) * fs[-1 - j]
            scale = self._scale(yv.detach())
            y_new = y_pred
            for it in range(meth.max_iters):
                f_new = f.flat(t_last, y_new)
                y_next = base + (h * wc[0]) * f_new
                with torch.no_grad():
                    change = torch.linalg.vector_norm((y_next - y_new) / scale) / math.sqrt(
                        y_new.numel()
                    )
                y_new = y_next
                if it + 1 < meth.max_iters and float(change) <= self.ctol:
                    break
            if meth.error_estimate:
                err = (y_new - y_pred).detach().view(shape)
        k_end = f.flat(t_last, y_new)
        K = self.pack(k1.reshape(-1), (y_new - yv) / h, k_end)
        return y_new.view(shape), err, K

    def _starter_step(self, f, t, h, y, k1, t_last, track_grad):
        """A fixed step by DOP853's 8th-order tableau while the history fills."""
        if self._starter is None:
            from ..dopri8 import TABLEAU
            from ..explicit_rk import RKStepper

            self._starter = RKStepper(TABLEAU, self.dtype, self.device)
        y_new, _, _ = self._starter.step(f, t, h, y, k1, t_last, track_grad)
        yv = y.reshape(-1)
        k_end = f.flat(t_last, y_new.reshape(-1))
        K = self.pack(k1.reshape(-1), (y_new.reshape(-1) - yv) / h, k_end)
        return y_new, None, K
