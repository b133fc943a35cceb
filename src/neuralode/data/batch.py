"""Padded mini-batches of irregularly sampled, partially observed time series.

Each subject keeps its *own* observation times. A batch pads the subjects to the longest one
instead of building the union of all subjects' times (as the latent ODE reference code does):
the union grows with the batch size and makes most entries of the value tensor missing, while
per-sample times let a solver integrate each trajectory on its own grid (e.g. with a batched
solve over ``times`` of shape ``(B, T)``).

References
----------
Rubanova, Chen, Duvenaud, "Latent ODEs for Irregularly-Sampled Time Series", NeurIPS 2019
(the ``values`` / ``mask`` / ``times`` triple and the interpolation / extrapolation split).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover - import only for annotations
    from .dataset import SubjectSeries

__all__ = ["IrregularBatch", "collate_series"]


@dataclass(frozen=True, eq=False)
class IrregularBatch:
    """A padded batch of ``B`` irregularly sampled series with ``C`` channels.

    Row ``b`` holds subject ``ids[b]``; its first ``n_b = valid[b].sum()`` positions are its
    observation times in increasing order, the remaining ``T - n_b`` positions are padding.

    Parameters
    ----------
    times : Tensor, shape ``(B, T)``, floating
        Observation times of each sample, in the dataset's time unit. Padded positions repeat the
        sample's last valid time (``0`` for a sample with no time point), so every row is
        non-decreasing and a solver asked for the padded times does no extra work.
    values : Tensor, shape ``(B, T, C)``, same dtype as ``times``
        Observed values; exactly ``0`` where ``mask == 0`` (missing or padding).
    mask : Tensor, shape ``(B, T, C)``, same dtype as ``times``
        ``1`` where the channel was observed at that time, ``0`` otherwise (always ``0`` on
        padding).
    valid : Tensor, shape ``(B, T)``, bool
        ``True`` where the time point exists (not padding). A valid time point may still have
        all channels missing (e.g. after :meth:`split_time` masking).
    labels : Tensor, shape ``(B,)``, floating, optional
        One label per sample (e.g. in-hospital death ``0/1``); ``NaN`` where unknown. ``None``
        when no sample in the batch has a label.
    static : Tensor, shape ``(B, S)``, floating, optional
        Baseline (time-invariant) covariates; ``NaN`` where unknown. ``None`` when the dataset
        has no static covariates.
    ids : list
        Subject identifiers, length ``B``.

    Raises
    ------
    ValueError
        If the shapes are inconsistent with each other or with ``len(ids)``.
    TypeError
        If a tensor has the wrong dtype (``valid`` must be bool, the rest floating).
    """

    times: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor
    labels: torch.Tensor | None = None
    static: torch.Tensor | None = None
    ids: list | None = None  # normalised to a list of length B in __post_init__

    def __post_init__(self) -> None:
        if self.times.ndim != 2:
            raise ValueError(f"times must have shape (B, T); got {tuple(self.times.shape)}.")
        B, T = self.times.shape
        for name in ("values", "mask"):
            t = getattr(self, name)
            if t.ndim != 3 or t.shape[:2] != (B, T):
                raise ValueError(
                    f"{name} must have shape (B, T, C) = ({B}, {T}, C) to match times; "
                    f"got {tuple(t.shape)}."
                )
        if self.mask.shape != self.values.shape:
            raise ValueError(
                f"mask shape {tuple(self.mask.shape)} differs from values shape "
                f"{tuple(self.values.shape)}."
            )
        if self.valid.shape != (B, T):
            raise ValueError(
                f"valid must have shape (B, T) = ({B}, {T}); got {tuple(self.valid.shape)}."
            )
        if self.valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor; got dtype {self.valid.dtype}.")
        for name in ("times", "values", "mask"):
            if not getattr(self, name).is_floating_point():
                raise TypeError(f"{name} must be floating; got {getattr(self, name).dtype}.")
        if self.labels is not None and tuple(self.labels.shape) != (B,):
            raise ValueError(
                f"labels must have shape (B,) = ({B},); got {tuple(self.labels.shape)}."
            )
        if self.static is not None and (self.static.ndim != 2 or self.static.shape[0] != B):
            raise ValueError(
                f"static must have shape (B, S) with B = {B}; got {tuple(self.static.shape)}."
            )
        ids = list(range(B)) if self.ids is None else list(self.ids)
        if len(ids) != B:
            raise ValueError(f"ids has {len(ids)} entries but the batch has B = {B} samples.")
        object.__setattr__(self, "ids", ids)

    def __len__(self) -> int:
        """Number of samples ``B``."""
        return self.times.shape[0]

    @property
    def n_channels(self) -> int:
        """Number of channels ``C``."""
        return self.values.shape[-1]

    @property
    def lengths(self) -> torch.Tensor:
        """Number of valid time points per sample, int64 tensor of shape ``(B,)``."""
        return self.valid.sum(dim=1)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> IrregularBatch:
        """Return a copy on ``device`` with floating tensors cast to ``dtype``.

        Parameters
        ----------
        device : torch.device or str, optional
            Target device; ``None`` keeps the current one.
        dtype : torch.dtype, optional
            Floating dtype for ``times``, ``values``, ``mask``, ``labels`` and ``static``;
            ``None`` keeps the current one. ``valid`` stays bool.

        Raises
        ------
        TypeError
            If ``dtype`` is not a floating dtype.
        """
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype; got {dtype}.")
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                cast = dtype if value.is_floating_point() else None
                changes[f.name] = value.to(device=device, dtype=cast)
        return replace(self, **changes)

    def split_time(self, t_split: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split the observations at ``t_split`` for extrapolation.

        Parameters
        ----------
        t_split : float or Tensor of shape ``(B,)``
            Split time, in the batch's time unit; one for all samples or one per sample.

        Returns
        -------
        observed_mask, future_mask : Tensor, shape ``(B, T, C)``, dtype of ``mask``
            ``mask`` restricted to valid times ``<= t_split`` and ``> t_split`` respectively.
            They are disjoint and sum to ``mask``. Use e.g.
            ``dataclasses.replace(batch, mask=observed_mask, values=batch.values * observed_mask)``
            for the encoder input and ``future_mask`` to score the extrapolation.

        Raises
        ------
        ValueError
            If ``t_split`` is a tensor whose shape is neither ``()`` nor ``(B,)``, or is not
            finite.
        """
        t = torch.as_tensor(t_split, dtype=self.times.dtype, device=self.times.device)
        if t.ndim == 1 and t.shape[0] == len(self):
            t = t[:, None]
        elif t.ndim != 0:
            raise ValueError(
                f"t_split must be a scalar or have shape (B,) = ({len(self)},); "
                f"got shape {tuple(t.shape)}."
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"t_split must be finite; got {t_split}.")
        before = (self.times <= t) & self.valid
        after = (self.times > t) & self.valid
        observed = self.mask * before.unsqueeze(-1).to(self.mask.dtype)
        future = self.mask * after.unsqueeze(-1).to(self.mask.dtype)
        return observed, future


