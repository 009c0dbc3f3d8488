"""Per-gene t-digests of the non-zero values, merged across minibatches and ranks.

A t-digest (Dunning & Ertl) summarises a distribution by weighted centroids, small in the
tails and larger in the middle. Here every gene has at most ``compression`` centroids held in
fixed-size float64 buffers ``(n_genes, compression)``, so all genes are updated at once:

1. the centroids and the new non-zero values are sorted per gene;
2. each item gets the quantile of its midpoint, ``q = (cumulative weight - w / 2) / total``;
3. items fall into ``compression`` buckets evenly spaced in ``k(q) = asin(2q - 1) / pi + 1/2``
   (the arcsine scale: narrow buckets near q = 0 and 1), and each bucket becomes one centroid.

Ranks gather each other's centroids and compress them the same way. Quantiles interpolate
linearly between centroid centres at positions ``q * (n - 1) + 1/2``, with the exact minimum
and maximum at the ends; with single-value centroids this is numpy's ``"linear"`` quantile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from cellsight.checks import is_real
from cellsight.data.sparse import csr_to_scipy, is_csr
from cellsight.stats.base import StreamingModel, all_gather_stack, all_reduce_op, all_reduce_sum

__all__ = ["TDigest", "compress_centroids", "centroid_quantiles", "check_quantiles"]


def check_quantiles(q, name: str = "q") -> list[float]:
    """``q`` (one number, or a sequence of numbers in ``[0, 1]``) as a list of floats.

    ``name`` is the argument's name in the messages.
    """
    if is_real(q):
        q = [q]
    elif isinstance(q, str | bytes) or not isinstance(q, Sequence | np.ndarray):
        raise TypeError(
            f"{name} must be a number or a sequence of numbers in [0, 1], got "
            f"{type(q).__name__} {q!r}."
        )
    bad = [v for v in q if not is_real(v)]
    if bad:
        raise TypeError(
            f"{name} must hold numbers in [0, 1]; got {bad[0]!r} ({type(bad[0]).__name__})."
        )
    out = [float(v) for v in q]
    if not out:
        raise ValueError(f"{name} is empty; give at least one quantile in [0, 1], e.g. [0.5].")
    outside = [v for v in out if not 0 <= v <= 1]  # also catches NaN
    if outside:
        raise ValueError(
            f"{name}={out} must hold values in [0, 1], but {outside[0]} is outside; quantiles "
            "are fractions (0.5: the median, 0.9: the 90th percentile)."
        )
    return out


def _sort_by_value(mean_gm: torch.Tensor, weight_gm: torch.Tensor):
    key_gm = torch.where(weight_gm > 0, mean_gm, torch.full_like(mean_gm, math.inf))
    order_gm = torch.argsort(key_gm, dim=1, stable=True)
    return mean_gm.gather(1, order_gm), weight_gm.gather(1, order_gm)


def compress_centroids(
    mean_gm: torch.Tensor, weight_gm: torch.Tensor, compression: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge weighted points (per gene, zero weight = empty) into ``compression`` centroids.

    Returns ``(mean_gc, weight_gc)`` with ``c = compression``; empty centroids have weight 0.
    """
    mean_gm, weight_gm = _sort_by_value(mean_gm, weight_gm)
    total_g1 = weight_gm.sum(1, keepdim=True)
    cum_gm = weight_gm.cumsum(1)
    q_gm = (cum_gm - weight_gm / 2) / total_g1.clamp_min(1e-300)
    k_gm = torch.asin((2 * q_gm - 1).clamp(-1, 1)) / math.pi + 0.5
    bucket_gm = (k_gm * compression).floor().long().clamp(0, compression - 1)
    bucket_gm = torch.where(weight_gm > 0, bucket_gm, torch.full_like(bucket_gm, compression))
    shape = (mean_gm.shape[0], compression + 1)
    w_gc = torch.zeros(shape, dtype=weight_gm.dtype).scatter_add_(1, bucket_gm, weight_gm)
    mw_gc = torch.zeros(shape, dtype=mean_gm.dtype).scatter_add_(
        1, bucket_gm, torch.where(weight_gm > 0, mean_gm * weight_gm, torch.zeros_like(mean_gm))
    )
    w_gc, mw_gc = w_gc[:, :compression], mw_gc[:, :compression]
    mean_gc = torch.where(w_gc > 0, mw_gc / w_gc.clamp_min(1e-300), torch.zeros_like(mw_gc))
    return mean_gc, w_gc


