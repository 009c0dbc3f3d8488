"""One-pass per-gene mean, variance and standard deviation (per batch), reduced across ranks.

Running sums are float64. ``algorithm="shifted_data"`` subtracts a per-batch, per-gene shift
(the first cell seen) before summing, which keeps ``sum(x**2) - sum(x)**2 / n`` from cancelling
when the mean is large next to the spread. Ranks are combined with the pairwise formula of
Chan et al. (each rank's count, mean and sum of squared deviations), so ranks may use
different shifts.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from cellsight.checks import check_int
from cellsight.data.sparse import csr_row_index, is_csr
from cellsight.stats.base import StreamingModel, all_gather_stack, all_reduce_sum, world_info

__all__ = ["OnePassMeanVarStd", "MomentSums", "combine_moments", "check_ddof"]


def combine_moments(
    n_r: torch.Tensor, mean_r: torch.Tensor, m2_r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pool groups given as (count, mean, sum of squared deviations) along the first axis.

    ``n_r`` has shape ``(r, ...)`` broadcastable to ``mean_r``; empty groups (count 0) are
    ignored. Returns the pooled ``(n, mean, m2)``.
    """
    n = n_r.sum(0)
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    w_r = n_r / safe_n
    mean_r = torch.where(n_r > 0, mean_r, torch.zeros_like(mean_r))
    mean = (w_r * mean_r).sum(0)
    m2 = (torch.where(n_r > 0, m2_r, torch.zeros_like(m2_r)) + n_r * (mean_r - mean) ** 2).sum(0)
    return n, mean, m2


