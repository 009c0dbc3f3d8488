"""Disentanglement and integration scores of latent representations.

Disentanglement (what each latent knows):

* :func:`latent_predictability`: cross-validated accuracy of a logistic regression predicting a
  variable (batch or label) from a latent, next to the chance level (majority class).
* :func:`disentanglement_table`: that for every latent and both variables.
* :func:`cross_correlation` / :func:`cross_correlation_table`: Pearson correlations between the
  dimensions of two latents, and their mean / max absolute value for every pair of latents.

Integration (scib's bio conservation and batch correction, Luecken et al. 2022), written here
with scikit-learn and scipy because ``scib-metrics`` pulls in jax and jaxlib (a large
dependency for eight numbers). What differs from ``scib-metrics`` is documented per function:
KMeans replaces Leiden clustering for NMI/ARI, LISI uses uniform weights over ``k`` neighbours
instead of a perplexity-calibrated Gaussian kernel; kBET, PCR comparison and isolated labels
are not computed. Totals use scib's weights, ``0.6 * bio + 0.4 * batch``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_samples,
    silhouette_score,
)
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
from sklearn.neighbors import NearestNeighbors

__all__ = [
    "latent_predictability",
    "disentanglement_table",
    "cross_correlation",
    "cross_correlation_table",
    "knn_transfer_accuracy",
    "silhouette_label",
    "silhouette_batch",
    "clustering_agreement",
    "graph_connectivity",
    "lisi",
    "integration_scores",
]


def _check(z_nk: np.ndarray, *columns) -> tuple[np.ndarray, list[np.ndarray]]:
    z = np.asarray(z_nk, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"z_nk must be cells x dims with at least 2 cells; got {z.shape}.")
    if not np.isfinite(z).all():
        raise ValueError("z_nk contains NaN or infinite values.")
    out = []
    for col in columns:
        values = np.asarray(col).astype(str)
        if len(values) != z.shape[0]:
            raise ValueError(f"{len(values)} values for {z.shape[0]} cells; give one per cell.")
        out.append(values)
    return z, out


def latent_predictability(
    z_nk: np.ndarray, y_n, cv: int = 5, seed: int = 0, max_iter: int = 2000
) -> dict[str, float]:
    """How well ``y_n`` can be predicted from ``z_nk``: cross-validated logistic regression.

    A multinomial logistic regression (L2, ``C=1``) is scored on held-out folds of a
    stratified, shuffled (seeded) ``cv``-fold split. The latent is *not* standardised: VAE
    latents share the prior's scale, and standardising would blow up posterior-collapsed
    dimensions (means spread by ~0.01 around 0 against a posterior sd of ~1) whose tiny offsets
    carry no usable information but can make a variable look predictable (measured: FADVI's
    collapsed ``z_r`` on the bundled PBMC data, batch accuracy 0.74 standardised, 0.54 raw).

    Returns
    -------
    ``{"accuracy": mean held-out accuracy, "chance": majority-class frequency}``.
    """
    z, (y,) = _check(z_nk, y_n)
    _, counts = np.unique(y, return_counts=True)
    chance = float(counts.max() / counts.sum())
    if len(counts) < 2:
        return {"accuracy": 1.0, "chance": 1.0}
    if counts.min() >= 2:
        folds = StratifiedKFold(n_splits=min(cv, int(counts.min())), shuffle=True,
                                random_state=seed)
    else:  # a class with one cell cannot be stratified
        folds = KFold(n_splits=cv, shuffle=True, random_state=seed)
    clf = LogisticRegression(max_iter=max_iter)
    acc = cross_val_score(clf, z, y, cv=folds)
    return {"accuracy": float(np.mean(acc)), "chance": chance}


def disentanglement_table(
    latents: Mapping[str, np.ndarray], batch_n, labels_n, cv: int = 5, seed: int = 0
) -> pd.DataFrame:
    """Batch and label predictability (:func:`latent_predictability`) of every latent.

    Returns
    -------
    DataFrame indexed by latent name with ``batch_accuracy``, ``batch_chance``,
    ``label_accuracy``, ``label_chance``.
    """
    rows = {}
    for name, z in latents.items():
        b = latent_predictability(z, batch_n, cv=cv, seed=seed)
        lab = latent_predictability(z, labels_n, cv=cv, seed=seed)
        rows[name] = {"batch_accuracy": b["accuracy"], "batch_chance": b["chance"],
                      "label_accuracy": lab["accuracy"], "label_chance": lab["chance"]}
    return pd.DataFrame.from_dict(rows, orient="index")


def cross_correlation(z_a: np.ndarray, z_b: np.ndarray) -> np.ndarray:
    """Pearson correlations ``(dims_a, dims_b)`` between the columns of two latents (a constant
    column correlates 0 with everything)."""
    a, _ = _check(z_a)
    b, _ = _check(z_b)
    if len(a) != len(b):
        raise ValueError(f"The latents have {len(a)} and {len(b)} cells; pass the same cells.")
    a = a - a.mean(0)
    b = b - b.mean(0)
    sa, sb = np.sqrt((a**2).sum(0)), np.sqrt((b**2).sum(0))
    sa[sa == 0], sb[sb == 0] = np.inf, np.inf
    return (a / sa).T @ (b / sb)


def cross_correlation_table(latents: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Mean and max absolute cross-correlation for every pair of latents (index ``"b-l"`` ...)."""
    names = list(latents)
    rows = {}
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            c = np.abs(cross_correlation(latents[p], latents[q]))
            rows[f"{p}-{q}"] = {"mean_abs_correlation": float(c.mean()),
                                "max_abs_correlation": float(c.max())}
    return pd.DataFrame.from_dict(rows, orient="index")