def centroid_quantiles(
    mean_gc: torch.Tensor,
    weight_gc: torch.Tensor,
    min_g: torch.Tensor,
    max_g: torch.Tensor,
    q: Sequence[float],
) -> torch.Tensor:
    """Quantiles ``(len(q), n_genes)`` from centroids; NaN for a gene without values
    (``q``: see :func:`check_quantiles`)."""
    q = check_quantiles(q)
    mean_gc, weight_gc = _sort_by_value(mean_gc, weight_gc)
    n_g1 = weight_gc.sum(1, keepdim=True)
    centre_gc = weight_gc.cumsum(1) - weight_gc / 2
    centre_gc = torch.where(weight_gc > 0, centre_gc, torch.full_like(centre_gc, math.inf))
    # anchors: the exact minimum at position 1/2 and the maximum at n - 1/2
    pos_gm = torch.cat([torch.full_like(n_g1, 0.5), centre_gc, n_g1 - 0.5], dim=1)
    val_gm = torch.cat([min_g[:, None], mean_gc, max_g[:, None]], dim=1)
    # keep anchors inside: a centroid's centre can lie outside [1/2, n - 1/2] only by rounding
    pos_gm[:, 1:-1] = torch.minimum(torch.maximum(pos_gm[:, 1:-1], pos_gm[:, :1]), pos_gm[:, -1:])
    pos_gm[:, 1:-1] = torch.where(
        weight_gc > 0, pos_gm[:, 1:-1], torch.full_like(centre_gc, math.inf)
    )
    # the maximum anchor must sort last: move it after the last real centroid
    n_real_g = (weight_gc > 0).sum(1)
    last = pos_gm[:, -1:].clone()
    pos_gm[:, -1] = math.inf
    pos_gm = pos_gm.scatter(1, (n_real_g + 1)[:, None], last)
    val_max = val_gm[:, -1:].clone()
    val_gm = val_gm.scatter(1, (n_real_g + 1)[:, None], val_max)
    out = []
    for qi in q:
        t_g1 = qi * (n_g1 - 1) + 0.5
        hi = torch.searchsorted(pos_gm.contiguous(), t_g1.contiguous(), right=False)
        hi = hi.clamp(1, pos_gm.shape[1] - 1)
        lo = hi - 1
        p_lo, p_hi = pos_gm.gather(1, lo), pos_gm.gather(1, hi)
        v_lo, v_hi = val_gm.gather(1, lo), val_gm.gather(1, hi)
        span = (p_hi - p_lo)
        frac = torch.where(span > 0, (t_g1 - p_lo) / span, torch.zeros_like(span)).clamp(0, 1)
        val = v_lo + frac * (v_hi - v_lo)
        val = torch.where(n_g1 > 0, val, torch.full_like(val, math.nan))
        out.append(val[:, 0])
    return torch.stack(out)


def _pack_dense(x_ng: torch.Tensor):
    """The non-zero values of each gene moved to the top rows: ``(m, g)`` values, weights 1
    (0 for padding), and the count per gene; ``None`` when there is none."""
    nz_ng = x_ng != 0
    nnz_g = nz_ng.sum(0)
    m = int(nnz_g.max()) if x_ng.shape[0] else 0
    if m == 0:
        return None
    order_ng = torch.argsort((~nz_ng).to(torch.int8), dim=0, stable=True)[:m]
    return x_ng.gather(0, order_ng), nz_ng.gather(0, order_ng).to(torch.float64), nnz_g


def _pack_sparse(x_ng: torch.Tensor, n_vars: int):
    """:func:`_pack_dense` of a CSR minibatch, from its stored values (same order: by cell)."""
    csc = csr_to_scipy(x_ng).tocsc()
    csc.eliminate_zeros()
    csc.sort_indices()
    nnz_g = torch.from_numpy(np.diff(csc.indptr).astype(np.int64))
    m = int(nnz_g.max()) if csc.nnz else 0
    if m == 0:
        return None
    col = np.repeat(np.arange(n_vars), np.diff(csc.indptr))
    pos = np.arange(csc.nnz) - csc.indptr[col]
    val_mg = torch.zeros(m, n_vars, dtype=torch.float64)
    w_mg = torch.zeros(m, n_vars, dtype=torch.float64)
    val_mg[pos, col] = torch.from_numpy(csc.data.astype(np.float64))
    w_mg[pos, col] = 1.0
    return val_mg, w_mg, nnz_g


