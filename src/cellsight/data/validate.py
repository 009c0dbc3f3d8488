"""Input validation at the boundary: clear ``ValueError`` s before any training starts.

Every check names what is wrong, where (first offending cell and gene), and what to do.
Nothing here modifies its input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

__all__ = [
    "check_not_empty",
    "check_unique_var_names",
    "check_obs_keys",
    "check_layer",
    "check_matrix_values",
    "check_query_genes",
    "check_known_categories",
    "check_continuous_obs",
    "cell_positions",
    "get_matrix",
]


_MODEL_LIKELIHOODS = ("nb", "zinb", "poisson")


def cell_positions(indices, n_obs: int, name: str = "indices") -> np.ndarray:
    """The cell positions ``indices`` selects, as int64 (``None``: all ``n_obs`` cells).

    ``indices`` is a boolean mask of length ``n_obs`` or integer positions in
    ``[0, n_obs)``, in any order, repeats allowed. Anything else (a mask of another length,
    negative or out-of-range positions, floats, names) is a ``ValueError`` or ``TypeError``
    that says what was given.
    """
    if indices is None:
        return np.arange(n_obs, dtype=np.int64)
    if isinstance(indices, (str, bytes)):
        raise TypeError(f"{name}={indices!r} must be integer positions or a boolean mask, "
                        "not a string; use adata.obs_names.get_indexer(names) for names.")
    idx = np.asarray(indices)
    if idx.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (got shape {idx.shape}).")
    if idx.dtype == bool:
        if idx.shape[0] != n_obs:
            raise ValueError(
                f"{name} is a boolean mask of length {idx.shape[0]} for {n_obs} cells; "
                "a mask needs one entry per cell."
            )
        return np.flatnonzero(idx).astype(np.int64)
    if idx.size == 0:
        return idx.astype(np.int64)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(
            f"{name} must be integer positions or a boolean mask (got dtype {idx.dtype}); "
            "use adata.obs_names.get_indexer(names) for cell names."
        )
    bad = (idx < 0) | (idx >= n_obs)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} position(s) outside [0, {n_obs}) (first: "
            f"{int(idx[bad][0])}); positions count cells from 0 and must be below the "
            "number of cells."
        )
    return idx.astype(np.int64)


def check_not_empty(adata: AnnData) -> None:
    """Reject an AnnData with zero cells or zero genes."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(
            f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes); "
            "pass an AnnData with at least one cell and one gene (check any subsetting/filtering "
            "done before this call)."
        )


def check_unique_var_names(var_names: Sequence[str] | pd.Index) -> None:
    """Reject duplicate gene names: genes are matched by name across datasets."""
    index = pd.Index(var_names)
    if not index.is_unique:
        dup = index[index.duplicated()].unique()
        shown = ", ".join(map(repr, dup[:5]))
        raise ValueError(
            f"adata.var_names has {len(dup)} duplicated name(s) "
            f"({shown}{', ...' if len(dup) > 5 else ''}); genes are matched by name, so names "
            "must be unique. Call adata.var_names_make_unique() or aggregate the duplicates first."
        )


def check_obs_keys(
    adata: AnnData,
    keys: dict[str, str | Sequence[str] | None],
    hints: dict[str, str] | None = None,
) -> None:
    """Check that every requested ``adata.obs`` column exists.

    Parameters
    ----------
    keys
        Argument name -> column name (or a list of names for ``*_keys`` arguments; ``None``
        entries are skipped). A name that is not a string is a ``TypeError``.
    hints
        Argument name -> extra advice appended to its missing-column message.
    """
    for arg, value in keys.items():
        if value is None:
            continue
        if isinstance(value, str):
            names = [value]
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            names = list(value)
        else:
            want = "a list of obs column names" if arg.endswith("_keys") else "an obs column name"
            raise TypeError(f"{arg}={value!r} must be {want} (str).")
        for name in names:
            if name not in adata.obs.columns:
                cols = list(adata.obs.columns)
                hint = (hints or {}).get(arg, "")
                raise ValueError(
                    f"{arg}={name!r} is not a column of adata.obs (columns: {cols[:20]}"
                    f"{' ...' if len(cols) > 20 else ''}); add the column or pass an existing key."
                    + (f" {hint}" if hint else "")
                )