def knn_transfer_accuracy(
    z_nk: np.ndarray, labels_n, query_n: np.ndarray, n_neighbors: int = 15
) -> float:
    """Accuracy of a kNN classifier fitted on the other cells, on the ``query_n`` cells (mask).

    The hidden-label protocol: fit on the cells whose labels a model saw, score the cells whose
    labels it never saw.
    """
    from sklearn.neighbors import KNeighborsClassifier

    z, (y,) = _check(z_nk, labels_n)
    q = np.asarray(query_n, dtype=bool)
    if q.shape != (len(y),) or q.all() or not q.any():
        raise ValueError("query_n must be a boolean mask with some cells in and some out.")
    knn = KNeighborsClassifier(n_neighbors=min(n_neighbors, int((~q).sum())))
    return float(knn.fit(z[~q], y[~q]).score(z[q], y[q]))


def silhouette_label(z_nk: np.ndarray, labels_n) -> float:
    """scib's cell-type ASW: ``(silhouette(z, labels) + 1) / 2`` (Euclidean), in [0, 1]."""
    z, (y,) = _check(z_nk, labels_n)
    return float((silhouette_score(z, y) + 1) / 2)


def silhouette_batch(z_nk: np.ndarray, batch_n, labels_n) -> float:
    """scib's batch ASW: within each label, the mean of ``1 - |silhouette(z, batch)|`` per cell,
    averaged over labels with at least 2 batches and 3 cells (1: batches fully mixed)."""
    z, (b, y) = _check(z_nk, batch_n, labels_n)
    scores = []
    for lab in np.unique(y):
        m = y == lab
        if m.sum() < 3 or len(np.unique(b[m])) < 2 or len(np.unique(b[m])) >= m.sum():
            continue
        scores.append(float(np.mean(1 - np.abs(silhouette_samples(z[m], b[m])))))
    return float(np.mean(scores)) if scores else float("nan")


