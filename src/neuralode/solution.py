"""The result of a solve."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

__all__ = ["Solution"]


@dataclass
class Solution:
    """Values at the requested times, dense output, statistics and status of a solve.

    Attributes
    ----------
    t : Tensor
        The output times as given: ``(T,)`` or, for per-sample grids, ``(B, T)``.
    ys : Tensor or tuple/dict of Tensors
        The state at the output times, time first: each component has shape ``(T, *shape)``
        where ``shape`` is the component's shape in ``y0``. For per-sample grids ``shape``
        starts with the batch ``B``, so ``ys[j, b]`` is sample ``b`` at its time ``t[b, j]``.
    stats : dict
        ``nfe`` (evaluations of func in the forward solve), ``n_accepted``, ``n_rejected``,
        ``n_steps`` (= accepted), and after a backward pass through ``Backsolve`` or
        ``Checkpointed``, ``nfe_backward`` (evaluations of func or of its vector-Jacobian product
        during the gradient computation). ``Direct`` leaves it unset: its backward pass is
        autograd's, one vector-Jacobian product per evaluation recorded in the graph (``nfe``). With
        ``batch_control="per_sample"``: ``n_accepted``, ``n_rejected`` and ``n_steps`` are
        ``(B,)`` tensors (one count per sample), and ``sample_evals`` (rows passed to func, summed
        over its calls), ``wasted_sample_evals`` (rows of samples that had already finished),
        ``wasted_share``, ``n_iterations`` (batched step attempts), ``n_compactions`` and, when
        samples failed with ``throw=False``, ``failed_samples`` are added.
    status : str
        ``"success"``; ``"event"`` when terminal events stopped the solve (every sample's, for
        per-sample events) -- outputs after the event hold the state at the event;
        ``"max_events"`` when non-terminal events stopped it at ``Event(max_events=...)``
        (likewise, for every sample that reached it under per-sample control); or with
        ``throw=False`` one of ``"max_steps"``, ``"dt_underflow"``, ``"nonfinite"``.
    t_final : float or Tensor
        Time the solve reached (the final time on success); with ``batch_control="per_sample"``
        a ``(B,)`` float64 tensor, each sample's own.
    message : str
        Why the solve stopped early ("" on success).
    event_t : Tensor or None
        With ``event=``: the event time -- 0-d for a whole-state terminal event, ``(B,)`` for
        per-sample events (NaN where a sample had none), ``(n_events,)`` for non-terminal events
        (``(K, B)`` under ``batch_control="per_sample"``: event ``k`` of sample ``b``, NaN-padded).
        Differentiable (implicit function theorem, see :mod:`neuralode.events`).
    event_y : state or None
        The state at the event(s), shaped like ``event_t`` times the state (per-sample: y0's shape).
    integral : Tensor or None
        With ``solve(..., integral=g)``: ``int_{t0}^{t_j} g(t, y(t)) dt`` at each output time,
        shape ``(T, *g's output shape)`` (for per-sample grids g's output starts with ``B`` and
        row ``[j, b]`` is sample ``b``'s integral up to ``t[b, j]``). None otherwise.
    event_integral : Tensor or None
        With ``integral=`` and ``event=``: the integral up to the event(s), shaped like
        ``event_y``.
    """

    t: torch.Tensor
    ys: object
    stats: dict
    status: str = "success"
    t_final: float = float("nan")
    message: str = ""
    event_t: torch.Tensor | None = None
    event_y: object = None
    integral: torch.Tensor | None = None
    event_integral: torch.Tensor | None = None
    _dense: object = field(default=None, repr=False)
    _per_sample: bool = field(default=False, repr=False)
    _detached: bool = field(default=False, repr=False)
    _dense_integral: object = field(default=None, repr=False)

    @property
    def success(self) -> bool:
        return self.status == "success"

    @property
    def step_times(self) -> list[float]:
        """Accepted step boundaries (needs ``dense_output=True``); with
        ``batch_control="per_sample"`` one list per sample. For an event solve, those of every
        segment in order, each boundary between segments (a located event time) once."""
        if self._dense is None:
            raise ValueError("step_times needs solve(..., dense_output=True)")
        return self._dense.step_times

    def evaluate(self, t) -> object:
        """The solution at arbitrary times inside the solved interval (dense output).

        Parameters
        ----------
        t : float or Tensor
            Query times of any shape ``Q``. For per-sample solves a tensor of shape ``(B, Q)``
            queries each sample at its own times.

        Returns
        -------
        Tensor or tuple/dict of Tensors
            Shape ``(*Q, *shape)`` per component (``y0``'s shapes), or for per-sample queries
            ``(Q, B, *rest)``.

        Raises
        ------
        ValueError
            Without dense output (``dense_output=False``), or for times outside
            ``[t0, t_final]``, or a per-sample query whose batch size differs.

        Notes
        -----
        Differentiable with ``gradient="direct"`` (w.r.t. ``y0`` and parameters, not the query
        times); with the checkpointed and backsolve gradient methods the dense output holds
        detached values (a warning says so when gradients are being recorded).

        Event solves (``solve(..., event=...)``) keep a dense output too (by default with
        ``gradient="direct"``, as plain solves): each segment's own -- up to a terminal event,
        between non-terminal events -- joined at the event times, so that the trajectory of a
        bouncing ball, resets included, can be evaluated at any time; the gradients of the
        values reach the event times (and, through them, ``y0``, the parameters of ``func``,
        of the event function and of ``reset``) as ``ys``'s do. At an event time with a reset
        (a jump of the state) the value is the state *after* the reset, as for an output time
        in ``t`` at the event (the solution is right-continuous in the direction of
        integration); just before it, the state before the reset (``event_y``). The exception
        is the ``Event(max_events=...)``-th event, where the solve stops: the state before
        the reset, as ``ys`` holds after it. Past a terminal event (a sample's own, for
        per-sample events) the solve has stopped and a query raises ``ValueError`` naming the
        solved interval, which ends at the event time (``t_final``, or ``event_t`` where the
        latter lies a rounding-level further: ``event_t`` is the located time moved by the
        implicit-function-theorem correction, about the solve's tolerance). Per-sample events
        of shape ``(B,)`` under ``batch_control="shared"`` also take a ``(B, Q)`` query.
        """
        if self._dense is None:
            if self.stats.get("compiled") is not None:
                raise ValueError(
                    "this Solution comes from solve(..., compile=True), which keeps no dense "
                    "output unless asked; solve with dense_output=True to evaluate at "
                    "arbitrary times (or pass those times in t)"
                )
            raise ValueError(
                "this Solution has no dense output; solve with dense_output=True to evaluate "
                "at arbitrary times"
            )
        return self._evaluate(self._dense, t)

    def evaluate_integral(self, t) -> torch.Tensor:
        """The running-cost integral of ``solve(..., integral=g)`` at arbitrary times inside the
        solved interval (dense output of the integral, as :meth:`evaluate` for the state).

        Returns shape ``(*Q, *g's output shape)`` (per-sample queries ``(B, Q)``: ``(Q, B,
        ...)``). Raises ValueError without ``integral=`` or without dense output.
        """
        if self.integral is None:
            raise ValueError("evaluate_integral needs a solve with integral=g")
        if self._dense_integral is None:
            raise ValueError(
                "this Solution has no dense output; solve with dense_output=True to evaluate "
                "the integral at arbitrary times"
            )
        return self._evaluate(self._dense_integral, t)

    def _evaluate(self, d, t):
        if self._detached and torch.is_grad_enabled():
            warnings.warn(
                "Solution.evaluate returns detached values with the checkpointed and backsolve "
                "gradient methods: no gradient flows through them; use gradient='direct' for a "
                "differentiable dense output, or put the times in t",
                UserWarning,
                stacklevel=3,
            )
        tq = torch.as_tensor(t, dtype=torch.float64)
        if self._per_sample and tq.dim() == 2:
            B = d.spec.batch
            if tq.shape[0] != B:
                raise ValueError(
                    f"per-sample query t has {tq.shape[0]} rows but the solve has batch {B}"
                )
            Q = tq.shape[1]
            times = tq.T.reshape(-1).tolist()  # time-major: row j*B + b
            samples = torch.arange(B, device=d.spec.device).repeat(Q)
            flat = d.evaluate_flat(times, samples)  # (Q*B, M)
            # (Detached as the warning says: a dense output that starts from a state with a
            # graph, e.g. an event segment's, would otherwise carry a partial gradient.)
            flat = flat.detach() if self._detached else flat
            return d.spec.unflatten(flat.view(Q, B, -1), lead=(Q,))
        times = tq.reshape(-1).tolist()
        flat = d.evaluate_flat(times)  # (m, B, M)
        flat = flat.detach() if self._detached else flat
        return d.spec.unflatten(flat, lead=tuple(tq.shape))