def check_layer(adata: AnnData, layer: str | None) -> None:
    """Check that ``adata.layers[layer]`` exists (``None`` means ``adata.X``)."""
    if layer is None:
        if adata.X is None:
            raise ValueError(
                "adata.X is None; put the counts in adata.X or pass layer='<name>' for a layer."
            )
        return
    if layer not in adata.layers:
        raise ValueError(
            f"layer={layer!r} is not in adata.layers (layers: {list(adata.layers.keys())}); "
            "pass an existing layer, or layer=None to use adata.X."
        )


def get_matrix(adata: AnnData, layer: str | None):
    """Return ``adata.X`` or ``adata.layers[layer]`` (no copy)."""
    return adata.X if layer is None else adata.layers[layer]


def _first_bad(adata: AnnData, x, mask_fn) -> tuple[int, str, str]:
    """Count entries where ``mask_fn`` is true and locate the first (cell, gene)."""
    if sp.issparse(x):
        coo = x.tocoo()
        bad = mask_fn(coo.data)
        n_bad = int(bad.sum())
        if n_bad == 0:
            return 0, "", ""
        order = np.lexsort((coo.col[bad], coo.row[bad]))
        r, c = coo.row[bad][order[0]], coo.col[bad][order[0]]
    else:
        arr = np.asarray(x)
        bad = mask_fn(arr)
        n_bad = int(bad.sum())
        if n_bad == 0:
            return 0, "", ""
        r, c = np.argwhere(bad)[0]
    return n_bad, str(adata.obs_names[r]), str(adata.var_names[c])


def check_matrix_values(
    adata: AnnData,
    layer: str | None,
    *,
    require_counts: bool,
    likelihood: str | None = None,
) -> None:
    """Reject NaN/inf, and (for count likelihoods) negative or non-integer values.

    Parameters
    ----------
    adata
        The data.
    layer
        ``None`` for ``adata.X`` or a layer name.
    require_counts
        Whether the model's likelihood needs raw integer counts.
    likelihood
        What needs the counts, for messages: a model's likelihood name (``"nb"``, ``"zinb"``,
        ``"poisson"``; the message then suggests ``gene_likelihood='normal'`` for normalised
        data) or a phrase for other computations (``"Seurat v3 highly variable gene
        selection"``).
    """
    x = get_matrix(adata, layer)
    where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if getattr(adata, "isbacked", False) and layer is None:
        return  # backed data is validated per chunk by the streaming loaders
    dtype = getattr(x, "dtype", None)
    if dtype is not None and not np.issubdtype(dtype, np.number) and dtype != np.bool_:
        raise TypeError(
            f"{where} has dtype {dtype}, not numbers; convert it first, e.g. "
            f"{where} = {where}.astype(np.float32) (check for strings in the matrix)."
        )
    with np.errstate(invalid="ignore"):
        n, cell, gene = _first_bad(adata, x, lambda a: ~np.isfinite(a))
    if n:
        raise ValueError(
            f"{where} has {n} NaN or infinite value(s) (first at cell {cell!r}, gene {gene!r}); "
            "remove or impute them first."
        )
    if not require_counts:
        return
    model_lk = likelihood in _MODEL_LIKELIHOODS
    lk = (f"the {likelihood!r} likelihood" if model_lk else likelihood) if likelihood else (
        "this model")
    n, cell, gene = _first_bad(adata, x, lambda a: a < 0)
    if n:
        raise ValueError(
            f"{where} has {n} negative value(s) (first at cell {cell!r}, gene {gene!r}); {lk} "
            "needs raw counts. Pass raw counts in a layer with layer='counts'"
            + (", or use gene_likelihood='normal' for normalised data." if model_lk else ".")
        )
    n, cell, gene = _first_bad(adata, x, lambda a: a != np.round(a))
    if n:
        raise ValueError(
            f"{where} has {n} non-integer value(s) (first at cell {cell!r}, gene {gene!r}); {lk} "
            "needs raw integer counts, not normalised or log-transformed data. Pass raw counts "
            "in a layer with layer='counts'."
        )