def clustering_agreement(z_nk: np.ndarray, labels_n, seed: int = 0) -> dict[str, float]:
    """NMI and ARI between the labels and a KMeans clustering with one cluster per label
    (scib clusters with Leiden at the best of several resolutions; KMeans is the
    deterministic, dependency-free stand-in)."""
    z, (y,) = _check(z_nk, labels_n)
    k = len(np.unique(y))
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)
    return {"nmi": float(normalized_mutual_info_score(y, pred)),
            "ari": float(adjusted_rand_score(y, pred))}


def _knn(z: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(z) - 1)
    return NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z, return_distance=False)[:, 1:]


def graph_connectivity(z_nk: np.ndarray, labels_n, n_neighbors: int = 15) -> float:
    """scib's graph connectivity: per label, the fraction of its cells in the largest connected
    component of the kNN graph restricted to them, averaged over labels."""
    z, (y,) = _check(z_nk, labels_n)
    import scipy.sparse as sp

    nn_nj = _knn(z, n_neighbors)
    n = len(z)
    graph = sp.csr_matrix((np.ones(nn_nj.size), (np.repeat(np.arange(n), nn_nj.shape[1]),
                                                 nn_nj.ravel())), shape=(n, n))
    scores = []
    for lab in np.unique(y):
        idx = np.flatnonzero(y == lab)
        _, comp = connected_components(graph[idx][:, idx], directed=False)
        scores.append(np.bincount(comp).max() / len(idx))
    return float(np.mean(scores))


def lisi(z_nk: np.ndarray, values_n, n_neighbors: int = 30) -> np.ndarray:
    """Local inverse Simpson index of ``values_n`` in each cell's ``n_neighbors`` neighbours
    (uniform weights; scib-metrics uses a perplexity-calibrated Gaussian kernel)."""
    z, (v,) = _check(z_nk, values_n)
    codes = pd.Categorical(v).codes
    nn_nj = _knn(z, n_neighbors)
    k = codes.max() + 1
    counts_nc = np.zeros((len(z), k))
    np.add.at(counts_nc, (np.repeat(np.arange(len(z)), nn_nj.shape[1]), codes[nn_nj].ravel()), 1)
    p_nc = counts_nc / counts_nc.sum(1, keepdims=True)
    return 1.0 / (p_nc**2).sum(1)


def integration_scores(z_nk: np.ndarray, batch_n, labels_n, seed: int = 0) -> pd.Series:
    """scib-style integration scores of one embedding (see the module notes).

    Bio conservation: ``silhouette_label``, ``nmi``, ``ari``, ``clisi`` (``(C - median cLISI)
    / (C - 1)``). Batch correction: ``silhouette_batch``, ``ilisi`` (``(median iLISI - 1) /
    (B - 1)``), ``graph_connectivity``. Each in [0, 1], higher is better; ``bio_conservation``
    and ``batch_correction`` are their means and ``total = 0.6 bio + 0.4 batch``.
    """
    z, (b, y) = _check(z_nk, batch_n, labels_n)
    n_b, n_c = len(np.unique(b)), len(np.unique(y))
    clus = clustering_agreement(z, y, seed=seed)
    bio = {
        "silhouette_label": silhouette_label(z, y),
        "nmi": clus["nmi"],
        "ari": clus["ari"],
        "clisi": float((n_c - np.median(lisi(z, y))) / (n_c - 1)) if n_c > 1 else 1.0,
    }
    batch = {
        "silhouette_batch": silhouette_batch(z, b, y),
        "ilisi": float((np.median(lisi(z, b)) - 1) / (n_b - 1)) if n_b > 1 else 1.0,
        "graph_connectivity": graph_connectivity(z, y),
    }
    bio_score = float(np.nanmean(list(bio.values())))
    batch_score = float(np.nanmean(list(batch.values())))
    return pd.Series({**bio, **batch, "bio_conservation": bio_score,
                      "batch_correction": batch_score,
                      "total": 0.6 * bio_score + 0.4 * batch_score})
