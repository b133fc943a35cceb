"""PhysioNet/Computing in Cardiology Challenge 2012: the first 48 hours of ICU stays.

Raw layout under ``root`` (as distributed by PhysioNet, nothing is downloaded here)::

    root/set-a/132539.txt      one file per ICU stay, named by RecordID
    root/Outcomes-a.txt        RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death

A record file is CSV with header ``Time,Parameter,Value`` and rows such as ``00:07,HR,73``;
``Time`` is ``hh:mm`` since ICU admission. The first rows, at ``00:00``, are the general
descriptors RecordID, Age, Gender, Height, ICUType and Weight (``-1`` = unknown); Weight is
also measured later as a time series.

References
----------
Silva, Moody, Scott, Celi, Mark, "Predicting in-hospital mortality of ICU patients: The
PhysioNet/Computing in Cardiology Challenge 2012", Computing in Cardiology 39:245-248, 2012.

Rubanova, Chen, Duvenaud, "Latent ODEs for Irregularly-Sampled Time Series", NeurIPS 2019;
reference code https://github.com/YuliaRubanova/latent_ode (``physionet.py``,
``lib/parse_datasets.py``, ``lib/utils.py``): channel list, quantisation, averaging and
normalisation reproduced by ``preprocessing="paper"``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .dataset import IrregularDataset, SubjectSeries
from .normalize import Normalizer

__all__ = [
    "PHYSIONET_DESCRIPTORS",
    "PHYSIONET_PAPER_CHANNELS",
    "PHYSIONET_TIME_SERIES",
    "load_physionet",
]

#: General descriptors recorded at 00:00, returned as static covariates (in this order).
PHYSIONET_DESCRIPTORS = ("Age", "Gender", "Height", "ICUType", "Weight")

#: The 37 time-series variables (Weight is both a descriptor and a time series).
PHYSIONET_TIME_SERIES = (
    "Weight", "Albumin", "ALP", "ALT", "AST", "Bilirubin", "BUN", "Cholesterol", "Creatinine",
    "DiasABP", "FiO2", "GCS", "Glucose", "HCO3", "HCT", "HR", "K", "Lactate", "Mg", "MAP",
    "MechVent", "Na", "NIDiasABP", "NIMAP", "NISysABP", "PaCO2", "PaO2", "pH", "Platelets",
    "RespRate", "SaO2", "SysABP", "Temp", "TroponinI", "TroponinT", "Urine", "WBC",
)  # fmt: skip

#: The 41 channels of the latent ODE reference code (``PhysioNet.params``, same order): the
#: descriptors Age, Gender, Height, ICUType as channels observed at time 0, then the 37 above.
PHYSIONET_PAPER_CHANNELS = ("Age", "Gender", "Height", "ICUType") + PHYSIONET_TIME_SERIES

_OUTCOME_LABEL = "In-hospital_death"


def _fail(path: Path, line: int, message: str) -> ValueError:
    return ValueError(f"{path}, line {line}: {message}")


def _parse_time(text: str, path: Path, line: int) -> float:
    """``"hh:mm"`` -> hours, computed as the reference code does (``h + m / 60``)."""
    parts = text.strip().split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[1]) >= 60:
        raise _fail(path, line, f"Time must be hh:mm (minutes < 60); got {text!r}.")
    return float(parts[0]) + float(parts[1]) / 60.0


def _read_record(path: Path, params: dict[str, int], paper: bool, quantization: float | None):
    """Parse one stay: return ``(times, values, mask, static)`` as numpy arrays."""
    C = len(params)
    bins: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    static = dict.fromkeys(PHYSIONET_DESCRIPTORS, math.nan)
    seen_static: set[str] = set()
    if paper:
        # The reference code always starts a stay with a (possibly empty) row at t = 0.
        bins[0.0] = (np.zeros(C), np.zeros(C))
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().strip()
        if header != "Time,Parameter,Value":
            raise _fail(path, 1, f"expected the header 'Time,Parameter,Value'; got {header!r}.")
        for lineno, raw in enumerate(fh, start=2):
            text = raw.strip()
            if not text:
                continue
            fields = text.split(",")
            if len(fields) != 3:
                raise _fail(path, lineno, f"expected 3 fields Time,Parameter,Value; got {text!r}.")
            time_text, param, value_text = (f.strip() for f in fields)
            hours = _parse_time(time_text, path, lineno)
            try:
                value = float(value_text)
            except ValueError:
                raise _fail(path, lineno, f"Value must be a number; got {value_text!r}.") from None
            if not math.isfinite(value):
                raise _fail(path, lineno, f"Value must be finite; got {value_text!r}.")
            if param == "RecordID":
                continue
            if param in PHYSIONET_DESCRIPTORS and param not in seen_static and hours == 0.0:
                seen_static.add(param)
                static[param] = math.nan if value == -1 else value
            if param not in params:
                if param in PHYSIONET_DESCRIPTORS:  # "clean": descriptors are static only
                    continue
                raise _fail(
                    path,
                    lineno,
                    f"unknown Parameter {param!r}; expected RecordID, a descriptor "
                    f"{list(PHYSIONET_DESCRIPTORS)} or one of {list(PHYSIONET_TIME_SERIES)}.",
                )
            if not paper and value < 0:
                continue  # "clean": all channels are non-negative; -1 codes "unknown"
            if quantization:
                # Python's round (half to even), as in the reference code.
                hours = round(hours / quantization) * quantization
            total, count = bins.setdefault(hours, (np.zeros(C), np.zeros(C)))
            total[params[param]] += value
            count[params[param]] += 1
    times = np.array(sorted(bins), dtype=np.float64)
    total = np.stack([bins[t][0] for t in times]) if len(times) else np.zeros((0, C))
    count = np.stack([bins[t][1] for t in times]) if len(times) else np.zeros((0, C))
    mask = (count > 0).astype(np.float64)
    values = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return times, values, mask, [static[d] for d in PHYSIONET_DESCRIPTORS]


def _read_outcomes(path: Path) -> dict[str, float]:
    with open(path, encoding="utf-8") as fh:
        header = [h.strip() for h in fh.readline().strip().split(",")]
        missing = [c for c in ("RecordID", _OUTCOME_LABEL) if c not in header]
        if missing:
            raise _fail(path, 1, f"outcome header lacks {missing}; found {header}.")
        id_col, label_col = header.index("RecordID"), header.index(_OUTCOME_LABEL)
        out: dict[str, float] = {}
        for lineno, raw in enumerate(fh, start=2):
            text = raw.strip()
            if not text:
                continue
            fields = [f.strip() for f in text.split(",")]
            if len(fields) != len(header):
                raise _fail(path, lineno, f"expected {len(header)} fields; got {len(fields)}.")
            try:
                label = float(fields[label_col])
            except ValueError:
                raise _fail(
                    path, lineno, f"{_OUTCOME_LABEL} must be 0 or 1; got {fields[label_col]!r}."
                ) from None
            if label not in (0.0, 1.0):
                raise _fail(path, lineno, f"{_OUTCOME_LABEL} must be 0 or 1; got {label}.")
            out[fields[id_col]] = label
    return out


def load_physionet(
    root: str | os.PathLike,
    sets: Sequence[str] = ("set-a",),
    outcomes: bool = True,
    preprocessing: str = "paper",
    quantization: float | None = 0.1,
) -> IrregularDataset:
    """Load PhysioNet 2012 ICU stays from the raw challenge files.

    Parameters
    ----------
    root : path
        Folder holding the set folders (``root/set-a/*.txt``) and outcome files
        (``root/Outcomes-a.txt``).
    sets : sequence of str, default ``("set-a",)``
        Set folders to read (``"set-a"``, ``"set-b"``, ``"set-c"``); a single str is one set.
    outcomes : bool, default True
        Read ``Outcomes-<x>.txt`` for each set ``set-<x>`` and use In-hospital_death (0/1) as
        the label; stays absent from the file get label ``None``. ``False``: no labels.
    preprocessing : {"paper", "clean"}, default ``"paper"``
        The two pipelines side by side (``"paper"`` | ``"clean"``):

        * channels: the 41 of :data:`PHYSIONET_PAPER_CHANNELS`, i.e. Age, Gender, Height and
          ICUType also as channels observed at t = 0 | the 37 of
          :data:`PHYSIONET_TIME_SERIES`, descriptors only in ``static``.
        * ``-1`` ("unknown"): kept as an observed value | missing; any negative value is
          dropped (all 37 variables are non-negative quantities).
        * time points: always a row at t = 0, even if empty | only times with at least one
          observation.
        * quantisation and averaging, identical in both: ``t = round(t / q) * q`` hours
          (Python's round, half to even); repeated measurements of a channel in one bin are
          averaged.
        * value normalisation: ``(x - min) / max`` per channel (a max of 0 is replaced by 1),
          with min / max over the observed values of **all** loaded stays, train and test
          alike, as the reference does | none: values stay in physical units; fit a
          :class:`~neuralode.data.Normalizer` on the training split only (e.g.
          :func:`~neuralode.data.split_and_normalize`).
        * time scaling: ``t / t_max`` with ``t_max`` the largest time over all loaded stays
          (the reference divides by the largest time of each batch, close to 48 h for
          batches of many stays) | none, hours.

        With ``"paper"`` the fitted map is ``metadata["normalizer"]`` (its
        ``inverse_transform`` gives physical units back). The reference then splits 80/20 with
        ``sklearn.model_selection.train_test_split(random_state=42)``; that split is left to
        the caller.
    quantization : float or None, default 0.1
        Bin width in hours (0.1 h = 6 min, the reference default). ``None`` or ``0``: keep
        minute resolution (repeated measurements at the same minute are still averaged).

    Returns
    -------
    IrregularDataset
        Ids are the RecordIDs (int), in set order then increasing RecordID; ``time_unit`` is
        ``"hours"`` (``"hours / <t_max>"`` after paper scaling); ``static`` holds
        :data:`PHYSIONET_DESCRIPTORS` (Age years, Gender 0 = female / 1 = male, Height cm,
        ICUType 1-4, admission Weight kg) with ``NaN`` for ``-1``, never normalised. A stay
        without any observation has zero time points under ``"clean"``.

    Raises
    ------
    FileNotFoundError
        If ``root``, a set folder or (with ``outcomes=True``) an outcome file is missing; the
        message names the path.
    ValueError
        For an unknown ``preprocessing``, a bad ``quantization``, an empty set folder, or a
        malformed line (message: ``<file>, line <n>: ...``; the header is line 1), including an
        unknown Parameter or a non-numeric Value.

    References
    ----------
    Silva et al., Computing in Cardiology 39:245-248, 2012 (the data). Rubanova, Chen,
    Duvenaud, NeurIPS 2019 and its reference code (the ``"paper"`` pipeline).
    """
    if preprocessing not in ("paper", "clean"):
        raise ValueError(f'preprocessing must be "paper" or "clean"; got {preprocessing!r}.')
    if quantization is not None and (
        isinstance(quantization, bool)
        or not isinstance(quantization, (int, float))
        or not (quantization >= 0 and math.isfinite(quantization))
    ):
        raise ValueError(
            f"quantization must be None or a non-negative number of hours; got {quantization!r}."
        )
    if isinstance(sets, str):
        sets = (sets,)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"PhysioNet root folder not found: {root}")
    paper = preprocessing == "paper"
    channels = PHYSIONET_PAPER_CHANNELS if paper else PHYSIONET_TIME_SERIES
    params = {name: i for i, name in enumerate(channels)}
    series = []
    for set_name in sets:
        folder = root / set_name
        if not folder.is_dir():
            raise FileNotFoundError(
                f"PhysioNet set folder not found: {folder} (expected {root}/{set_name}/<RecordID>.txt)"
            )
        files = sorted(
            folder.glob("*.txt"), key=lambda p: (not p.stem.isdigit(), len(p.stem), p.stem)
        )
        if not files:
            raise ValueError(f"no <RecordID>.txt files in {folder}.")
        labels: dict[str, float] = {}
        if outcomes:
            suffix = set_name.split("-", 1)[1] if "-" in set_name else set_name
            outcome_path = root / f"Outcomes-{suffix}.txt"
            if not outcome_path.is_file():
                raise FileNotFoundError(
                    f"PhysioNet outcome file not found: {outcome_path} (needed for {set_name}); "
                    "pass outcomes=False to load without labels."
                )
            labels = _read_outcomes(outcome_path)
        for path in files:
            times, values, mask, static = _read_record(path, params, paper, quantization)
            rid = path.stem
            series.append(
                SubjectSeries(
                    id=int(rid) if rid.isdigit() else rid,
                    times=times,
                    values=values,
                    mask=mask,
                    label=labels.get(rid),
                    static=static,
                )
            )
    dataset = IrregularDataset(
        series,
        channels,
        static_names=PHYSIONET_DESCRIPTORS,
        time_unit="hours",
        metadata={
            "source": f"PhysioNet Challenge 2012 {list(sets)} from {root}",
            "preprocessing": preprocessing,
            "quantization_hours": quantization,
            "reference": "Silva et al., Computing in Cardiology 39:245-248, 2012",
        },
    )
    if paper:
        normalizer = Normalizer.fit(dataset, method="latent_ode", time_scale="max", static=False)
        dataset = normalizer.transform(dataset)
    return dataset
