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
"""

from __future__ import annotations

import torch

from ..stepper import Stepper
from ..tableau import HERMITE_BASIS, interpolant_sum

__all__ = ["MethodFace", "HermiteStepper", "hermite_weights"]


def hermite_weights(theta: torch.Tensor) -> torch.Tensor:
    """Weights ``(m, 3)`` of ``[f_n, slope, f_{n+1}]`` at fractions ``theta`` (m,): the cubic
    Hermite basis :data:`~neuralode.solvers.tableau.HERMITE_BASIS` (``slope`` is the secant
    ``(y_{n+1} - y_n) / h``)."""
    powers = (theta, theta * theta, theta * theta * theta)
    return torch.stack([sum(c * p for c, p in zip(row, powers) if c) for row in HERMITE_BASIS], -1)


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
    """Stage layout ``[f_n, slope, (f_{n+1})]`` and the cubic Hermite dense output."""

    @property
    def S(self) -> int:
        return 3 if self.fsal else 2

    Sd = 3

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
        return interpolant_sum(y, h, hermite_weights(theta), Kd, samples)

    @staticmethod
    def pack(k_start, slope, k_end=None):
        """Stack the rows of ``K`` (1-D each)."""
        rows = [k_start.reshape(-1), slope.reshape(-1)]
        if k_end is not None:
            rows.append(k_end.reshape(-1))
        return torch.stack(rows)
