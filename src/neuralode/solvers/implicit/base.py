"""What the implicit and multistep methods share: the method face the engine reads, and the
stepper's stage layout with its cubic Hermite dense output.

The engine (:func:`neuralode._loop.integrate`, the gradient methods, the dense output) reads a
few attributes of a method object and talks to a per-solve stepper. For the methods in
``solvers/implicit`` and ``solvers/multistep`` the stepper returns, per step, the rows

    K = [f(t_n, y_n), (y_{n+1} - y_n) / h, f(t_{n+1}, y_{n+1})]

(the last row only when it is known at the end of the step: FSAL; otherwise it is the one dense
stage, evaluated when an output falls inside the step and reused as the next step's first
stage). The continuous extension is the cubic Hermite interpolant through
``(y_n, f_n, y_{n+1}, f_{n+1})`` (third order; Hairer, Norsett & Wanner I, sec. II.6)::

    y(t_n + theta h) = y_n + h [(theta - 2 theta^2 + theta^3) K_0 + (3 theta^2 - 2 theta^3) K_1
                                + (theta^3 - theta^2) K_2]

Implicit tableaux with quartic weights (``kvaerno5``, ``radauIIA5``: :mod:`.tableaux`) add a
fourth row ``K_3 = d``, a combination of the step's stage derivatives, with the weight
``theta^2 (1 - theta)^2`` (:func:`quartic_weights`): a fourth-order extension that keeps the
Hermite end values and derivatives.
"""

from __future__ import annotations

import torch

from ..stepper import Stepper
from ..tableau import HERMITE_BASIS, interpolant_sum

__all__ = ["MethodFace", "HermiteStepper", "hermite_weights", "quartic_weights"]


def hermite_weights(theta: torch.Tensor) -> torch.Tensor:
    """Weights ``(m, 3)`` of ``[f_n, slope, f_{n+1}]`` at fractions ``theta`` (m,): the cubic
    Hermite basis :data:`~neuralode.solvers.tableau.HERMITE_BASIS` (``slope`` is the secant
    ``(y_{n+1} - y_n) / h``)."""
    powers = (theta, theta * theta, theta * theta * theta)
    return torch.stack([sum(c * p for c, p in zip(row, powers) if c) for row in HERMITE_BASIS], -1)


def quartic_weights(theta: torch.Tensor) -> torch.Tensor:
    """Weights ``(m, 4)`` of ``[f_n, slope, f_{n+1}, d]`` at fractions ``theta`` (m,): the cubic
    Hermite basis and the bubble ``theta^2 (1 - theta)^2`` of the quartic correction ``d``."""
    bubble = theta * (1.0 - theta)
    return torch.cat([hermite_weights(theta), (bubble * bubble).unsqueeze(-1)], -1)


class MethodFace:
    """Attributes of a method object that the engine reads (mixin for frozen dataclasses).

    Subclasses define ``name``, ``order``, ``embedded_order`` (None: fixed steps only) and
    ``fsal`` (whether ``f(t_{n+1}, y_{n+1})`` is known at the end of a step).
    """

    interpolant_order = 3

    @property
    def adaptive(self) -> bool:
        """Whether the method carries an error estimate (can run with a PIController)."""
        return self.embedded_order is not None

    def error_order(self) -> int:
        """Exponent base of step-size control: min(order, embedded_order) + 1."""
        if self.embedded_order is None:
            raise ValueError(f"method {self.name!r} has no error estimate")
        return min(self.order, self.embedded_order) + 1

    @property
    def n_dense_stages(self) -> int:
        return 0 if self.fsal else 1

    @property
    def dense_stage_is_next_first(self) -> bool:
        """The one dense stage of a non-FSAL method is ``f(t_{n+1}, y_{n+1})``."""
        return not self.fsal


class HermiteStepper(Stepper):
    """Stage layout ``[f_n, slope, (f_{n+1})]`` and the cubic Hermite dense output; with
    ``quartic`` (set by a stepper whose tableau has quartic weights ``q0``, ``q``), the rows
    ``[f_n, slope, f_{n+1}, d]`` and the quartic extension (:func:`quartic_weights`)."""

    quartic = False
    q0, q = 0.0, None

    @property
    def S(self) -> int:
        return 4 if self.quartic else (3 if self.fsal else 2)

    @property
    def Sd(self) -> int:
        return 4 if self.quartic else 3

    def last_stage(self, K):
        return K[2]

    def dense_stages(self, f, t: float, h: float, y, K, k_next, t_last=None):
        """``[f_n, slope, f_{n+1}]`` ``(3, B*M)``; ``k_next`` is ``f(t_{n+1}, y_{n+1})`` if known,
        ``t_last`` the time of stages at the step end (just before it at a jump)."""
        if K.shape[0] >= 3:
            return K
        if k_next is None:
            hv = h.to(y.dtype).unsqueeze(1) if isinstance(h, torch.Tensor) else h  # per row
            y_new = y + hv * K[1].view(y.shape)
            k_next = f(t + h if t_last is None else t_last, y_new)
        return torch.cat([K[:2].reshape(2, -1), k_next.reshape(1, -1)])

    def interpolate(self, Kd, y, h, theta: torch.Tensor, samples=None):
        """Continuous extension at ``theta`` (m,): ``(m, B, M)``, or ``(m, M)`` per sample
        (``samples`` (m,) long), or per row (``h`` a ``(n,)`` tensor, ``y`` ``(n, M)``, ``Kd``
        ``(Sd, n, M)``, row ``j`` at its own fraction ``theta[j]``): ``(n, M)``."""
        W = quartic_weights(theta) if self.quartic else hermite_weights(theta)
        return interpolant_sum(y, h, W, Kd, samples)

    def pack(self, k_start, slope, k_end=None, ks=None):
        """Stack the rows of ``K`` (1-D each). With ``quartic``, the correction
        ``d = q0 k_start + q @ ks`` from the stage derivatives ``ks`` ``(s, N)`` follows
        (``ks`` None: ``d = 0``, for a rejected step)."""
        rows = [k_start.reshape(-1), slope.reshape(-1)]
        if k_end is not None:
            rows.append(k_end.reshape(-1))
        if self.quartic:
            if ks is None:
                d = torch.zeros_like(rows[0])
            else:
                d = self.q @ ks
                if self.q0:
                    d = d + self.q0 * rows[0]
            rows.append(d)
        return torch.stack(rows)
