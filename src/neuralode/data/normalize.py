"""Per-channel normalisation of irregular series, fitted on observed entries only.

Missing entries (``mask == 0``) never enter the statistics and stay exactly ``0`` after any
transform, so the mask keeps its meaning. Fit on the training split only
(:func:`split_and_normalize` does this) so that no statistic of the validation or test subjects
leaks into training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .batch import IrregularBatch
from .dataset import IrregularDataset, SubjectSeries

__all__ = ["Normalizer", "split_and_normalize"]

_METHODS = ("standard", "minmax", "latent_ode")


def _masked_stats(
    values: torch.Tensor, mask: torch.Tensor, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column (shift, scale) of ``values (M, K)`` over entries with ``mask (M, K) == 1``."""
    m = mask.to(torch.float64)
    x = torch.where(mask.bool(), values.to(torch.float64), torch.zeros((), dtype=torch.float64))
    count = m.sum(0)
    seen = count > 0
    if method == "standard":
        shift = x.sum(0) / count.clamp_min(1)
        # Population variance (ddof = 0): the scale of the data at hand, no small-sample fix.
        scale = (((x - shift) * m) ** 2).sum(0).div(count.clamp_min(1)).sqrt()
    else:
        inf = torch.tensor(float("inf"), dtype=torch.float64)
        lo = torch.where(mask.bool(), x, inf).amin(0) if x.shape[0] else inf.expand(x.shape[1])
        hi = torch.where(mask.bool(), x, -inf).amax(0) if x.shape[0] else -inf.expand(x.shape[1])
        shift = lo
        # "latent_ode" reproduces the reference code's (x - min) / max, not (x - min) / range.
        scale = hi - lo if method == "minmax" else hi
    # A constant channel (zero spread), or a channel never observed, gets scale 1 so the
    # transform stays invertible; an unobserved channel also gets shift 0.
    shift = torch.where(seen, shift, torch.zeros_like(shift))
    scale = torch.where(seen & (scale != 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
    return shift, scale


@dataclass(frozen=True, eq=False)
class Normalizer:
    """Affine per-channel map ``x' = (x - shift) / scale`` and time map ``t' = t / time_scale``.

    Build it with :meth:`fit`. Statistics are float64; transforms return the input's dtype.

    Parameters
    ----------
    method : {"standard", "minmax", "latent_ode"}
        How ``shift`` / ``scale`` were fitted: mean / standard deviation (population, ddof 0);
        min / (max - min); or min / max, the (unusual) map of the latent ODE reference code
        (``utils.normalize_masked_data``).
    channels : tuple of str
        Channel names the statistics belong to.
    shift, scale : Tensor, shape ``(C,)``, float64
        Per-channel statistics; ``scale`` is never 0.
    time_scale : float
        Times are divided by this (``1.0`` = unchanged).
    static_names : tuple of str
        Names of the normalised static covariates (empty when static covariates are untouched).
    static_shift, static_scale : Tensor, shape ``(S,)``, float64, optional
        Same as ``shift`` / ``scale`` for the static covariates (``NaN`` entries ignored).
    """

    method: str
    channels: tuple[str, ...]
    shift: torch.Tensor
    scale: torch.Tensor
    time_scale: float = 1.0
    static_names: tuple[str, ...] = ()
    static_shift: torch.Tensor | None = None
    static_scale: torch.Tensor | None = None

    @classmethod
    def fit(
        cls,
        dataset: IrregularDataset,
        method: str = "standard",
        time_scale: float | str | None = None,
        static: bool = True,
    ) -> Normalizer:
        """Fit per-channel statistics on the observed values of ``dataset``.

        Parameters
        ----------
        dataset : IrregularDataset
            Fit data -- the training split only, to avoid leakage.
        method : {"standard", "minmax", "latent_ode"}, default ``"standard"``
            See the class docstring. Channels with zero spread or no observation get
            ``scale = 1`` (and ``shift = 0`` when never observed).
        time_scale : None, "max" or float, default None
            ``None``: times unchanged; ``"max"``: divide by the largest time in ``dataset``
            (so the fit data spans ``[0, 1]`` when it starts at 0); a positive float: divide by
            it (e.g. ``48.0`` for 48-hour ICU stays).
        static : bool, default True
            Also normalise the static covariates (same ``method``, ``NaN`` ignored).

        Raises
        ------
        ValueError
            If ``method`` or ``time_scale`` is not one of the allowed values, or ``dataset``
            is empty.
        TypeError
            If ``dataset`` is not an :class:`IrregularDataset`.
        """
        if not isinstance(dataset, IrregularDataset):
            raise TypeError(f"dataset must be an IrregularDataset; got {type(dataset).__name__}.")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}; got {method!r}.")
        if len(dataset) == 0:
            raise ValueError("cannot fit a Normalizer on an empty dataset.")
        C = dataset.n_channels
        values = torch.cat([r.values.reshape(-1, C) for r in dataset])
        mask = torch.cat([r.mask.reshape(-1, C) for r in dataset])
        shift, scale = _masked_stats(values, mask, method)
        if time_scale is None:
            ts = 1.0
        elif time_scale == "max":
            ts = max((float(r.times[-1]) for r in dataset if len(r)), default=0.0)
            ts = ts if ts > 0 else 1.0
        elif isinstance(time_scale, (int, float)) and not isinstance(time_scale, bool):
            ts = float(time_scale)
            if not ts > 0 or ts == float("inf"):
                raise ValueError(f"time_scale must be positive and finite; got {time_scale}.")
        else:
            raise ValueError(
                f'time_scale must be None, "max" or a positive float; got {time_scale!r}.'
            )
        s_names, s_shift, s_scale = (), None, None
        if static and dataset.static_names:
            st = torch.stack([r.static for r in dataset])
            s_shift, s_scale = _masked_stats(st, ~torch.isnan(st), method)
            s_names = dataset.static_names
        return cls(method, dataset.channels, shift, scale, ts, s_names, s_shift, s_scale)

    # -- core maps ----------------------------------------------------------------------------
    def _affine(self, x: torch.Tensor, shift, scale, inverse: bool) -> torch.Tensor:
        sh = shift.to(device=x.device)
        sc = scale.to(device=x.device)
        y = x.to(torch.float64) * sc + sh if inverse else (x.to(torch.float64) - sh) / sc
        return y.to(x.dtype)

    def _values(self, values: torch.Tensor, mask: torch.Tensor | None, inverse: bool):
        if values.shape[-1] != len(self.channels):
            raise ValueError(
                f"expected {len(self.channels)} channels ({list(self.channels)}) in the last "
                f"dimension; got shape {tuple(values.shape)}."
            )
        out = self._affine(values, self.shift, self.scale, inverse)
        if mask is None:
            return out
        return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))

    def _times(self, times: torch.Tensor, inverse: bool) -> torch.Tensor:
        if self.time_scale == 1.0:
            return times
        return (times.to(torch.float64) * (self.time_scale if inverse else 1 / self.time_scale)).to(
            times.dtype
        )

    def _static(self, static: torch.Tensor | None, inverse: bool) -> torch.Tensor | None:
        if static is None or self.static_shift is None:
            return static
        if static.shape[-1] != len(self.static_names):
            raise ValueError(
                f"expected {len(self.static_names)} static covariates "
                f"({list(self.static_names)}); got shape {tuple(static.shape)}."
            )
        return self._affine(static, self.static_shift, self.static_scale, inverse)

    def _apply(self, data, inverse: bool):
        if isinstance(data, torch.Tensor):
            return self._values(data, None, inverse)
        if isinstance(data, IrregularBatch):
            return replace(
                data,
                times=self._times(data.times, inverse),
                values=self._values(data.values, data.mask, inverse),
                static=self._static(data.static, inverse),
            )
        if isinstance(data, IrregularDataset):
            if data.channels != self.channels:
                raise ValueError(
                    f"dataset channels {list(data.channels)} differ from the channels this "
                    f"Normalizer was fitted on {list(self.channels)}."
                )
            if self.static_shift is not None and data.static_names != self.static_names:
                raise ValueError(
                    f"dataset static_names {list(data.static_names)} differ from the fitted "
                    f"{list(self.static_names)}."
                )
            series = [
                SubjectSeries(
                    r.id,
                    self._times(r.times, inverse),
                    self._values(r.values, r.mask, inverse),
                    r.mask,
                    r.label,
                    self._static(r.static, inverse),
                )
                for r in data
            ]
            unit = data.time_unit
            if self.time_scale != 1.0:
                suffix = f" / {self.time_scale:g}"
                if inverse and unit.endswith(suffix):
                    unit = unit[: -len(suffix)]
                elif not inverse:
                    unit = unit + suffix
            meta = dict(data.metadata)
            if inverse:
                meta.pop("normalizer", None)
            else:
                meta["normalizer"] = self
            return data.with_series(series, time_unit=unit, metadata=meta)
        raise TypeError(
            "expected an IrregularDataset, an IrregularBatch or a Tensor of shape (..., C); "
            f"got {type(data).__name__}."
        )

    def transform(self, data):
        """Normalise ``data``.

        Parameters
        ----------
        data : IrregularDataset, IrregularBatch or Tensor of shape ``(..., C)``
            For a dataset or batch: observed values, times and (if fitted) static covariates
            are mapped; missing entries stay 0. A dataset's ``time_unit`` gets a
            ``" / time_scale"`` suffix and its ``metadata["normalizer"]`` is set to ``self``.
            A bare tensor is treated as fully observed values (e.g. model predictions).

        Returns
        -------
        Same type as ``data``.

        Raises
        ------
        ValueError
            If the channels (names for a dataset, count otherwise) do not match the fit.
        TypeError
            For any other input type.
        """
        return self._apply(data, inverse=False)

    def inverse_transform(self, data):
        """Undo :meth:`transform` (same inputs, outputs and errors); round-trips to float
        rounding."""
        return self._apply(data, inverse=True)


def split_and_normalize(
    dataset: IrregularDataset,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    method: str = "standard",
    time_scale: float | str | None = None,
    static: bool = True,
) -> tuple[tuple[IrregularDataset, ...], Normalizer]:
    """Split by subject, fit a :class:`Normalizer` on the first (training) part, apply to all.

    Parameters
    ----------
    dataset : IrregularDataset
        Data in physical units.
    fractions, seed
        See :meth:`IrregularDataset.split`.
    method, time_scale, static
        See :meth:`Normalizer.fit`.

    Returns
    -------
    parts : tuple of IrregularDataset
        The normalised parts, in the order of ``fractions``.
    normalizer : Normalizer
        Fitted on ``parts[0]`` only; use its ``inverse_transform`` to report physical units.

    Raises
    ------
    ValueError
        As :meth:`IrregularDataset.split` and :meth:`Normalizer.fit` (e.g. an empty training
        part).
    """
    parts = dataset.split(fractions, seed=seed)
    normalizer = Normalizer.fit(parts[0], method=method, time_scale=time_scale, static=static)
    return tuple(normalizer.transform(p) for p in parts), normalizer
