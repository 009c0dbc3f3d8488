"""Baseline feature scores for causal-trigger discovery, and the metrics they are judged by.

Every baseline sees the same data as CauTrigger: the upstream counts and the state. Counts
are log1p-transformed and standardised first (what a practitioner would do). Scores are
"larger = more likely causal"; they are compared with ``var["is_causal"]`` by AUROC and AUPR
(average precision), exactly like the CauTrigger weights.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_selection import mutual_info_classif
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score

from cellsight.models.cautrigger.priors import log_standardise

__all__ = ["BASELINES", "baseline_scores", "score_metrics"]


def de_ttest(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Largest |Welch t| of one state against the rest."""
    out = np.zeros(x.shape[1])
    for c in np.unique(y):
        t = stats.ttest_ind(x[y == c], x[y != c], equal_var=False).statistic
        out = np.maximum(out, np.abs(np.nan_to_num(t)))
    return out


def de_wilcoxon(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Largest |AUC - 0.5| (Mann-Whitney) of one state against the rest."""
    out = np.zeros(x.shape[1])
    for c in np.unique(y):
        a, b = x[y == c], x[y != c]
        u = stats.mannwhitneyu(a, b, axis=0).statistic
        out = np.maximum(out, np.abs(u / (len(a) * len(b)) - 0.5))
    return out


def logistic_coef(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """|coefficient| of an L2 logistic regression (C=1; max over states for > 2)."""
    lr = LogisticRegression(C=1.0, max_iter=2000).fit(x, y)
    return np.abs(lr.coef_).max(0)


def random_forest(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Impurity importance of a 300-tree random forest."""
    rf = RandomForestClassifier(n_estimators=300, random_state=seed, n_jobs=1).fit(x, y)
    return rf.feature_importances_


def mutual_information(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """k-NN mutual information between each feature and the state."""
    return mutual_info_classif(x, y, random_state=seed)


BASELINES = {
    "DE t-test": de_ttest,
    "DE Wilcoxon": de_wilcoxon,
    "logistic |coef|": logistic_coef,
    "random forest": random_forest,
    "mutual info": mutual_information,
}


def baseline_scores(x_ng: np.ndarray, y_n: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Scores of every baseline on counts ``x_ng`` and state codes ``y_n``."""
    x = log_standardise(x_ng)
    return {name: fn(x, y_n, seed) for name, fn in BASELINES.items()}


def score_metrics(scores: np.ndarray, is_causal: np.ndarray) -> tuple[float, float]:
    """(AUROC, AUPR) of feature scores against the planted truth."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64))
    t = np.asarray(is_causal, dtype=bool)
    return float(roc_auc_score(t, s)), float(average_precision_score(t, s))
