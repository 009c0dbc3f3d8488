"""Per-minibatch transforms for streaming pipelines.

Each transform is a ``torch.nn.Module`` mapping ``x_ng -> x_ng``. Transforms that depend on
gene names are bound to the genes of their input with :meth:`setup_genes`, which returns the
genes of their output (so a chain's output genes are known before any data is read).
:class:`cellsight.stats.base.StatisticPlan` binds and applies them in order.

Transforms that map zero to zero (``keeps_zeros = True``: normalise total, log1p, gene
filter) also take a torch CSR minibatch and return one, touching only the stored values;
:func:`apply_transforms` densifies a sparse minibatch just before the first transform that
does not (z-score), so a chain costs work in proportion to the non-zeros as long as it can.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from cellsight.checks import is_real
from cellsight.data.sparse import (
    csr_row_index,
    csr_tensor,
    csr_to_scipy,
    csr_with_values,
    is_csr,
)

__all__ = [
    "Densify", "NormalizeTotal", "Log1p", "ZScore", "Filter", "apply_transforms",
    "bind_transforms", "standard_transforms",
]


def check_nonnegative(x_ng: torch.Tensor, step: str, off: str) -> None:
    """Reject a minibatch with negative values before ``step`` transforms it.

    ``off`` says how to turn the step off (for the message).

    A CSR minibatch is checked on its stored values only (work ~ non-zeros); the check is a
    single ``min`` reduction, so it costs less than the transform it guards.
    """
    values = x_ng.values() if is_csr(x_ng) else x_ng
    if values.numel() == 0 or not bool(values.min() < 0):
        return
    n_neg = int((values < 0).sum())
    raise ValueError(
        f"{step} needs non-negative input (raw or normalised counts), but a minibatch has "
        f"{n_neg} negative value(s) (min {float(values.min()):.4g}); the data look already "
        "scaled or centred. Pass counts (e.g. a counts layer with layer='counts'), or "
        f"use {off} for data already on a log or z-scored scale."
    )


class GeneTransform(torch.nn.Module):
    """A transform that keeps the genes as they are (the default :meth:`setup_genes`).

    ``keeps_zeros``: the transform maps 0 to 0 and accepts (and returns) torch CSR tensors.
    """

    keeps_zeros: bool = False

    def setup_genes(self, var_names_g: np.ndarray) -> np.ndarray:
        """Bind to the input genes; return the output genes."""
        return np.asarray(var_names_g).astype(str)


class Densify(GeneTransform):
    """Turn a sparse minibatch (COO/CSR tensor) into a dense one; dense input passes through."""

    keeps_zeros = False  # its whole point is to leave the sparse layout

    def forward(self, x_ng: torch.Tensor) -> torch.Tensor:
        return x_ng.to_dense() if x_ng.layout != torch.strided else x_ng


class NormalizeTotal(GeneTransform):
    """Scale every cell to ``target_count`` total counts (scanpy's ``normalize_total``).

    Cells with zero total stay zero. The input must be non-negative (counts): a negative value
    raises a ``ValueError`` (a negative total would flip the signs of the cell).

    Parameters
    ----------
    target_count
        Total of every cell after scaling (scanpy's ``target_sum``).
    eps
        Added to the totals (0: exact scanpy behaviour).
    """

    def __init__(self, target_count: float = 1e4, eps: float = 0.0) -> None:
        super().__init__()
        if target_count <= 0:
            raise ValueError(f"target_count={target_count} must be > 0.")
        self.target_count = float(target_count)
        self.eps = float(eps)

    keeps_zeros = True

    def _scale(self, total_n: torch.Tensor) -> torch.Tensor:
        total_n = total_n + self.eps
        return self.target_count / torch.where(total_n == 0, torch.ones_like(total_n), total_n)

    def forward(self, x_ng: torch.Tensor) -> torch.Tensor:
        check_nonnegative(x_ng, "normalize_total", "normalize_total=None (no NormalizeTotal)")
        if is_csr(x_ng):
            rows = csr_row_index(x_ng)
            values = x_ng.values()
            total_n = torch.zeros(x_ng.shape[0], dtype=values.dtype).index_add_(0, rows, values)
            return csr_with_values(x_ng, values * self._scale(total_n)[rows])
        return x_ng * self._scale(x_ng.sum(dim=1, keepdim=True))


class Log1p(GeneTransform):
    """``log(1 + x)`` (natural log, as scanpy's ``log1p``).

    The input must be non-negative (raw or normalised counts): a minibatch with a negative
    value raises a ``ValueError`` before it is transformed (``log1p`` of values below -1 is
    NaN, and of values in (-1, 0) negative).
    """

    keeps_zeros = True

    def forward(self, x_ng: torch.Tensor) -> torch.Tensor:
        check_nonnegative(x_ng, "log1p", "log1p=False (no Log1p)")
        if is_csr(x_ng):
            return csr_with_values(x_ng, torch.log1p(x_ng.values()))
        return torch.log1p(x_ng)


def _read_stats_table(path: str) -> pd.DataFrame:
    if not os.path.exists(path):
        raise ValueError(
            f"stats_path {path!r} does not exist; run the mean/var step first (cellsight fit "
            "mean_var, or cellsight.pp.mean_var(..., output_path=...))."
        )
    df = pd.read_csv(path, index_col=0)
    for col in ("mean", "std"):
        if col not in df.columns:
            raise ValueError(
                f"{path!r} has no {col!r} column (columns: {list(df.columns)[:10]}); pass the "
                "CSV written by OnePassMeanVarStd (output_path) or cellsight.pp.mean_var."
            )
    df.index = df.index.astype(str)
    return df


def check_max_value(max_value) -> float | None:
    """``max_value`` of :class:`ZScore` as a float ``> 0`` (or ``None``), else a clear error."""
    if max_value is None:
        return None
    if not is_real(max_value):
        raise TypeError(
            f"max_value must be a number or None, got {type(max_value).__name__} {max_value!r}."
        )
    if not max_value > 0:  # also rejects NaN
        raise ValueError(
            f"max_value={max_value} must be > 0: z-scores are clipped to "
            "[-max_value, max_value], so max_value <= 0 would make every value 0; pass "
            "max_value=None for no clipping."
        )
    return float(max_value)


class ZScore(GeneTransform):
    """Centre and scale every gene: ``(x - mean_g) / std_g`` (scanpy's ``scale``).

    Genes with zero standard deviation are only centred (scanpy sets their std to 1).

    Parameters
    ----------
    mean_g, std_g
        Per-gene mean and standard deviation, in the order of ``var_names_g``.
    var_names_g
        Genes of ``mean_g``/``std_g``; the transform picks them by name for its input.
    stats_path
        Instead of the arrays: a CSV with ``mean`` and ``std`` columns indexed by gene (the
        output of :class:`cellsight.stats.OnePassMeanVarStd` or ``cellsight.pp.mean_var``), so
        a mean/var run can feed a z-scored PCA run.
    max_value
        Clip the result to ``[-max_value, max_value]`` (scanpy's ``max_value``); must be
        ``> 0`` (``None``: no clipping).
    """

    def __init__(
        self,
        mean_g: Sequence[float] | torch.Tensor | None = None,
        std_g: Sequence[float] | torch.Tensor | None = None,
        var_names_g: Sequence[str] | None = None,
        stats_path: str | None = None,
        max_value: float | None = None,
    ) -> None:
        super().__init__()
        max_value = check_max_value(max_value)
        if stats_path is not None:
            df = _read_stats_table(stats_path)
            mean_g, std_g, var_names_g = df["mean"].to_numpy(), df["std"].to_numpy(), df.index
        if mean_g is None or std_g is None or var_names_g is None:
            raise ValueError(
                "ZScore needs mean_g, std_g and var_names_g, or stats_path (a mean/var CSV)."
            )
        mean = torch.as_tensor(np.asarray(mean_g, dtype=np.float64))
        std = torch.as_tensor(np.asarray(std_g, dtype=np.float64))
        names = np.asarray(var_names_g).astype(str)
        if not (mean.shape == std.shape == names.shape):
            raise ValueError(
                f"mean_g {tuple(mean.shape)}, std_g {tuple(std.shape)} and var_names_g "
                f"{names.shape} must have the same length."
            )
        if not torch.isfinite(mean).all() or not torch.isfinite(std).all() or (std < 0).any():
            raise ValueError("mean_g and std_g must be finite, and std_g >= 0.")
        self.stats_names = names
        self.max_value = max_value
        self.register_buffer("all_mean_g", mean)
        self.register_buffer("all_std_g", torch.where(std == 0, torch.ones_like(std), std))
        self.register_buffer("mean_g", mean.clone())
        self.register_buffer("std_g", self.all_std_g.clone())

    def setup_genes(self, var_names_g: np.ndarray) -> np.ndarray:
        names = np.asarray(var_names_g).astype(str)
        index = pd.Index(self.stats_names)
        pos = index.get_indexer(names)
        if (pos < 0).any():
            missing = names[pos < 0]
            raise ValueError(
                f"ZScore has no mean/std for {len(missing)} input gene(s) "
                f"({', '.join(repr(str(m)) for m in missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}); "
                "compute the statistics on the same genes (after the same Filter)."
            )
        idx = torch.as_tensor(pos)
        self.mean_g = self.all_mean_g[idx].clone()
        self.std_g = self.all_std_g[idx].clone()
        return names

    def forward(self, x_ng: torch.Tensor) -> torch.Tensor:
        out = (x_ng - self.mean_g.to(x_ng.dtype)) / self.std_g.to(x_ng.dtype)
        if self.max_value is not None:
            out = out.clamp(-self.max_value, self.max_value)
        return out


class Filter(GeneTransform):
    """Keep the genes of ``filter_list``, in that order.

    Parameters
    ----------
    filter_list
        Gene names to keep, in the output order.
    missing
        What to do with names of ``filter_list`` absent from the input: ``"error"`` (a
        ``ValueError`` listing them) or ``"zero"`` (an all-zero column).
    """

    def __init__(
        self, filter_list: Sequence[str], missing: Literal["error", "zero"] = "error"
    ) -> None:
        super().__init__()
        names = np.asarray(list(filter_list)).astype(str)
        if names.size == 0:
            raise ValueError("filter_list is empty; pass at least one gene name.")
        if not pd.Index(names).is_unique:
            raise ValueError("filter_list has duplicated gene names; pass each gene once.")
        if missing not in ("error", "zero"):
            raise ValueError(f"missing={missing!r}; use 'error' or 'zero'.")
        self.filter_list = names
        self.missing = missing
        self.register_buffer("index_g", torch.zeros(0, dtype=torch.long))
        self.register_buffer("present_g", torch.zeros(0, dtype=torch.bool))

    def setup_genes(self, var_names_g: np.ndarray) -> np.ndarray:
        pos = pd.Index(np.asarray(var_names_g).astype(str)).get_indexer(self.filter_list)
        absent = pos < 0
        if absent.any() and self.missing == "error":
            miss = self.filter_list[absent]
            raise ValueError(
                f"{len(miss)} gene(s) of filter_list are not in the data "
                f"({', '.join(repr(str(m)) for m in miss[:5])}"
                f"{', ...' if len(miss) > 5 else ''}); check the gene names (genes= or "
                "filter_list) against var_names and remove the unknown ones, or give Filter "
                "missing='zero' to add them as zero columns."
            )
        self.index_g = torch.as_tensor(np.where(absent, 0, pos), dtype=torch.long)
        self.present_g = torch.as_tensor(~absent)
        return self.filter_list.copy()

    keeps_zeros = True

    def forward(self, x_ng: torch.Tensor) -> torch.Tensor:
        if self.index_g.numel() != len(self.filter_list):
            raise ValueError(
                "Filter is not bound to input genes; call setup_genes(var_names) first."
            )
        if is_csr(x_ng):
            present = self.present_g.numpy()
            cols = self.index_g.numpy()[present]
            picked = csr_to_scipy(x_ng)[:, cols]
            if not present.all():  # absent genes: empty columns at their positions
                where = np.flatnonzero(present)
                picked = picked.tocoo()
                picked = picked.__class__(
                    (picked.data, (picked.row, where[picked.col])),
                    shape=(x_ng.shape[0], len(self.filter_list)),
                ).tocsr()
            return csr_tensor(picked, dtype=x_ng.values().dtype)
        out = x_ng.index_select(1, self.index_g.to(x_ng.device))
        if not bool(self.present_g.all()):
            out = out * self.present_g.to(out.device, out.dtype)
        return out


def apply_transforms(
    transforms: Sequence[torch.nn.Module], x_ng: torch.Tensor, keep_sparse: bool = False
) -> torch.Tensor:
    """Apply bound transforms in order.

    A CSR ``x_ng`` stays sparse through transforms with ``keeps_zeros`` and is densified
    before the first other one; the result is dense unless ``keep_sparse``.
    """
    for t in transforms:
        if is_csr(x_ng) and not getattr(t, "keeps_zeros", False):
            x_ng = x_ng.to_dense()
        x_ng = t(x_ng)
    if is_csr(x_ng) and not keep_sparse:
        x_ng = x_ng.to_dense()
    return x_ng


def bind_transforms(
    transforms: Sequence[torch.nn.Module], var_names_g: Sequence[str] | np.ndarray
) -> np.ndarray:
    """Bind a chain to the input genes, in order; return the genes of its output.

    Call it before streaming: an unknown gene of a :class:`Filter` (or a gene without
    statistics in a :class:`ZScore`) fails here, before any data is read.
    """
    names = np.asarray(var_names_g).astype(str)
    for t in transforms:
        if hasattr(t, "setup_genes"):
            names = t.setup_genes(names)
    return names


def standard_transforms(
    normalize_total: float | None = None,
    log1p: bool = False,
    genes: Sequence[str] | None = None,
    missing: Literal["error", "zero"] = "error",
) -> list[torch.nn.Module]:
    """The usual chain: normalise total, log1p, then keep ``genes`` (each optional).

    Parameters
    ----------
    normalize_total
        Target total per cell (``None``: no normalisation).
    log1p
        Apply ``log(1 + x)``.
    genes
        Keep these genes, in this order, after normalising (totals use all genes, as in the
        usual scanpy order: normalise, log, then subset to highly variable genes).
    missing
        Genes of ``genes`` absent from the data: ``"error"`` or ``"zero"``.
    """
    out: list[torch.nn.Module] = []
    if normalize_total is not None:
        out.append(NormalizeTotal(normalize_total))
    if log1p:
        out.append(Log1p())
    if genes is not None:
        out.append(Filter(genes, missing=missing))
    return out
