"""Exceptions raised by failing solves.

Each carries where the solve stopped (``t``, the step count ``step``, the step size ``h``) and
its message says what to try.
"""

from __future__ import annotations

__all__ = ["SolveError", "StepSizeUnderflowError", "MaxStepsError", "NonFiniteError"]


class SolveError(RuntimeError):
    """A solve that could not reach its final time.

    Attributes
    ----------
    t : float
        Time reached (the last accepted step's end).
    step : int
        Number of step attempts made (accepted + rejected).
    h : float
        Step size at the failure.
    status : str
        Same value as ``Solution.status`` with ``throw=False``.
    """

    status = "failed"

    def __init__(self, message: str, *, t: float, step: int, h: float):
        super().__init__(message)
        self.t, self.step, self.h = t, step, h


class StepSizeUnderflowError(SolveError):
    """The step size fell below ``dt_min`` or the resolution of the time variable."""

    status = "dt_underflow"


class MaxStepsError(SolveError):
    """The solve used ``max_steps`` step attempts before reaching the final time."""

    status = "max_steps"


class NonFiniteError(SolveError):
    """The state or the derivative became NaN or infinite."""

    status = "nonfinite"
