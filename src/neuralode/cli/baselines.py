"""Simple baselines the models are printed next to.

* Subject mean: per subject and channel, the mean of the conditioning observations (the
  training mean, 0 after standardisation, for a channel never observed for the subject).
* Last observation carried forward (LOCF): per subject and channel, the last conditioning
  observation at or before the query time; before the first one, the first one (next
  observation carried backward); a channel never observed for the subject gets the training
  mean (0 after standardisation).
* Linear: per subject and channel, linear interpolation between the conditioning observations
  (constant beyond the ends) for interpolation queries; for extrapolation queries (after the
  last conditioning time) the least-squares line through the subject's conditioning
  observations of that channel (LOCF when there is only one).
* Mortality: a logistic regression on the baseline (static) covariates, with median
  imputation and standardisation, fitted on the training subjects (scikit-learn).
"""

from __future__ import annotations

import numpy as np

__all__ = ["subject_mean", "locf", "linear", "static_logistic_auroc", "auroc"]


def _channel_obs(t: np.ndarray, y: np.ndarray, m: np.ndarray, c: int):
    sel = m[:, c] > 0
    return t[sel], y[sel, c]


def subject_mean(t, y, m, tq, fill: float = 0.0) -> np.ndarray:
    """Per-channel mean of the conditioning observations, at every query time ``tq (Q,)``.

    ``t (n,)``, ``y (n, C)``, ``m (n, C)``: the subject's conditioning times, values and mask;
    returns ``(Q, C)``.
    """
    C = y.shape[1]
    out = np.full((len(tq), C), fill, dtype=float)
    for c in range(C):
        _, yo = _channel_obs(t, y, m, c)
        if len(yo):
            out[:, c] = yo.mean()
    return out


def locf(t, y, m, tq, fill: float = 0.0) -> np.ndarray:
    """LOCF predictions ``(Q, C)`` at times ``tq (Q,)`` from conditioning observations.

    ``t (n,)``, ``y (n, C)``, ``m (n, C)``: the subject's conditioning times, values and mask.
    """
    C = y.shape[1]
    out = np.full((len(tq), C), fill, dtype=float)
    for c in range(C):
        to, yo = _channel_obs(t, y, m, c)
        if len(to) == 0:
            continue
        k = np.searchsorted(to, tq, side="right") - 1
        out[:, c] = yo[np.clip(k, 0, len(to) - 1)]
    return out


def linear(t, y, m, tq, fill: float = 0.0) -> np.ndarray:
    """Linear interpolation inside the observed span, a least-squares trend beyond its end."""
    C = y.shape[1]
    out = np.full((len(tq), C), fill, dtype=float)
    for c in range(C):
        to, yo = _channel_obs(t, y, m, c)
        if len(to) == 0:
            continue
        out[:, c] = np.interp(tq, to, yo)
        after = tq > to[-1]
        if len(to) >= 2 and after.any():
            slope, intercept = np.polyfit(to, yo, 1)
            out[after, c] = slope * tq[after] + intercept
    return out


def auroc(labels, scores) -> float | None:
    """Area under the ROC curve, ``None`` when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=float)
    scores = np.asarray(scores, dtype=float)
    keep = ~np.isnan(labels)
    labels, scores = labels[keep], scores[keep]
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def static_logistic_auroc(X_train, y_train, X_test, y_test, seed: int = 0) -> float | None:
    """AUROC on the test subjects of a logistic regression on static covariates.

    ``NaN`` covariates are imputed with the training median; subjects without a label are
    left out. ``None`` when a split lacks one of the classes or there are no covariates.
    """
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X_train, X_test = np.asarray(X_train, float), np.asarray(X_test, float)
    y_train, y_test = np.asarray(y_train, float), np.asarray(y_test, float)
    if X_train.ndim != 2 or X_train.shape[1] == 0:
        return None
    keep = ~np.isnan(y_train)
    if len(np.unique(y_train[keep])) < 2:
        return None
    clf = make_pipeline(
        SimpleImputer(strategy="median", keep_empty_features=True),
        StandardScaler(),
        LogisticRegression(max_iter=1000, random_state=seed),
    )
    clf.fit(X_train[keep], y_train[keep])
    return auroc(y_test, clf.predict_proba(X_test)[:, 1])
