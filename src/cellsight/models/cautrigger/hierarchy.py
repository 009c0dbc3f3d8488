"""One call for the CauTrigger hierarchy: a 1L model picks the downstream features nearest
the state, and a 2L model finds the upstream features that drive them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from cellsight.models.cautrigger.module import DOWN_KEY

__all__ = ["HierarchyResult", "fit_hierarchy"]


@dataclass
class HierarchyResult:
    """The two fitted models and their rankings.

    Attributes
    ----------
    model_1l
        :class:`~cellsight.models.CauTrigger1L` on the downstream features.
    model_2l
        :class:`~cellsight.models.CauTrigger2L` on the upstream features with the top
        downstream features as ``X_down``.
    down_weights
        Weights of all downstream features (1L).
    top_down
        The ``top_k`` downstream features passed on.
    up_weights
        Weights of the upstream features (2L).
    """

    model_1l: Any
    model_2l: Any
    down_weights: pd.DataFrame
    top_down: list[str]
    up_weights: pd.DataFrame


def _down_matrix(adata: AnnData, down_key: str) -> tuple[np.ndarray, list[str]]:
    if down_key not in adata.obsm:
        raise ValueError(
            f"adata.obsm has no {down_key!r}; fit_hierarchy needs all candidate downstream "
            f"features there (names in adata.uns['{down_key}_feature'])."
        )
    d = adata.obsm[down_key]
    names = list(d.columns) if hasattr(d, "columns") else None
    arr = d.to_numpy() if hasattr(d, "to_numpy") else d
    arr = np.asarray(arr.toarray() if hasattr(arr, "toarray") else arr, dtype=np.float32)
    if names is None:
        names = list(adata.uns.get(f"{down_key}_feature", [f"down_{i}" for i in range(
            arr.shape[1])]))
    if len(names) != arr.shape[1]:
        raise ValueError(f"{len(names)} names for {arr.shape[1]} columns of obsm[{down_key!r}].")
    return arr, [str(n) for n in names]


def fit_hierarchy(
    adata: AnnData,
    top_k: int = 10,
    down_key: str = DOWN_KEY,
    labels_key: str = "labels",
    method: str = "Ensemble",
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
    seed: int = 0,
) -> HierarchyResult:
    """Fit CauTrigger1L on the downstream features, pass its ``top_k`` to CauTrigger2L.

    Parameters
    ----------
    adata
        Upstream features in ``X``, the state in ``obs[labels_key]``, all candidate
        downstream features in ``obsm[down_key]`` (names in ``uns[down_key + "_feature"]``
        or DataFrame columns). Not modified: the models get new AnnData objects.
    top_k
        Downstream features kept by the 1L ranking.
    down_key
        ``obsm`` key of the downstream features.
    labels_key
        ``obs`` column of the state.
    method
        Feature-weight method used to rank (both layers).
    model_kwargs, train_kwargs
        Constructor and ``train`` arguments of both models (e.g. ``{"max_epochs": 100}``).
    seed
        Seed of both models.

    Returns
    -------
    A :class:`HierarchyResult`.
    """
    from cellsight.models.cautrigger.model import CauTrigger1L, CauTrigger2L

    x_down, names = _down_matrix(adata, down_key)
    if not 1 <= top_k <= len(names):
        raise ValueError(f"top_k={top_k} must be between 1 and {len(names)} downstream features.")
    if labels_key not in adata.obs:
        raise ValueError(f"adata.obs has no {labels_key!r} column with the states.")
    mk = dict(model_kwargs or {})
    mk.setdefault("n_state", adata.obs[labels_key].nunique())
    tk = dict(train_kwargs or {})
    down = AnnData(X=x_down, obs=adata.obs[[labels_key]].copy(),
                   var=pd.DataFrame(index=pd.Index(names)))
    CauTrigger1L.setup_anndata(down, labels_key=labels_key)
    m1 = CauTrigger1L(down, seed=seed, **mk)
    m1.train(**tk)
    w_down, _ = m1.get_up_feature_weights(method=method)
    top = [str(n) for n in w_down.index[:top_k]]
    pos = [names.index(n) for n in top]
    up = AnnData(X=adata.X.copy(), obs=adata.obs.copy(), var=adata.var.copy())
    up.obsm[DOWN_KEY] = x_down[:, pos]
    up.uns[f"{DOWN_KEY}_feature"] = np.asarray(top, dtype=object)
    CauTrigger2L.setup_anndata(up, labels_key=labels_key)
    m2 = CauTrigger2L(up, seed=seed, **mk)
    m2.train(**tk)
    w_up, _ = m2.get_up_feature_weights(method=method)
    return HierarchyResult(m1, m2, w_down, top, w_up)