def collate_series(
    records: Sequence[SubjectSeries],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> IrregularBatch:
    """Pad per-subject series into an :class:`IrregularBatch` (no union of times).

    Usable directly as ``collate_fn`` of a :class:`torch.utils.data.DataLoader` over an
    :class:`~neuralode.data.IrregularDataset`.

    Parameters
    ----------
    records : sequence of SubjectSeries
        At least one record; all with the same number of channels ``C`` and static size ``S``.
    dtype : torch.dtype, optional
        Floating dtype of the batch; default: the promoted dtype of the records.
    device : torch.device or str, optional
        Device of the batch; default: CPU.

    Returns
    -------
    IrregularBatch
        ``T = max(1, max_i n_i)``. Positions ``j >= n_i`` of row ``i`` are padding: ``times``
        repeats the last valid time (``0`` if ``n_i == 0``), ``values = mask = 0``,
        ``valid = False``. ``labels`` is ``None`` if no record has a label (otherwise ``NaN``
        for the unlabelled ones); ``static`` is ``None`` if the records have none.

    Raises
    ------
    ValueError
        If ``records`` is empty, or the records disagree on ``C``, on ``S`` or on whether
        static covariates are present.
    """
    records = list(records)
    if not records:
        raise ValueError("collate_series needs at least one record; got an empty sequence.")
    C = records[0].values.shape[1]
    has_static = records[0].static is not None
    S = records[0].static.shape[0] if has_static else 0
    for r in records:
        if r.values.shape[1] != C:
            raise ValueError(
                f"all records must have the same number of channels; record {r.id!r} has "
                f"{r.values.shape[1]}, record {records[0].id!r} has {C}."
            )
        if (r.static is not None) != has_static or (has_static and r.static.shape[0] != S):
            raise ValueError(
                f"all records must have static covariates of the same size; record {r.id!r} "
                f"differs from record {records[0].id!r}."
            )
    if dtype is None:
        dtype = records[0].values.dtype
        for r in records[1:]:
            dtype = torch.promote_types(dtype, r.values.dtype)
    B = len(records)
    T = max(1, max(len(r) for r in records))
    times = torch.zeros(B, T, dtype=dtype)
    values = torch.zeros(B, T, C, dtype=dtype)
    mask = torch.zeros(B, T, C, dtype=dtype)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, r in enumerate(records):
        n = len(r)
        if n == 0:
            continue
        times[b, :n] = r.times
        times[b, n:] = r.times[-1]
        values[b, :n] = r.values
        mask[b, :n] = r.mask
        valid[b, :n] = True
    labels = None
    if any(r.label is not None for r in records):
        labels = torch.tensor(
            [math.nan if r.label is None else r.label for r in records], dtype=dtype
        )
    static = torch.stack([r.static.to(dtype) for r in records]) if has_static else None
    batch = IrregularBatch(
        times=times,
        values=values,
        mask=mask,
        valid=valid,
        labels=labels,
        static=static,
        ids=[r.id for r in records],
    )
    return batch if device is None else batch.to(device)
