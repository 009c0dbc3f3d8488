"""Sanity numbers the demo reports about an embedding."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import KFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

__all__ = ["knn_label_accuracy", "majority_accuracy"]


def knn_label_accuracy(
    z_nk: np.ndarray, labels_n, n_neighbors: int = 15, n_splits: int = 5, seed: int = 0
) -> float:
    """Cross-validated accuracy of a k-nearest-neighbour classifier of ``labels_n`` on ``z_nk``.

    Parameters
    ----------
    z_nk
        Embedding, cells x dimensions.
    labels_n
        One label per cell.
    n_neighbors
        ``k`` of the classifier (Euclidean distance, uniform weights).
    n_splits
        Folds of a shuffled (seeded) K-fold split; the mean held-out accuracy is returned.
    seed
        Seed of the fold assignment.

    Returns
    -------
    Mean held-out accuracy in ``[0, 1]``.
    """
    z_nk = np.asarray(z_nk, dtype=np.float64)
    labels_n = np.asarray(labels_n).astype(str)
    if z_nk.ndim != 2 or len(z_nk) != len(labels_n):
        raise ValueError(
            f"z_nk has shape {z_nk.shape} but there are {len(labels_n)} labels; pass one row "
            "per labelled cell."
        )
    if len(labels_n) < 2 * n_splits:
        raise ValueError(f"{len(labels_n)} cells are too few for {n_splits}-fold validation.")
    folds = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
    k = min(n_neighbors, len(labels_n) - len(labels_n) // n_splits - 1)
    scores = cross_val_score(KNeighborsClassifier(n_neighbors=k), z_nk, labels_n, cv=folds)
    return float(np.mean(scores))


def majority_accuracy(labels_n) -> float:
    """Accuracy of always predicting the most frequent label (the chance level to beat)."""
    _, counts = np.unique(np.asarray(labels_n).astype(str), return_counts=True)
    return float(counts.max() / counts.sum())
