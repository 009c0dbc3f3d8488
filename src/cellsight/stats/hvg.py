"""Seurat v3 highly variable genes in two streaming passes (scanpy's ``flavor="seurat_v3"``).

Pass 1 accumulates per-batch mean and variance of the counts. Between the passes, for every
batch, a LOESS curve (degree 2, ``span``) of log10(variance) on log10(mean) over the
non-constant genes gives a regularised standard deviation ``reg_std`` per gene, and the clip
value ``mean + reg_std * sqrt(n_cells)``. Pass 2 accumulates sums and sums of squares of the
counts clipped at that value, which give the normalised variance

    ``(n * mean**2 + sum(clip(x)**2) - 2 * mean * sum(clip(x))) / ((n - 1) * reg_std**2)``.

Genes are ranked per batch by normalised variance; across batches by median rank among the
batches where the gene is in the top ``n_top_genes`` and by the number of such batches. The
LOESS is scikit-misc's, the one scanpy uses, so the gene sets agree with scanpy's exactly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from cellsight.data.sparse import csr_row_index, is_csr
from cellsight.stats.base import StreamingModel, all_reduce_sum, broadcast_from_zero, world_info
from cellsight.stats.mean_var import MomentSums, combine_moments

__all__ = ["HVGSeuratV3", "loess_reg_std"]


def loess_reg_std(mean_g: np.ndarray, var_g: np.ndarray, span: float) -> np.ndarray:
    """Regularised standard deviation: ``sqrt(10 ** loess(log10 var ~ log10 mean))``.

    Constant genes (variance 0) get ``reg_std = 1``.
    """
    try:
        from skmisc.loess import loess
    except ImportError as err:  # pragma: no cover - scikit-misc is a dependency
        raise ImportError(
            "HVGSeuratV3 needs scikit-misc for its LOESS fit: pip install scikit-misc"
        ) from err
    not_const = var_g > 0
    if not_const.sum() < 4:
        raise ValueError(
            f"Only {int(not_const.sum())} gene(s) vary in a batch; the LOESS fit of Seurat v3 "
            "needs many variable genes. Use more cells or genes, or fewer batches."
        )
    fitted = np.zeros(len(mean_g), dtype=np.float64)
    model = loess(np.log10(mean_g[not_const]), np.log10(var_g[not_const]), span=span, degree=2)
    model.fit()
    fitted[not_const] = model.outputs.fitted_values
    return np.sqrt(10**fitted)


class HVGSeuratV3(StreamingModel):
    """Highly variable genes with the Seurat v3 method, in two Lightning epochs.

    Parameters
    ----------
    var_names_g
        The gene names (schema of the input, raw counts).
    n_top_genes
        Number of genes to select; a list gives several selections from one run.
    n_batch
        Number of batches (1 when there is no batch information).
    flavor
        ``"seurat_v3"``: sort by median rank, then by number of batches where the gene is
        highly variable (descending); ``"seurat_v3_paper"``: number of batches first, then
        median rank. As scanpy's flavours of the same names.
    use_batch_key
        Use the minibatches' ``batch`` codes; ``False`` treats all cells as one batch.
    span
        LOESS span (fraction of genes in each local fit).
    output_path
        CSV written by rank 0 after training (``None``: nothing written).
    batch_n_cell_minimum
        Batches with fewer cells are left out of the ranking.
    n_batch_minimum
        A gene is selected only if it is in the top ``n_top_genes`` of at least this many
        batches.
    """

    n_epochs = 2

    def __init__(
        self,
        var_names_g: Sequence[str] | np.ndarray,
        n_top_genes: int | list[int],
        n_batch: int = 1,
        flavor: Literal["seurat_v3", "seurat_v3_paper"] = "seurat_v3",
        use_batch_key: bool = False,
        span: float = 0.3,
        output_path: str | None = "hvg_seurat_v3_output.csv",
        batch_n_cell_minimum: int = 2,
        n_batch_minimum: int = 1,
    ) -> None:
        super().__init__(var_names_g)
        tops = [n_top_genes] if isinstance(n_top_genes, int | np.integer) else list(n_top_genes)
        if not tops or any(int(t) < 1 for t in tops):
            raise ValueError(f"n_top_genes={n_top_genes} must be a positive int or a list of them.")
        if max(tops) > self.n_vars:
            raise ValueError(
                f"n_top_genes={max(tops)} is larger than the number of genes ({self.n_vars})."
            )
        if flavor not in ("seurat_v3", "seurat_v3_paper"):
            raise ValueError(f"flavor={flavor!r}; use 'seurat_v3' or 'seurat_v3_paper'.")
        if not 0 < span <= 1:
            raise ValueError(f"span={span} must be in (0, 1].")
        if int(n_batch) < 1:
            raise ValueError(f"n_batch={n_batch} must be >= 1.")
        if batch_n_cell_minimum < 2:
            raise ValueError("batch_n_cell_minimum must be >= 2 (a variance needs two cells).")
        self.n_top_genes = [int(t) for t in tops]
        self.n_batch = int(n_batch)
        self.use_batch_key = bool(use_batch_key)
        self.n_batch_eff = self.n_batch if self.use_batch_key else 1
        self.flavor = flavor
        self.span = float(span)
        self.output_path = output_path
        self.batch_n_cell_minimum = int(batch_n_cell_minimum)
        self.n_batch_minimum = int(n_batch_minimum)
        b, g, f64 = self.n_batch_eff, self.n_vars, torch.float64
        # plain float64 sums: exact for integer counts in any order, so genes with the same
        # counts tie exactly (as in scanpy) however the cells are split across ranks
        self.moments = MomentSums(b, g, shifted=False)
        self.register_buffer("reg_std_bg", torch.ones(b, g, dtype=f64))
        self.register_buffer("clip_val_bg", torch.full((b, g), float("inf"), dtype=f64))
        self.register_buffer("clip_sums_bg", torch.zeros(b, g, dtype=f64))
        self.register_buffer("clip_squared_sums_bg", torch.zeros(b, g, dtype=f64))
        self.register_buffer("epochs_done", torch.zeros((), dtype=torch.long))
        self._epoch = 0

    def reset_parameters(self) -> None:
        self.moments.reset()
        self.reg_std_bg.fill_(1.0)
        self.clip_val_bg.fill_(float("inf"))
        self.clip_sums_bg.zero_()
        self.clip_squared_sums_bg.zero_()
        self.epochs_done.zero_()

    # ----------------------------------------------------------------- streaming
    def on_train_epoch_start(self, trainer) -> None:
        self.check_epoch(trainer)
        self._epoch = int(trainer.current_epoch)

    def forward(
        self,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray | None = None,
        batch_index_n: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Pass 1: fold into mean/variance sums; pass 2: into clipped sums."""
        self.check_input(x_ng, var_names_g)
        batch_n = self.batch_codes(
            batch_index_n if self.use_batch_key else None, x_ng.shape[0], self.n_batch_eff
        )
        if is_csr(x_ng):
            self._update_sparse(x_ng, batch_n)
            return {}
        x_ng = x_ng.to(torch.float64)
        if self._epoch == 0:
            self.moments.update(x_ng, batch_n)
        else:
            clipped_ng = torch.minimum(x_ng, self.clip_val_bg[batch_n])
            self.clip_sums_bg.index_add_(0, batch_n, clipped_ng)
            self.clip_squared_sums_bg.index_add_(0, batch_n, clipped_ng * clipped_ng)
        return {}

    @property
    def accepts_sparse(self) -> bool:
        """Counts are sparse; both passes only need the non-zeros (the clip values are >= 0)."""
        return True

    def _update_sparse(self, x_ng: torch.Tensor, batch_n: torch.Tensor) -> None:
        if self._epoch == 0:
            self.moments.update(x_ng, batch_n)
            return
        g = self.n_vars
        rows = batch_n[csr_row_index(x_ng)]
        flat = rows * g + x_ng.col_indices()
        values = x_ng.values().to(torch.float64)
        clipped = torch.minimum(values, self.clip_val_bg.reshape(-1)[flat])
        self.clip_sums_bg.view(-1).index_add_(0, flat, clipped)
        self.clip_squared_sums_bg.view(-1).index_add_(0, flat, clipped * clipped)

    def on_train_epoch_end(self, trainer) -> None:
        if self._epoch == 0:
            self.moments.reduce()
            if world_info()[0] == 0:
                self._fit_loess()
            broadcast_from_zero(self.reg_std_bg)
            broadcast_from_zero(self.clip_val_bg)
        else:
            all_reduce_sum(self.clip_sums_bg)
            all_reduce_sum(self.clip_squared_sums_bg)
        self.epochs_done.fill_(self._epoch + 1)

    def on_train_end(self, trainer) -> None:
        if self.output_path is not None and trainer.global_rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(self.output_path)), exist_ok=True)
            self.to_dataframe().to_csv(self.output_path)

    def _batch_mean_var(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n_b, mean_bg, var_bg) with scanpy's variance (ddof=1 unless one cell)."""
        n_b, mean_bg, m2_bg = (t.cpu().numpy() for t in self.moments.moments())
        denom = np.where(n_b > 1, n_b - 1, np.maximum(n_b, 1))[:, None]
        return n_b, mean_bg, m2_bg / denom

    def _valid_batches(self, n_b: np.ndarray) -> np.ndarray:
        valid = np.flatnonzero(n_b >= self.batch_n_cell_minimum)
        if valid.size == 0:
            raise ValueError(
                f"No batch has at least batch_n_cell_minimum={self.batch_n_cell_minimum} cells "
                f"(cells per batch: {n_b.astype(int).tolist()}); lower it or pass more cells."
            )
        return valid

    def _fit_loess(self) -> None:
        n_b, mean_bg, var_bg = self._batch_mean_var()
        for b in self._valid_batches(n_b):
            reg_std_g = loess_reg_std(mean_bg[b], var_bg[b], self.span)
            self.reg_std_bg[b] = torch.as_tensor(reg_std_g)
            self.clip_val_bg[b] = torch.as_tensor(reg_std_g * np.sqrt(n_b[b]) + mean_bg[b])

    # ----------------------------------------------------------------- results
    @property
    def norm_gene_var_bg(self) -> torch.Tensor:
        """Normalised variance per batch and gene (rows of batches left out are NaN)."""
        self._check_done()
        n_b, mean_bg, _ = self._batch_mean_var()
        n = n_b[:, None]
        s1, s2 = self.clip_sums_bg.cpu().numpy(), self.clip_squared_sums_bg.cpu().numpy()
        reg = self.reg_std_bg.cpu().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            out = (n * mean_bg**2 + s2 - 2 * s1 * mean_bg) / ((n - 1) * reg**2)
        out[n_b < self.batch_n_cell_minimum] = np.nan
        return torch.as_tensor(out)

    def _check_done(self) -> None:
        if int(self.epochs_done) < 2:
            raise ValueError(
                "HVGSeuratV3 has not finished its two passes; fit it with max_epochs=2 first."
            )

    def _gene_table(self) -> tuple[pd.DataFrame, np.ndarray]:
        n_b_t, mean_t, m2_t = self.moments.moments()
        _, mean, m2 = combine_moments(n_b_t[:, None], mean_t, m2_t)
        n_b = n_b_t.cpu().numpy()
        n_all = float(n_b.sum())
        var = m2 / (n_all - 1 if n_all > 1 else 1)
        norm_bg = self.norm_gene_var_bg.numpy()[self._valid_batches(n_b)]
        df = pd.DataFrame(
            {"means": mean.cpu().numpy(), "variances": var.cpu().numpy()},
            index=pd.Index(self.var_names_g, name="gene"),
        )
        df["variances_norm"] = norm_bg.mean(0)
        return df, norm_bg

    def _select(self, norm_bg: np.ndarray, n_top: int) -> dict[str, np.ndarray]:
        # numpy's default sort, as scanpy: genes with identical count patterns tie exactly, and
        # the same comparison-based sort on values in the same order breaks ties the same way
        order_bg = np.argsort(-norm_bg, axis=1)
        rank_bg = np.empty_like(order_bg)
        np.put_along_axis(rank_bg, order_bg, np.arange(norm_bg.shape[1])[None], axis=1)
        rank_bg = rank_bg.astype(np.float32)
        top_bg = rank_bg < n_top
        nbatches = top_bg.sum(0).astype(int)
        rank_bg[~top_bg] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN genes: median NaN
            median = np.nanmedian(rank_bg, axis=0)
        key_rank = np.where(np.isnan(median), np.inf, median)
        if self.flavor == "seurat_v3":
            order = np.lexsort((-nbatches, key_rank))
        else:
            order = np.lexsort((key_rank, -nbatches))
        order = order[nbatches[order] >= self.n_batch_minimum]
        hv = np.zeros(len(nbatches), dtype=bool)
        hv[order[:n_top]] = True
        return {"highly_variable_rank": median, "highly_variable_nbatches": nbatches,
                "highly_variable": hv}

    @property
    def hvg_dfs(self) -> dict[int, pd.DataFrame]:
        """One scanpy-like DataFrame per requested ``n_top_genes``, indexed by gene.

        Columns: ``means``, ``variances`` (ddof=1), ``variances_norm`` (mean over batches),
        ``highly_variable_rank`` (median rank), ``highly_variable_nbatches``,
        ``highly_variable``.
        """
        base, norm_bg = self._gene_table()
        out = {}
        for n_top in self.n_top_genes:
            df = base.copy()
            for col, val in self._select(norm_bg, n_top).items():
                df[col] = val
            out[n_top] = df
        return out

    @property
    def hvg_df(self) -> pd.DataFrame:
        """The DataFrame of the first ``n_top_genes``."""
        return self.hvg_dfs[self.n_top_genes[0]]

    def to_dataframe(self) -> pd.DataFrame:
        """The table written to ``output_path`` (per-selection columns suffixed by n_top)."""
        dfs = self.hvg_dfs
        if len(dfs) == 1:
            return next(iter(dfs.values()))
        base = next(iter(dfs.values()))[["means", "variances", "variances_norm"]].copy()
        for n_top, df in dfs.items():
            for col in ("highly_variable_rank", "highly_variable_nbatches", "highly_variable"):
                base[f"{col}_{n_top}"] = df[col]
        return base
