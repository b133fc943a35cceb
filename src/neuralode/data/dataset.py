"""Per-subject irregular time series and the dataset that holds them.

A :class:`SubjectSeries` is one subject (patient, ICU stay, ...): its own strictly increasing
observation times, a value matrix with a 0/1 observation mask, an optional scalar label and
optional baseline covariates. An :class:`IrregularDataset` is an ordered collection of them
with channel names and a time unit; it splits by subject, and batches through
:func:`~neuralode.data.collate_series`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from .batch import IrregularBatch, collate_series

__all__ = ["IrregularDataset", "SubjectSeries"]


def _float_tensor(x: Any, dtype: torch.dtype, name: str, subject: Hashable) -> torch.Tensor:
    try:
        t = torch.as_tensor(x, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"subject {subject!r}: {name} must be convertible to a {dtype} tensor; got "
            f"{type(x).__name__} ({exc})."
        ) from None
    return t.detach().clone()


@dataclass(frozen=True, eq=False)
class SubjectSeries:
    """One subject's irregularly sampled multichannel series.

    Parameters
    ----------
    id : hashable
        Subject identifier (int or str), unique within a dataset.
    times : array-like, shape ``(n,)``
        Observation times, finite and strictly increasing (``n = 0`` is allowed: a subject
        with no observation, e.g. an ICU stay with only baseline descriptors).
    values : array-like, shape ``(n, C)``
        Values; entries where ``mask == 0`` are ignored and stored as ``0``. When ``mask`` is
        omitted, ``NaN`` marks a missing entry.
    mask : array-like, shape ``(n, C)``, optional
        ``1`` = observed, ``0`` = missing. Default: ``~isnan(values)``.
    label : float, optional
        Scalar outcome (e.g. death ``0/1``); ``None`` or ``NaN`` = unknown (stored as ``None``).
    static : array-like, shape ``(S,)``, optional
        Baseline covariates; ``NaN`` where unknown.

    Notes
    -----
    All floating tensors of a record share one dtype: that of ``values`` if it is a floating
    :class:`torch.Tensor`, otherwise :func:`torch.get_default_dtype` (float32 unless changed).

    Raises
    ------
    ValueError
        If ``times`` is not 1-D, not finite or not strictly increasing; if ``values`` /
        ``mask`` do not have shape ``(n, C)``; if ``mask`` is not 0/1; if an observed value is
        not finite; if ``static`` is not 1-D.
    TypeError
        If an input cannot be converted to a floating tensor.
    """

    id: Hashable
    times: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None = None
    label: float | None = None
    static: torch.Tensor | None = None

    def __post_init__(self) -> None:
        sid = self.id
        dtype = (
            self.values.dtype
            if isinstance(self.values, torch.Tensor) and self.values.is_floating_point()
            else torch.get_default_dtype()
        )
        times = _float_tensor(self.times, dtype, "times", sid)
        values = _float_tensor(self.values, dtype, "values", sid)
        if times.ndim != 1:
            raise ValueError(f"subject {sid!r}: times must be 1-D; got shape {tuple(times.shape)}.")
        n = times.shape[0]
        if values.ndim != 2 or values.shape[0] != n:
            raise ValueError(
                f"subject {sid!r}: values must have shape (n, C) with n = len(times) = {n}; "
                f"got {tuple(values.shape)}."
            )
        if not bool(torch.isfinite(times).all()):
            raise ValueError(f"subject {sid!r}: times must be finite; got {times.tolist()}.")
        if n > 1 and not bool((times[1:] > times[:-1]).all()):
            bad = int(torch.nonzero(times[1:] <= times[:-1])[0, 0]) + 1
            raise ValueError(
                f"subject {sid!r}: times must be strictly increasing; times[{bad - 1}] = "
                f"{times[bad - 1].item()} >= times[{bad}] = {times[bad].item()}. Sort them and "
                "merge repeated times (e.g. average the values) first."
            )
        if self.mask is None:
            mask = (~torch.isnan(values)).to(dtype)
        else:
            mask = _float_tensor(self.mask, dtype, "mask", sid)
            if mask.shape != values.shape:
                raise ValueError(
                    f"subject {sid!r}: mask shape {tuple(mask.shape)} differs from values "
                    f"shape {tuple(values.shape)}."
                )
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"subject {sid!r}: mask must contain only 0 and 1.")
        if not bool(torch.isfinite(values[mask.bool()]).all()):
            raise ValueError(
                f"subject {sid!r}: observed values (mask == 1, or not NaN when mask is "
                "omitted) must be finite; mark missing entries with mask = 0 or NaN."
            )
        values = torch.where(mask.bool(), values, torch.zeros((), dtype=dtype))
        label = self.label
        if label is not None:
            label = float(label)
            if math.isnan(label):
                label = None
        static = self.static
        if static is not None:
            static = _float_tensor(static, dtype, "static", sid)
            if static.ndim != 1:
                raise ValueError(
                    f"subject {sid!r}: static must be 1-D (S,); got shape {tuple(static.shape)}."
                )
        for name, value in (
            ("times", times),
            ("values", values),
            ("mask", mask),
            ("label", label),
            ("static", static),
        ):
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        """Number of time points ``n``."""
        return self.times.shape[0]

    @property
    def n_observations(self) -> int:
        """Number of observed (time, channel) entries."""
        return int(self.mask.sum().item())


class IrregularDataset(torch.utils.data.Dataset):
    """An ordered collection of :class:`SubjectSeries` with shared channels.

    Parameters
    ----------
    series : sequence of SubjectSeries
        The subjects, with unique ids; each has ``C = len(channels)`` channels and, when
        ``static_names`` is non-empty, a ``static`` vector of length ``S = len(static_names)``
        (``None`` otherwise).
    channels : sequence of str
        Channel names, in column order of ``values``.
    static_names : sequence of str, default ``()``
        Names of the baseline covariates.
    time_unit : str, default ``"unspecified"``
        Unit of ``times`` (e.g. ``"years"``, ``"hours"``).
    metadata : mapping, optional
        Free-form, read-only provenance (source, preprocessing, fitted normaliser, ...).

    Raises
    ------
    ValueError
        If channel or static names repeat, ids repeat, or a record's shape disagrees with the
        names.
    TypeError
        If an element of ``series`` is not a :class:`SubjectSeries`.

    Examples
    --------
    >>> train, val, test = dataset.split((0.7, 0.15, 0.15), seed=0)  # doctest: +SKIP
    >>> for batch in train.batches(32, shuffle=True):  # doctest: +SKIP
    ...     ...
    >>> loader = torch.utils.data.DataLoader(train, 32, collate_fn=train.collate)  # doctest: +SKIP
    """

    #: ``collate_fn`` for :class:`torch.utils.data.DataLoader`.
    collate = staticmethod(collate_series)

    def __init__(
        self,
        series: Sequence[SubjectSeries],
        channels: Sequence[str],
        static_names: Sequence[str] = (),
        time_unit: str = "unspecified",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self._series = tuple(series)
        self.channels = tuple(str(c) for c in channels)
        self.static_names = tuple(str(s) for s in static_names)
        self.time_unit = str(time_unit)
        self.metadata = MappingProxyType(dict(metadata or {}))
        for kind, names in (("channels", self.channels), ("static_names", self.static_names)):
            if len(set(names)) != len(names):
                dup = sorted({n for n in names if names.count(n) > 1})
                raise ValueError(f"{kind} must be unique; repeated: {dup}.")
        C, S = len(self.channels), len(self.static_names)
        seen: set = set()
        for i, r in enumerate(self._series):
            if not isinstance(r, SubjectSeries):
                raise TypeError(f"series[{i}] must be a SubjectSeries; got {type(r).__name__}.")
            if r.values.shape[1] != C:
                raise ValueError(
                    f"subject {r.id!r} has {r.values.shape[1]} channels but {C} channel names "
                    f"were given ({list(self.channels)})."
                )
            if S == 0 and r.static is not None:
                raise ValueError(
                    f"subject {r.id!r} has static covariates but static_names is empty; pass "
                    "static_names."
                )
            if S > 0 and (r.static is None or r.static.shape[0] != S):
                got = None if r.static is None else r.static.shape[0]
                raise ValueError(
                    f"subject {r.id!r} must have static of length {S} "
                    f"({list(self.static_names)}); got {got}."
                )
            if r.id in seen:
                raise ValueError(f"subject ids must be unique; {r.id!r} appears twice.")
            seen.add(r.id)

    # -- sequence protocol --------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of subjects ``N``."""
        return len(self._series)

    def __getitem__(self, index: int) -> SubjectSeries:
        """The record at position ``index`` (negative indices count from the end)."""
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(
                f"index must be an int; got {type(index).__name__}. Use subset(indices) for "
                "several subjects."
            )
        return self._series[index]

    def __iter__(self) -> Iterator[SubjectSeries]:
        return iter(self._series)

    def __repr__(self) -> str:
        return (
            f"IrregularDataset(subjects={len(self)}, channels={len(self.channels)}, "
            f"static={len(self.static_names)}, time_unit={self.time_unit!r}, "
            f"time_points={self.n_time_points})"
        )

    # -- summaries ----------------------------------------------------------------------------
    @property
    def ids(self) -> list:
        """Subject ids in dataset order."""
        return [r.id for r in self._series]

    @property
    def n_channels(self) -> int:
        """Number of channels ``C``."""
        return len(self.channels)

    @property
    def n_time_points(self) -> int:
        """Total number of time points over all subjects."""
        return sum(len(r) for r in self._series)

    @property
    def labels(self) -> torch.Tensor:
        """Labels as a float64 tensor of shape ``(N,)``; ``NaN`` where unknown."""
        return torch.tensor(
            [math.nan if r.label is None else r.label for r in self._series], dtype=torch.float64
        )

    # -- derived datasets ---------------------------------------------------------------------
    def with_series(
        self,
        series: Sequence[SubjectSeries],
        time_unit: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> IrregularDataset:
        """A dataset with the same names and unit (unless overridden) but other records."""
        return IrregularDataset(
            series,
            self.channels,
            self.static_names,
            self.time_unit if time_unit is None else time_unit,
            self.metadata if metadata is None else metadata,
        )

    def subset(self, indices: Sequence[int]) -> IrregularDataset:
        """The subjects at positions ``indices`` (in that order).

        Raises
        ------
        IndexError
            If an index is out of range.
        ValueError
            If an index repeats (subject ids must stay unique).
        """
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        for i in idx:
            if not -len(self) <= i < len(self):
                raise IndexError(f"subset index {i} out of range for {len(self)} subjects.")
        return self.with_series([self._series[i] for i in idx])

    def split(
        self, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
    ) -> tuple[IrregularDataset, ...]:
        """Split by subject into disjoint parts covering all subjects.

        A permutation is drawn from ``numpy.random.default_rng(seed)``; part ``k`` takes the
        permuted subjects between ``round(N * sum(fractions[:k]))`` and
        ``round(N * sum(fractions[:k+1]))``. Each part keeps dataset order. The same seed gives
        the same parts on every platform.

        Parameters
        ----------
        fractions : sequence of float, default ``(0.7, 0.15, 0.15)``
            Non-negative, summing to 1 (within ``1e-6``); e.g. train / validation / test.
        seed : int, default 0
            Seed of the permutation.

        Returns
        -------
        tuple of IrregularDataset
            One dataset per fraction (a part may be empty when ``N`` is small).

        Raises
        ------
        ValueError
            If ``fractions`` is empty, has a negative entry or does not sum to 1.
        TypeError
            If ``seed`` is not an int.
        """
        fr = np.asarray(list(fractions), dtype=np.float64)
        if fr.ndim != 1 or fr.size == 0 or (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6:
            raise ValueError(
                f"fractions must be non-negative and sum to 1; got {tuple(fractions)} "
                f"(sum {fr.sum() if fr.size else 0})."
            )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int; got {type(seed).__name__}.")
        N = len(self)
        perm = np.random.default_rng(int(seed)).permutation(N)
        bounds = np.rint(np.cumsum(fr) * N).astype(np.int64)
        bounds[-1] = N
        parts = np.split(perm, bounds[:-1])
        return tuple(self.subset(np.sort(p)) for p in parts)

    # -- batching -----------------------------------------------------------------------------
    def to_batch(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> IrregularBatch:
        """All subjects as one :class:`IrregularBatch` (raises ``ValueError`` if empty)."""
        return collate_series(self._series, dtype=dtype, device=device)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[IrregularBatch]:
        """Iterate over padded batches of ``batch_size`` subjects.

        Parameters
        ----------
        batch_size : int
            Subjects per batch (the last batch may be smaller unless ``drop_last``).
        shuffle : bool, default False
            Draw a new order with :func:`torch.randperm` (using ``generator``) per call.
        generator : torch.Generator, optional
            Source of randomness for ``shuffle``; default: torch's global generator.
        drop_last : bool, default False
            Drop a final batch smaller than ``batch_size``.
        dtype, device : optional
            Passed to :func:`collate_series`.

        Raises
        ------
        ValueError
            If ``batch_size`` is not a positive int, or ``generator`` is given without
            ``shuffle``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
        if generator is not None and not shuffle:
            raise ValueError("generator has no effect without shuffle=True; drop it or shuffle.")
        N = len(self)
        order = torch.randperm(N, generator=generator).tolist() if shuffle else range(N)
        order = list(order)
        stop = N - N % batch_size if drop_last else N
        for start in range(0, stop, batch_size):
            chunk = [self._series[i] for i in order[start : start + batch_size]]
            if chunk:
                yield collate_series(chunk, dtype=dtype, device=device)
