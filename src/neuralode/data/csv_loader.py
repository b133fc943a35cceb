"""Generic long-format CSV -> :class:`~neuralode.data.IrregularDataset`."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .dataset import IrregularDataset, SubjectSeries

__all__ = ["load_csv"]

#: Cell contents read as "missing" in the value and label columns.
MISSING_TOKENS = frozenset({"", "na", "nan", "null", "none"})


def _fail(path: Path, line: int, message: str) -> ValueError:
    return ValueError(f"{path}, line {line}: {message}")


def _number(text: str, column: str, path: Path, line: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise _fail(path, line, f"column {column!r} must be numeric; got {text!r}.") from None


def load_csv(
    path: str | os.PathLike,
    id_col: str = "id",
    time_col: str = "time",
    variable_col: str = "variable",
    value_col: str = "value",
    label_col: str | None = None,
    channels: Sequence[str] | None = None,
    time_unit: str = "unspecified",
) -> IrregularDataset:
    """Read a long-format CSV (one observation per row) into an :class:`IrregularDataset`.

    Example input (extra columns are ignored)::

        id,time,variable,value,death
        p1,0.0,HR,80,0
        p1,0.5,HR,82,0
        p1,0.5,Temp,37.1,0
        p2,1.25,HR,NA,1

    Parameters
    ----------
    path : path
        The CSV file; the first line is the header.
    id_col, time_col, variable_col, value_col : str
        Column names of subject id, observation time, variable (channel) name and value.
    label_col : str, optional
        Column of a per-subject label (e.g. death 0/1); it must not change within a subject
        (missing cells are allowed and ignored). ``None``: no labels.
    channels : sequence of str, optional
        Channel names in column order; a variable outside this list is an error. Default: the
        sorted distinct variable names.
    time_unit : str, default ``"unspecified"``
        Unit of the time column, recorded on the dataset.

    Returns
    -------
    IrregularDataset
        Subjects in order of first appearance, ids as str. Times are sorted within each
        subject (rows may come in any order); repeated (subject, time, variable) observations
        are averaged. A value cell that is empty or ``NA``/``NaN``/``null``/``None`` is
        missing: the row adds no observation (a subject whose values are all missing has zero
        time points).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    IsADirectoryError
        If ``path`` is a directory.
    ValueError
        Naming the file and the 1-based line number (header = line 1): an empty file; missing
        required columns (lists the missing and the found ones); a row with a different number
        of fields than the header; an empty id or variable; a time that is missing, NaN,
        non-numeric, infinite or negative; a non-numeric or infinite value; a non-numeric or
        inconsistent label; a variable not in ``channels``.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a CSV file; pass the file itself.")
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    subjects: dict[str, dict[float, dict[str, list[float]]]] = {}
    labels: dict[str, tuple[float, int]] = {}
    allowed = None if channels is None else {str(c) for c in channels}
    with open(path, newline="", encoding="utf-8-sig") as fh:  # a BOM (Excel) is skipped
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise _fail(path, 1, "file is empty; expected a header line.")
        header = [h.strip() for h in header]
        required = [id_col, time_col, variable_col, value_col]
        if label_col is not None:
            required.append(label_col)
        missing = [c for c in required if c not in header]
        if missing:
            raise _fail(
                path,
                1,
                f"missing required column(s) {missing}; found {header}. Rename the columns or "
                "pass id_col / time_col / variable_col / value_col / label_col.",
            )
        col = {c: header.index(c) for c in required}
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise _fail(path, line, f"expected {len(header)} fields; got {len(row)}.")
            sid = row[col[id_col]].strip()
            if not sid:
                raise _fail(path, line, f"column {id_col!r} (subject id) is empty.")
            time_text = row[col[time_col]].strip()
            if time_text.lower() in MISSING_TOKENS:
                raise _fail(
                    path, line, f"column {time_col!r} is missing or NaN; got {time_text!r}."
                )
            t = _number(time_text, time_col, path, line)
            if math.isnan(t):
                raise _fail(path, line, f"column {time_col!r} is NaN; got {time_text!r}.")
            if not math.isfinite(t):
                raise _fail(path, line, f"column {time_col!r} must be finite; got {time_text!r}.")
            if t < 0:
                raise _fail(path, line, f"column {time_col!r} must be >= 0; got {time_text!r}.")
            var = row[col[variable_col]].strip()
            if not var:
                raise _fail(path, line, f"column {variable_col!r} is empty.")
            if allowed is not None and var not in allowed:
                raise _fail(
                    path, line, f"variable {var!r} is not in channels {list(channels)}; add it."
                )
            obs = subjects.setdefault(sid, {})
            if label_col is not None:
                label_text = row[col[label_col]].strip()
                if label_text.lower() not in MISSING_TOKENS:
                    label = _number(label_text, label_col, path, line)
                    if sid in labels and labels[sid][0] != label:
                        prev, prev_line = labels[sid]
                        raise _fail(
                            path,
                            line,
                            f"label {label_text!r} of subject {sid!r} differs from {prev:g} on "
                            f"line {prev_line}; a label must be constant within a subject.",
                        )
                    labels.setdefault(sid, (label, line))
            value_text = row[col[value_col]].strip()
            if value_text.lower() in MISSING_TOKENS:
                continue
            value = _number(value_text, value_col, path, line)
            if not math.isfinite(value):
                raise _fail(path, line, f"column {value_col!r} must be finite; got {value_text!r}.")
            acc = obs.setdefault(t, {}).setdefault(var, [0.0, 0])
            acc[0] += value
            acc[1] += 1
    if not subjects:
        raise ValueError(f"{path}: no data rows after the header; nothing to load")
    if channels is None:
        names = sorted({v for obs in subjects.values() for at_t in obs.values() for v in at_t})
    else:
        names = [str(c) for c in channels]
    index = {n: i for i, n in enumerate(names)}
    series = []
    for sid, obs in subjects.items():
        times = sorted(obs)
        values = np.full((len(times), len(names)), np.nan)
        for j, t in enumerate(times):
            for var, (total, count) in obs[t].items():
                values[j, index[var]] = total / count
        label = labels[sid][0] if sid in labels else None
        series.append(SubjectSeries(sid, np.asarray(times, dtype=np.float64), values, label=label))
    return IrregularDataset(series, names, time_unit=time_unit, metadata={"source": str(path)})