class TDigest(StreamingModel):
    """Approximate distribution of the non-zero values of every gene (t-digests).

    Parameters
    ----------
    var_names_g
        The gene names (schema of the input).
    compression
        Maximum number of centroids per gene (the t-digest's delta). Memory is
        ``2 * 8 * n_genes * compression`` bytes; the relative quantile error falls roughly as
        ``1 / compression`` in the middle of the distribution.

    Notes
    -----
    Values equal to zero are skipped (the digest describes the non-zero part of each gene, as
    Cellarium's). Negative non-zero values are counted.
    """

    def __init__(self, var_names_g: Sequence[str] | np.ndarray, compression: int = 200) -> None:
        super().__init__(var_names_g)
        if int(compression) < 2:
            raise ValueError(f"compression={compression} must be >= 2.")
        self.compression = int(compression)
        f64 = torch.float64
        g, c = self.n_vars, self.compression
        self.register_buffer("mean_gc", torch.zeros(g, c, dtype=f64))
        self.register_buffer("weight_gc", torch.zeros(g, c, dtype=f64))
        self.register_buffer("min_g", torch.full((g,), math.inf, dtype=f64))
        self.register_buffer("max_g", torch.full((g,), -math.inf, dtype=f64))
        self.register_buffer("count_g", torch.zeros(g, dtype=f64))

    @property
    def accepts_sparse(self) -> bool:
        """The digests read only the non-zeros: sparse minibatches are the natural input."""
        return True

    def reset_parameters(self) -> None:
        self.mean_gc.zero_()
        self.weight_gc.zero_()
        self.min_g.fill_(math.inf)
        self.max_g.fill_(-math.inf)
        self.count_g.zero_()

    def forward(
        self,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray | None = None,
        batch_index_n: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Fold the non-zero values of one minibatch into the digests."""
        self.check_input(x_ng, var_names_g)
        if is_csr(x_ng):
            packed = _pack_sparse(x_ng, self.n_vars)
        else:
            packed = _pack_dense(x_ng.to(torch.float64))
        if packed is None:
            return {}
        val_mg, w_mg, nnz_g = packed
        inf = torch.full_like(val_mg, math.inf)
        self.min_g = torch.minimum(self.min_g, torch.where(w_mg > 0, val_mg, inf).amin(0))
        self.max_g = torch.maximum(self.max_g, torch.where(w_mg > 0, val_mg, -inf).amax(0))
        self.count_g += nnz_g.to(torch.float64)
        mean_gm = torch.cat([self.mean_gc, val_mg.T], dim=1)
        weight_gm = torch.cat([self.weight_gc, w_mg.T], dim=1)
        self.mean_gc, self.weight_gc = compress_centroids(mean_gm, weight_gm, self.compression)
        return {}

    def on_train_epoch_end(self, trainer) -> None:
        all_reduce_op(self.min_g, "min")
        all_reduce_op(self.max_g, "max")
        all_reduce_sum(self.count_g)
        mean_rgc = all_gather_stack(self.mean_gc)
        if mean_rgc.shape[0] == 1:
            return
        weight_rgc = all_gather_stack(self.weight_gc)
        mean_gm = mean_rgc.permute(1, 0, 2).reshape(self.n_vars, -1)
        weight_gm = weight_rgc.permute(1, 0, 2).reshape(self.n_vars, -1)
        mean_gc, weight_gc = compress_centroids(mean_gm, weight_gm, self.compression)
        self.mean_gc.copy_(mean_gc)
        self.weight_gc.copy_(weight_gc)

    # ----------------------------------------------------------------- results
    def quantiles(self, q: Sequence[float] = (0.5,)) -> torch.Tensor:
        """Quantiles of the non-zero values, shape ``(len(q), n_genes)`` (NaN: no values)."""
        return centroid_quantiles(self.mean_gc, self.weight_gc, self.min_g, self.max_g, q)

    @property
    def median_g(self) -> torch.Tensor:
        """Median of the non-zero values of every gene."""
        return self.quantiles((0.5,))[0]

    def to_dataframe(self, q: Sequence[float] = (0.5,)) -> pd.DataFrame:
        """One column per quantile (named by the float ``q``) and ``n_nonzero``, by gene."""
        q = check_quantiles(q)
        qs = self.quantiles(q).cpu().numpy()
        df = pd.DataFrame({float(qi): qs[i] for i, qi in enumerate(q)},
                          index=pd.Index(self.var_names_g, name="gene"))
        df["n_nonzero"] = self.count_g.cpu().numpy()
        return df