class MomentSums(torch.nn.Module):
    """Per-batch running count, shifted sum and shifted sum of squares (float64 buffers).

    Parameters
    ----------
    n_batch, n_vars
        Shape of the statistics.
    shifted
        Subtract a per-batch shift (the first cell of the batch seen on this rank).
    """

    def __init__(self, n_batch: int, n_vars: int, shifted: bool) -> None:
        super().__init__()
        self.shifted = shifted
        f64 = torch.float64
        self.register_buffer("x_size_b", torch.zeros(n_batch, dtype=f64))
        self.register_buffer("x_shift_bg", torch.zeros(n_batch, n_vars, dtype=f64))
        self.register_buffer("x_sums_bg", torch.zeros(n_batch, n_vars, dtype=f64))
        self.register_buffer("x_squared_sums_bg", torch.zeros(n_batch, n_vars, dtype=f64))

    def reset(self) -> None:
        """Zero every sum."""
        for buf in (self.x_size_b, self.x_shift_bg, self.x_sums_bg, self.x_squared_sums_bg):
            buf.zero_()

    def update(self, x_ng: torch.Tensor, batch_n: torch.Tensor) -> None:
        """Fold a minibatch (float64 values, long batch codes) into the sums.

        A torch CSR minibatch is folded in from its stored values alone (see
        :meth:`_update_sparse_shifted` for the shifted sums).
        """
        if is_csr(x_ng):
            batch_n = batch_n.to(x_ng.device)
            if self.shifted:
                self._update_sparse_shifted(x_ng, batch_n)
            else:
                self._update_sparse(x_ng, batch_n)
            return
        x_ng = x_ng.to(torch.float64)
        batch_n = batch_n.to(x_ng.device)
        if self.shifted:
            unseen = self.x_size_b == 0
            for b in torch.unique(batch_n).tolist():
                if unseen[b]:
                    first = int(torch.nonzero(batch_n == b)[0, 0])
                    self.x_shift_bg[b] = x_ng[first]
            x_ng = x_ng - self.x_shift_bg[batch_n]
        self.x_size_b.index_add_(0, batch_n, torch.ones_like(batch_n, dtype=torch.float64))
        self.x_sums_bg.index_add_(0, batch_n, x_ng)
        self.x_squared_sums_bg.index_add_(0, batch_n, x_ng * x_ng)

    def _update_sparse(self, x_ng: torch.Tensor, batch_n: torch.Tensor) -> None:
        values = x_ng.values().to(torch.float64)
        flat = batch_n[csr_row_index(x_ng)] * self.x_sums_bg.shape[1] + x_ng.col_indices()
        self.x_size_b.index_add_(0, batch_n, torch.ones_like(batch_n, dtype=torch.float64))
        self.x_sums_bg.view(-1).index_add_(0, flat, values)
        self.x_squared_sums_bg.view(-1).index_add_(0, flat, values * values)

    def _update_sparse_shifted(self, x_ng: torch.Tensor, batch_n: torch.Tensor) -> None:
        """Shifted sums of a CSR minibatch without densifying it.

        Per batch, the minibatch's own mean ``m`` and squared deviations ``M2`` are computed
        in two passes over the stored values (``M2 = sum_nz (x - m)^2 + n_zero m^2``), then
        added as ``sum (x - c) = n (m - c)`` and ``sum (x - c)^2 = M2 + n (m - c)^2``: the same
        sums as the dense path, as stable (no large number is squared).
        """
        g = self.x_sums_bg.shape[1]
        n_b = torch.bincount(batch_n, minlength=self.x_size_b.shape[0]).to(torch.float64)
        unseen = (self.x_size_b == 0) & (n_b > 0)
        if bool(unseen.any()):
            crow, cols, vals = x_ng.crow_indices(), x_ng.col_indices(), x_ng.values()
            for b in torch.nonzero(unseen).flatten().tolist():
                first = int(torch.nonzero(batch_n == b)[0, 0])
                lo, hi = int(crow[first]), int(crow[first + 1])
                row = torch.zeros(g, dtype=torch.float64)
                row[cols[lo:hi]] = vals[lo:hi].to(torch.float64)
                self.x_shift_bg[b] = row
        values = x_ng.values().to(torch.float64)
        flat = batch_n[csr_row_index(x_ng)] * g + x_ng.col_indices()
        sums_bg = torch.zeros_like(self.x_sums_bg)
        sums_bg.view(-1).index_add_(0, flat, values)
        nnz_bg = torch.zeros_like(self.x_sums_bg)
        nnz_bg.view(-1).index_add_(0, flat, torch.ones_like(values))
        n_b1 = n_b[:, None]
        mean_bg = sums_bg / n_b1.clamp_min(1)
        dev = values - mean_bg.view(-1)[flat]
        m2_bg = (n_b1 - nnz_bg) * mean_bg * mean_bg
        m2_bg.view(-1).index_add_(0, flat, dev * dev)
        diff_bg = torch.where(n_b1 > 0, mean_bg - self.x_shift_bg, torch.zeros_like(mean_bg))
        self.x_size_b += n_b
        self.x_sums_bg += n_b1 * diff_bg
        self.x_squared_sums_bg += m2_bg + n_b1 * diff_bg * diff_bg

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(count_b, mean_bg, m2_bg) on this rank (NaN-free: empty batches give zeros)."""
        n_b1 = self.x_size_b[:, None]
        safe = torch.where(n_b1 > 0, n_b1, torch.ones_like(n_b1))
        mean_bg = self.x_shift_bg + self.x_sums_bg / safe
        m2_bg = (self.x_squared_sums_bg - self.x_sums_bg**2 / safe).clamp_min(0.0)
        return self.x_size_b.clone(), mean_bg, m2_bg

    def reduce(self) -> None:
        """Pool every rank's sums; afterwards each rank holds the same global sums.

        Unshifted sums are summed. Shifted sums are pooled with Chan's formula and stored with
        the pooled mean as the shift (``x_sums_bg`` zero, ``x_squared_sums_bg`` the sum of
        squared deviations).
        """
        if world_info()[1] == 1:
            return
        if not self.shifted:
            # plain sums add exactly for integer data, whatever the split across ranks
            for buf in (self.x_size_b, self.x_sums_bg, self.x_squared_sums_bg):
                all_reduce_sum(buf)
            return
        n_b, mean_bg, m2_bg = self.moments()
        n_rb = all_gather_stack(n_b)
        n, mean, m2 = combine_moments(
            n_rb[:, :, None], all_gather_stack(mean_bg), all_gather_stack(m2_bg)
        )
        self.x_size_b.copy_(n_rb.sum(0))
        self.x_shift_bg.copy_(mean)
        self.x_sums_bg.zero_()
        self.x_squared_sums_bg.copy_(m2)


class OnePassMeanVarStd(StreamingModel):
    """Mean, variance and standard deviation of every gene in one pass, per batch.

    Parameters
    ----------
    var_names_g
        The gene names (schema of the input).
    algorithm
        ``"naive"`` (running sums of x and x**2, in float64) or ``"shifted_data"`` (sums of the
        data minus a per-batch shift; stable when the mean is large next to the spread). The
        class default is ``"naive"``, as Cellarium's ``OnePassMeanVarStd``;
        :func:`cellsight.pp.mean_var` and ``cellsight fit mean_var`` default to the stable
        ``"shifted_data"``.
    n_batch
        Number of batches; ``1`` ignores batch codes (``batch_key=None``).
    output_path
        CSV written (by rank 0) at the end of training with ``mean``, ``var``, ``std`` per
        gene, and per batch when ``n_batch > 1``. ``None`` writes nothing.
    batch_categories
        Names of the batches (for column names of the outputs); default ``"0"``, ``"1"``, ...

    Notes
    -----
    Variances are population variances (``ddof=0``), as numpy's ``var`` default.
    """

    def __init__(
        self,
        var_names_g: Sequence[str] | np.ndarray,
        algorithm: Literal["naive", "shifted_data"] = "naive",
        n_batch: int = 1,
        output_path: str | None = "onepass_mean_var_std_output.csv",
        batch_categories: Sequence[str] | None = None,
    ) -> None:
        super().__init__(var_names_g)
        if algorithm not in ("naive", "shifted_data"):
            raise ValueError(f"algorithm={algorithm!r}; use 'naive' or 'shifted_data'.")
        if int(n_batch) < 1:
            raise ValueError(f"n_batch={n_batch} must be >= 1.")
        self.algorithm = algorithm
        self.n_batch = int(n_batch)
        self.output_path = output_path
        cats = [str(i) for i in range(self.n_batch)] if batch_categories is None else list(
            map(str, batch_categories)
        )
        if len(cats) != self.n_batch:
            raise ValueError(
                f"batch_categories has {len(cats)} names but n_batch={self.n_batch}."
            )
        self.batch_categories = cats
        self.sums = MomentSums(self.n_batch, self.n_vars, shifted=algorithm == "shifted_data")

    def reset_parameters(self) -> None:
        self.sums.reset()

    @property
    def accepts_sparse(self) -> bool:
        """Both algorithms fold CSR minibatches from their stored values."""
        return True

    def forward(
        self,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray | None = None,
        batch_index_n: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Fold one minibatch into the running sums.

        Parameters
        ----------
        x_ng
            Values (after transforms).
        var_names_g
            Their gene names (checked against the model's).
        batch_index_n
            Batch codes, required when ``n_batch > 1``.
        """
        self.check_input(x_ng, var_names_g)
        batch_n = self.batch_codes(batch_index_n, x_ng.shape[0], self.n_batch)
        self.sums.update(x_ng, batch_n)
        return {}

    def on_train_epoch_end(self, trainer) -> None:
        self.sums.reduce()

    def on_train_end(self, trainer) -> None:
        if self.output_path is not None and trainer.global_rank == 0:
            parent = os.path.dirname(os.path.abspath(self.output_path))
            os.makedirs(parent, exist_ok=True)
            self.to_dataframe().to_csv(self.output_path)

    # ----------------------------------------------------------------- results
    @property
    def x_size_b(self) -> torch.Tensor:
        """Number of cells per batch."""
        return self.sums.x_size_b

    @property
    def batch_mean_bg(self) -> torch.Tensor:
        """Per-batch mean, shape ``(n_batch, n_genes)`` (NaN for an empty batch)."""
        n_b, mean_bg, _ = self.sums.moments()
        return torch.where(n_b[:, None] > 0, mean_bg, torch.full_like(mean_bg, float("nan")))

    @property
    def batch_var_bg(self) -> torch.Tensor:
        """Per-batch population variance, shape ``(n_batch, n_genes)``."""
        n_b, _, m2_bg = self.sums.moments()
        n_b1 = n_b[:, None]
        nan = torch.full_like(m2_bg, float("nan"))
        return torch.where(n_b1 > 0, m2_bg / n_b1.clamp_min(1), nan)

    @property
    def batch_std_bg(self) -> torch.Tensor:
        """Per-batch standard deviation, shape ``(n_batch, n_genes)``."""
        return self.batch_var_bg.sqrt()

    def _pooled(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_b, mean_bg, m2_bg = self.sums.moments()
        return combine_moments(n_b[:, None], mean_bg, m2_bg)

    @property
    def x_size(self) -> int:
        """Number of cells seen."""
        return int(self.sums.x_size_b.sum())

    @property
    def mean_g(self) -> torch.Tensor:
        """Mean of every gene over all cells."""
        return self._pooled()[1]

    @property
    def var_g(self) -> torch.Tensor:
        """Population variance of every gene over all cells."""
        n, _, m2 = self._pooled()
        return m2 / n.clamp_min(1)

    @property
    def std_g(self) -> torch.Tensor:
        """Standard deviation of every gene over all cells."""
        return self.var_g.sqrt()

    def to_dataframe(self, ddof: int = 0) -> pd.DataFrame:
        """``mean``, ``var``, ``std`` per gene (and ``mean_<batch>`` ... when ``n_batch > 1``).

        Parameters
        ----------
        ddof
            Delta degrees of freedom of the variances (0: population, 1: sample variance):
            the divisor is ``n - ddof``. An integer ``>= 0``; where a batch (or the whole data)
            has ``n <= ddof`` cells its variance and std are NaN and a ``RuntimeWarning`` is
            issued (numpy warns the same way, "degrees of freedom <= 0"; pandas gives NaN).
        """
        ddof = check_ddof(ddof)
        n, mean, m2 = self._pooled()
        var = _variance(m2, n, ddof)
        df = pd.DataFrame(
            {
                "mean": mean.cpu().numpy(),
                "var": var.cpu().numpy(),
                "std": var.sqrt().cpu().numpy(),
            },
            index=pd.Index(self.var_names_g, name="gene"),
        )
        few = [] if int(n) > ddof else ["all cells"]
        if self.n_batch > 1:
            n_b, mean_bg, m2_bg = self.sums.moments()
            var_bg = _variance(m2_bg, n_b[:, None], ddof)
            nan = n_b[:, None] <= 0
            mean_bg = mean_bg.masked_fill(nan, float("nan"))
            few += [f"batch {cat!r}" for cat, nb in zip(self.batch_categories, n_b.tolist())
                    if 0 < nb <= ddof]
            cols = {}
            for stat, arr in (("mean", mean_bg), ("var", var_bg), ("std", var_bg.sqrt())):
                for b, cat in enumerate(self.batch_categories):
                    cols[f"{stat}_{cat}"] = arr[b].cpu().numpy()
            df = pd.concat([df, pd.DataFrame(cols, index=df.index)], axis=1)
        if few:
            warnings.warn(
                f"ddof={ddof} leaves no degrees of freedom for {', '.join(few[:5])}"
                f"{', ...' if len(few) > 5 else ''} (n cells <= ddof): their variance and std "
                "are NaN. Use a smaller ddof.",
                RuntimeWarning,
                stacklevel=2,
            )
        return df


def check_ddof(ddof) -> int:
    """``ddof`` as an int ``>= 0``, or a ``TypeError`` / ``ValueError`` saying what is wrong."""
    return check_int(ddof, "ddof", minimum=0, what=(
        "the variance divides by n - ddof: 0 for the population variance, 1 for the sample "
        "variance"))


def _variance(m2: torch.Tensor, n: torch.Tensor, ddof: int) -> torch.Tensor:
    """``m2 / (n - ddof)``, NaN where ``n - ddof <= 0`` (no cells, or ddof too large)."""
    dof = n - ddof
    safe = torch.where(dof > 0, dof, torch.ones_like(dof))
    var = m2 / safe
    return torch.where(dof > 0, var, torch.full_like(var, float("nan")))