def describe_gene_difference(
    reference: Sequence[str] | pd.Index, other: Sequence[str] | pd.Index,
    reference_name: str = "the model", other_name: str = "the query",
) -> str:
    """How ``other``'s gene names differ from ``reference``'s, for an error message: the
    missing and the unexpected genes (the first five of each), repeated names, or the first
    position where the same genes come in another order ("" when they are equal)."""
    ref, oth = pd.Index(reference), pd.Index(other)

    def first(names: pd.Index) -> str:
        return ", ".join(map(repr, names[:5])) + (", ..." if len(names) > 5 else "")

    missing = ref.difference(oth, sort=False)
    extra = oth.difference(ref, sort=False)
    parts = []
    if len(missing):
        parts.append(f"{len(missing)} gene(s) of {reference_name} are missing from "
                     f"{other_name} ({first(missing)})")
    if len(extra):
        parts.append(f"{len(extra)} gene(s) of {other_name} are not in {reference_name} "
                     f"({first(extra)})")
    if not parts and len(ref) != len(oth):
        parts.append(f"{other_name} has {len(oth)} gene names (with repeats) against "
                     f"{len(ref)}")
    if not parts and not (ref == oth).all():
        pos = int(np.flatnonzero(ref.to_numpy() != oth.to_numpy())[0])
        parts.append(
            f"the genes are the same but in another order (first difference at position {pos}: "
            f"{reference_name} has {ref[pos]!r}, {other_name} has {oth[pos]!r})"
        )
    return "; ".join(parts)


def check_query_genes(reference: Sequence[str] | pd.Index, query: Sequence[str] | pd.Index) -> None:
    """Check that a query has exactly the reference genes in the same order.

    Raises a ``ValueError`` saying which genes are missing, unexpected, repeated or reordered.
    """
    parts = describe_gene_difference(reference, query)
    if not parts:
        return
    raise ValueError(
        f"The query's genes do not match the model's: {parts}. Subset and reorder the query "
        "with adata[:, model.var_names] (after adding any missing genes as zero columns)."
    )


def check_known_categories(
    values: pd.Series, known: Sequence, key: str, *, allow: Sequence = ()
) -> None:
    """Reject categories of a query column the model never saw."""
    if values.isna().any():
        first = values.index[values.isna().to_numpy()][0]
        raise ValueError(
            f"adata.obs[{key!r}] has {int(values.isna().sum())} missing value(s) (first at cell "
            f"{first!r}); fill them with a known category."
        )
    seen = pd.Index(pd.unique(values.astype(str)))
    unknown = seen.difference(pd.Index(list(map(str, known)) + list(map(str, allow))))
    if len(unknown):
        raise ValueError(
            f"adata.obs[{key!r}] has categories the model was not trained with: "
            f"{list(unknown[:10])}; known categories are {list(map(str, known))[:20]}. Map them to "
            "known categories, or train a model that includes them."
        )


def check_continuous_obs(adata: AnnData, keys: Sequence[str]) -> None:
    """Continuous covariates must be numeric and finite."""
    for key in keys:
        col = adata.obs[key]
        if not pd.api.types.is_numeric_dtype(col):
            raise ValueError(
                f"adata.obs[{key!r}] is a continuous covariate but has dtype {col.dtype}; pass a "
                "numeric column, or register it with categorical_covariate_keys instead."
            )
        vals = col.to_numpy(dtype=float)
        bad = ~np.isfinite(vals)
        if bad.any():
            raise ValueError(
                f"adata.obs[{key!r}] has {int(bad.sum())} NaN/infinite value(s) (first at cell "
                f"{adata.obs_names[np.flatnonzero(bad)[0]]!r}); fill or drop those cells."
            )
