"""The ``Stepper`` protocol: what a method provides to the engine's drivers.

A method (an explicit Butcher tableau, an implicit/Rosenbrock/Adams method object) makes a
per-solve stepper with ``make_stepper(dtype, device)``. The drivers call only the members below;
the hooks have no-op defaults here, so a driver calls them unconditionally (no probing for
optional attributes).
"""

from __future__ import annotations

__all__ = ["Stepper"]


class Stepper:
    """Base class and protocol of per-solve steppers.

    Attributes
    ----------
    tab : object
        The method (its ``fsal``, ``n_dense_stages``, ``dense_stage_is_next_first``,
        ``error_order()``, ``adaptive``).
    fsal : bool
        The last stage of an accepted step is the next step's first stage.
    S, Sd : int
        Number of stages, and of stages plus dense stages (for interpolation).
    reuse_buffer : bool
        Set by the driver: stages may share one buffer across steps (no graph, no dense output).
    stats : dict or None
        Counters merged into ``Solution.stats`` (implicit methods: Jacobians, LUs, ...).

    Methods
    -------
    step(f, t, h, y, k1, t_last, track_grad) -> (y_new, err, K)
        One step; ``t``/``h``/``t_last`` floats, or (B,) tensors for per-row steps where the
        method supports them (explicit Runge--Kutta, Rosenbrock, diagonally implicit).
    dense_stages(f, t, h, y, K, k_next, t_last=None) -> Kd
    interpolate(Kd, y, h, theta, samples=None) -> values
    last_stage(K), carry_fsal(K) -> the next step's first stage (FSAL methods)
    bind(prob), accept(t, t_new, y, y_new, K) -> hooks at the start of a solve and after every
        accepted step (Newton tolerances; multistep histories).
    bind_rows(rtol, atol), take_rows(keep) -> hooks of the per-sample driver: a working set
        starts, is compacted (per-row state of implicit steppers).
    """

    tab = None
    fsal = False
    reuse_buffer = False
    stats = None

    def bind(self, prob) -> None:
        """Called when a solve starts (default: nothing)."""

    def accept(self, t, t_new, y, y_new, K) -> None:
        """Called after every accepted step (default: nothing)."""

    def bind_rows(self, rtol, atol) -> None:
        """Called when the per-sample driver makes a working set, with the rows' tolerances
        (floats or ``(A, M)``; default: nothing). Implicit steppers reset their per-row state."""

    def take_rows(self, keep) -> None:
        """Called when the per-sample driver compacts its working set to rows ``keep``."""

    def last_stage(self, K):
        return K[self.S - 1]

    def carry_fsal(self, K):
        """The next step's first stage from an accepted FSAL step (default: the last stage)."""
        return self.last_stage(K)
