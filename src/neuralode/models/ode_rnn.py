"""ODE-RNN: a GRU whose hidden state follows an ODE between irregularly spaced observations."""

from __future__ import annotations

import torch
from torch import nn

from .base import (
    CountsNFE,
    MLPVectorField,
    NFECounter,
    SolverSettings,
    check_positive_int,
    solve_tracked,
)

__all__ = ["ODERNN"]


class ODERNN(CountsNFE, nn.Module):
    """ODE-RNN over per-sample irregular times with per-channel missingness.

    Between observations the hidden state ``h`` follows ``dh/dt = f(h)``; at an observed time
    point a GRU cell updates it from ``[x * m, m]`` (values with missing entries zeroed, and the
    mask ``m``).

    The batch is processed in lockstep over the time index ``j`` (forward: ``0..T-1``,
    reverse: ``T-1..0``) with **one** solve per index: each sample ``b`` is integrated over its
    own gap ``dt_b = |t[b, j] - t_prev[b]|`` on a per-sample grid ``[[0, ±dt_b]]``. Starting
    every row at 0 is what :func:`neuralode.solve` needs for per-sample grids, and it is exact
    because **the vector field is autonomous**: ``f`` must not depend on ``t`` (it receives
    the time since the previous observation, not the absolute time). Zero gaps (padding,
    repeated times) cost nothing. Reverse mode integrates backward in time (grid ``[0, -dt]``)
    with the same vector field, as the encoder of the latent ODE does.

    Conventions:

    * A time point is *observed* when it is valid and at least one channel is observed there;
      only observed points get a GRU update (as in Rubanova et al.'s GRU unit). Valid points
      with no observed channel are passed through by the ODE alone.
    * Before a sample's first observed point (in processing order) its state stays at ``h0``
      and does not evolve, so the states depend on the observed points and their times only
      (not on the times of unobserved or padded points, nor on the follow-up length).

    Parameters
    ----------
    input_dim : int
        Number of channels ``C`` of the observations.
    hidden_dim : int
        Size ``H`` of the hidden state.
    ode_hidden : int, default 32
        Width of the default vector field (a tanh :class:`MLPVectorField`).
    ode_layers : int, default 2
        Linear layers of the default vector field.
    vector_field : nn.Module, optional
        A custom autonomous vector field ``f(t, h) -> dh/dt`` on ``(B, H)`` (``t`` is ignored
        by contract). Replaces ``ode_hidden`` / ``ode_layers``.
    solver, rtol, atol, dt, controller, gradient, max_steps
        Solver settings of the between-observation solves (see :class:`NeuralODE`); defaults
        ``"dopri5"``, 1e-3, 1e-4, direct gradients.

    Attributes
    ----------
    nfe_forward : int or None
        Evaluations of the vector field summed over the solves of the last call.
    nfe_backward : int or None
        The same for the backward pass through the last call (after ``backward()``).

    Raises
    ------
    ValueError, TypeError
        For non-positive sizes, a ``vector_field`` that is not an ``nn.Module`` or invalid
        solver settings.

    References
    ----------
    Rubanova, Chen, Duvenaud, "Latent ODEs for Irregularly-Sampled Time Series", NeurIPS 2019
    (the ODE-RNN, Algorithm 1; masked input ``[x, m]``; updates only at observed points;
    autonomous tanh vector field; run backward in time as the latent ODE's encoder).
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        *,
        ode_hidden: int = 32,
        ode_layers: int = 2,
        vector_field: nn.Module | None = None,
        solver="dopri5",
        rtol: float | None = None,
        atol: float | None = None,
        dt: float | None = None,
        controller=None,
        gradient="direct",
        max_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.input_dim = check_positive_int(input_dim, "input_dim")
        self.hidden_dim = check_positive_int(hidden_dim, "hidden_dim")
        if vector_field is None:
            vector_field = MLPVectorField(hidden_dim, ode_hidden, ode_layers, "tanh")
        elif not isinstance(vector_field, nn.Module):
            raise TypeError(
                f"vector_field must be an nn.Module f(t, h), got {type(vector_field).__name__}"
            )
        self.vector_field = vector_field
        self.cell = nn.GRUCell(2 * input_dim, hidden_dim)
        self.settings = SolverSettings(
            solver=solver,
            rtol=rtol,
            atol=atol,
            dt=dt,
            controller=controller,
            gradient=gradient,
            max_steps=max_steps,
        )
        self._counter = NFECounter()

    def _evolve(self, h: torch.Tensor, dt: torch.Tensor, sign: float) -> torch.Tensor:
        """Integrate each row of ``h (B, H)`` over its own gap ``dt (B,)`` (float64, >= 0)."""
        if not bool((dt > 0).any()):
            return h
        grid = torch.stack([torch.zeros_like(dt), sign * dt], dim=1)
        return solve_tracked(self.settings, self._counter, self.vector_field, h, grid)[-1]

    def check_inputs(self, times, values, mask, valid) -> torch.Tensor:
        """Validate shapes and dtypes; return ``valid`` (all True when None).

        Raises
        ------
        TypeError
            For non-tensor or non-floating inputs, a non-bool ``valid`` or a dtype other than
            the parameters'.
        ValueError
            For inconsistent shapes, a channel count other than ``input_dim``, non-finite
            valid times, or times that decrease along a row.
        """
        for name, x in (("times", times), ("values", values), ("mask", mask)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"{name} must be a floating point tensor, got {x!r:.60}")
        if times.dim() != 2:
            raise ValueError(f"times must have shape (B, T), got {tuple(times.shape)}")
        B, T = times.shape
        if values.shape != (B, T, self.input_dim):
            raise ValueError(
                f"values must have shape (B, T, C) = ({B}, {T}, {self.input_dim}) (input_dim="
                f"{self.input_dim} channels), got {tuple(values.shape)}"
            )
        if mask.shape != values.shape:
            raise ValueError(
                f"mask must have the shape of values {tuple(values.shape)}, got {tuple(mask.shape)}"
            )
        dtype = self.cell.weight_ih.dtype
        if values.dtype != dtype or mask.dtype != dtype:
            raise TypeError(
                f"values and mask must have the model's dtype {dtype}, got {values.dtype} and "
                f"{mask.dtype}; convert the batch with batch.to(dtype={dtype}) or the model "
                "with .to(dtype)"
            )
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=times.device)
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            raise TypeError("valid must be a bool tensor of shape (B, T)")
        if valid.shape != (B, T):
            raise ValueError(f"valid must have shape (B, T) = ({B}, {T}), got {tuple(valid.shape)}")
        tv = times.detach().to(torch.float64)
        if not bool(torch.isfinite(tv[valid]).all()):
            raise ValueError("times must be finite at valid time points")
        # Monotonicity over valid points only (padding may hold anything).
        filled = torch.where(valid, tv, torch.full_like(tv, -torch.inf)).cummax(dim=1).values
        if bool(((tv < filled) & valid).any()):
            raise ValueError(
                "times must be non-decreasing along each row at valid time points; sort each "
                "sample's observations by time"
            )
        return valid

    def forward(
        self,
        times: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        valid: torch.Tensor | None = None,
        *,
        reverse: bool = False,
        h0: torch.Tensor | None = None,
        t_end=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the ODE-RNN over a padded batch.

        Parameters
        ----------
        times : Tensor, shape ``(B, T)``, floating
            Observation times per sample, non-decreasing along each row at valid points.
        values : Tensor, shape ``(B, T, C)``, the model's dtype
            Observed values (entries with ``mask == 0`` are ignored).
        mask : Tensor, shape ``(B, T, C)``, the model's dtype
            1 where observed, 0 where missing.
        valid : Tensor, shape ``(B, T)``, bool, optional
            False on padding. Default: all valid.
        reverse : bool, default False
            Process the time points from last to first, integrating backward in time.
        h0 : Tensor, shape ``(B, H)``, optional
            Initial hidden state (default zeros).
        t_end : float or Tensor ``(B,)``, optional
            After the last processed point, integrate each started sample on to this time
            (forward: at or after its last observed time; reverse: at or before its first).

        Returns
        -------
        hs : Tensor, shape ``(B, T, H)``
            ``hs[b, j]``: the state at ``times[b, j]`` after that point's update (at padding:
            the state carried over unchanged; before the first observed point: ``h0``).
        h_last : Tensor, shape ``(B, H)``
            The state after the last processed point (forward: at the sample's last observed
            time; reverse: at its first), or at ``t_end`` when given.

        Raises
        ------
        TypeError, ValueError
            As :meth:`check_inputs`; ``ValueError`` also for a ``t_end`` on the wrong side of
            the observations or of the wrong shape.
        neuralode.SolveError
            If a between-observation solve fails.
        """
        valid = self.check_inputs(times, values, mask, valid)
        B, T = times.shape
        if h0 is None:
            h = values.new_zeros(B, self.hidden_dim)
        elif not isinstance(h0, torch.Tensor) or h0.shape != (B, self.hidden_dim):
            raise ValueError(f"h0 must be a tensor of shape (B, H) = ({B}, {self.hidden_dim})")
        else:
            h = h0
        self._counter.reset()
        observed = valid & (mask > 0).any(dim=-1)
        tv = times.detach().to(torch.float64)
        sign = -1.0 if reverse else 1.0
        started = torch.zeros(B, dtype=torch.bool, device=times.device)
        t_prev = tv[:, -1] if reverse else tv[:, 0]
        x_all = torch.cat([values * mask, mask], dim=-1)
        hs = [None] * T
        for j in range(T - 1, -1, -1) if reverse else range(T):
            t_cur = torch.where(valid[:, j], tv[:, j], t_prev)
            gap = torch.where(started, sign * (t_cur - t_prev), torch.zeros_like(t_cur))
            h = self._evolve(h, gap, sign)
            upd = observed[:, j]
            if bool(upd.any()):
                h = torch.where(upd[:, None], self.cell(x_all[:, j], h), h)
            started = started | upd
            t_prev = torch.where(started, t_cur, t_prev)
            hs[j] = h
        if t_end is not None:
            te = torch.as_tensor(t_end, dtype=torch.float64, device=times.device)
            if te.dim() == 0:
                te = te.expand(B)
            if te.shape != (B,):
                raise ValueError(f"t_end must be a float or have shape (B,) = ({B},)")
            gap = torch.where(started, sign * (te - t_prev), torch.zeros_like(te))
            if bool((gap < 0).any()):
                side = "at or before the first" if reverse else "at or after the last"
                raise ValueError(
                    f"t_end must lie {side} observed time of each sample; got t_end="
                    f"{te[gap < 0].tolist()[:4]} for times reaching {t_prev[gap < 0].tolist()[:4]}"
                )
            h = self._evolve(h, gap, sign)
        return torch.stack(hs, dim=1), h

    def forward_batch(self, batch, *, reverse: bool = False, mask=None, t_end=None):
        """:meth:`forward` on an :class:`~neuralode.data.IrregularBatch`.

        ``mask`` (shape ``(B, T, C)``) overrides ``batch.mask`` (e.g. the observed part from
        :meth:`IrregularBatch.split_time`); values are multiplied by it. Returns
        ``(hs, h_last)`` as :meth:`forward`.
        """
        m = batch.mask if mask is None else mask
        return self.forward(
            batch.times, batch.values * m, m, batch.valid, reverse=reverse, t_end=t_end
        )
