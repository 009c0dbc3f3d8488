"""Aggregation and ranking of per-cell attributions into a tidy per-feature table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cellsight.checks import check_int

__all__ = ["rank_features", "as_attribution_array", "check_top_n"]

_SORT_COLUMNS = ("attribution_abs_mean", "attribution_mean", "attribution_std")


def as_attribution_array(
    attributions: np.ndarray | pd.DataFrame, var_names: Sequence[str] | None = None
) -> tuple[np.ndarray, pd.Index]:
    """Attributions as a float array ``(cells, features[, outputs])`` and the feature names.

    Parameters
    ----------
    attributions
        Cells x features array or DataFrame (its columns name the features), or a cells x
        features x outputs array.
    var_names
        Feature names (default: the DataFrame's columns, else ``"0"``, ``"1"``, ...).
    """
    if isinstance(attributions, pd.DataFrame):
        if var_names is None:
            var_names = attributions.columns
        attributions = attributions.to_numpy()
    a = np.asarray(attributions, dtype=np.float64)
    if a.ndim not in (2, 3) or a.shape[0] == 0:
        raise ValueError(
            f"attributions must be cells x features (x outputs) with at least one cell; got "
            f"shape {a.shape}."
        )
    if not np.isfinite(a).all():
        raise ValueError(
            f"attributions contain {int((~np.isfinite(a)).sum())} NaN or infinite values; "
            "recompute them (e.g. with a baseline where the model is defined)."
        )
    if var_names is None:
        names = pd.Index([str(i) for i in range(a.shape[1])])
    else:
        names = pd.Index([str(v) for v in var_names])
        if len(names) != a.shape[1]:
            raise ValueError(
                f"{len(names)} var_names for {a.shape[1]} features; pass one name per column."
            )
    return a, names


def _group_codes(groupby, n: int) -> tuple[np.ndarray, list]:
    values = groupby.to_numpy() if isinstance(groupby, pd.Series | pd.Index) else groupby
    cat = pd.Categorical(values)
    if len(cat) != n:
        raise ValueError(f"groupby has {len(cat)} entries for {n} cells; give one per cell.")
    if (cat.codes < 0).any():
        raise ValueError(
            f"groupby has {int((cat.codes < 0).sum())} missing values; fill or drop those cells."
        )
    used = np.unique(cat.codes)
    return cat.codes, [cat.categories[c] for c in used]


def check_top_n(top_n) -> int | None:
    """``top_n`` as a positive int (or ``None``); ``TypeError`` for a non-integer or a bool.

    Callers that compute attributions first should call it before doing so.
    """
    return check_int(top_n, "top_n", allow_none=True, what="a number of features; None: all")


def rank_features(
    attributions: np.ndarray | pd.DataFrame,
    var_names: Sequence[str] | None = None,
    groupby: Sequence | pd.Series | None = None,
    *,
    output_names: Sequence[str] | None = None,
    top_n: int | None = None,
    sort_by: str = "attribution_abs_mean",
) -> pd.DataFrame:
    """Rank features by their attributions, over all cells or per group.

    Parameters
    ----------
    attributions
        Cells x features (array or DataFrame) or cells x features x outputs.
    var_names
        Feature names (default: the DataFrame's columns or positions).
    groupby
        One group per cell (e.g. ``adata.obs["cell_type"]`` or predicted classes): features
        are ranked within each group.
    output_names
        Names of the outputs of a 3-D array (default ``"0"``, ``"1"``, ...).
    top_n
        Keep the ``top_n`` best features per group and output: a positive integer (``None``:
        all).
    sort_by
        Ranking column: ``"attribution_abs_mean"`` (default), ``"attribution_mean"`` or
        ``"attribution_std"``; rank 1 is the largest.

    Returns
    -------
    A tidy DataFrame, one row per feature (and group, output), sorted by rank, with columns
    ``group`` (with ``groupby``), ``output`` (3-D input), ``feature``, ``feature_idx``,
    ``attribution_mean`` (signed mean), ``attribution_std`` (population std, ``ddof=0``),
    ``attribution_abs_mean`` (mean |attribution|), ``n_cells`` and ``rank``. FADVI's
    ``get_ranked_features`` columns are a subset.
    """
    if sort_by not in _SORT_COLUMNS:
        raise ValueError(f"sort_by={sort_by!r} must be one of {list(_SORT_COLUMNS)}.")
    top_n = check_top_n(top_n)
    a, names = as_attribution_array(attributions, var_names)
    n, g = a.shape[:2]
    a3 = a if a.ndim == 3 else a[..., None]
    k = a3.shape[2]
    if a.ndim == 3:
        outs = [str(o) for o in (range(k) if output_names is None else output_names)]
        if len(outs) != k:
            raise ValueError(f"{len(outs)} output_names for {k} outputs; give one per output.")
    if groupby is None:
        codes, groups = np.zeros(n, dtype=int), [None]
        group_codes = [0]
    else:
        codes, groups = _group_codes(groupby, n)
        group_codes = np.unique(codes).tolist()
    frames = []
    for code, name in zip(group_codes, groups):
        sub = a3[codes == code]
        stats = {
            "attribution_mean": sub.mean(0),
            "attribution_std": sub.std(0),
            "attribution_abs_mean": np.abs(sub).mean(0),
        }
        for j in range(k):
            df = pd.DataFrame(
                {
                    "feature": names,
                    "feature_idx": np.arange(g),
                    **{col: v[:, j] for col, v in stats.items()},
                    "n_cells": sub.shape[0],
                }
            )
            order = np.argsort(-df[sort_by].to_numpy(), kind="stable")
            df = df.iloc[order].reset_index(drop=True)
            df["rank"] = np.arange(1, g + 1)
            if top_n is not None:
                df = df.iloc[:top_n]
            if a.ndim == 3:
                df.insert(0, "output", outs[j])
            if groupby is not None:
                df.insert(0, "group", name)
            frames.append(df)
    return pd.concat(frames, ignore_index=True)
