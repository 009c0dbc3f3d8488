"""Incremental, distributed PCA (Ross et al. 2008; Iwen & Ong 2016).

Each rank keeps a truncated SVD ``S_q, V_qg`` of its centred data and the running mean. A
minibatch ``x_ng`` with mean ``m_b`` is folded in by a truncated SVD of the stacked matrix

    ``[S V; x - m_b; sqrt(n_old n / (n_old + n)) (m_b - m_old)]``

whose last row is the mean correction. Merging two ranks is the same step with the second
rank's ``S V`` in place of the minibatch. At the end of the epoch every rank gathers all
partial SVDs and merges them in rank order, so all ranks hold the same result.

The model keeps ``n_components + n_oversamples`` directions internally: the directions just
below the requested ones carry variance that later minibatches can promote, and dropping them
at every step is what biases a plain incremental PCA. The per-gene variances are accumulated
exactly (float64) for the explained variance ratio.

Truncating at every minibatch is exact only when the spectrum beyond the kept directions is
negligible; on single-cell data it is not (the tail of z-scored genes is flat), and the
trailing components' variances come out several percent low (sklearn's ``IncrementalPCA`` is
off by as much). With ``algorithm="gram"`` the model instead accumulates the shifted
cross-product matrix ``sum (x - c)^T (x - c)`` (g x g, float64), sums it across ranks with
Chan's correction for the ranks' different means, and takes its top eigenpairs at the end:
one pass, exact, and affordable up to a few thousand genes (the usual PCA input: highly
variable genes). ``"auto"`` uses it up to :data:`GRAM_MAX_GENES` genes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cellsight.checks import check_int
from cellsight.data.sparse import csr_to_scipy, csr_with_values, is_csr
from cellsight.stats.base import StreamingModel, all_gather_stack, all_reduce_sum, world_info
from cellsight.stats.mean_var import combine_moments

__all__ = ["IncrementalPCA", "truncated_svd", "check_n_components", "GRAM_MAX_GENES"]

# "auto" accumulates the exact g x g matrix up to this many genes (128 MiB in float64)
GRAM_MAX_GENES = 4096
# minibatches with fewer non-zeros than this fraction take the sparse cross-product
SPARSE_DENSITY = 0.25


def truncated_svd(
    a_mg: torch.Tensor, q: int, niter: int, generator_seed: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``q`` singular values and right vectors of ``a_mg``: ``(S_q, V_qg)``.

    A randomised range finder with ``niter`` power iterations (Halko et al.) when ``q`` is
    well below the matrix size, an exact SVD otherwise. The random start is seeded.
    """
    m, g = a_mg.shape
    small = min(m, g)
    if 2 * q >= small or small <= 256:
        _, s, vh = torch.linalg.svd(a_mg, full_matrices=False)
        return s[:q], vh[:q]
    gen = torch.Generator().manual_seed(int(generator_seed or 0))
    p = min(small, q + max(10, q // 2))
    omega_gp = torch.randn(g, p, generator=gen, dtype=a_mg.dtype).to(a_mg.device)
    y_mp = a_mg @ omega_gp
    basis_mp, _ = torch.linalg.qr(y_mp)
    for _ in range(niter):
        z_gp, _ = torch.linalg.qr(a_mg.T @ basis_mp)
        basis_mp, _ = torch.linalg.qr(a_mg @ z_gp)
    b_pg = basis_mp.T @ a_mg
    _, s, vh = torch.linalg.svd(b_pg, full_matrices=False)
    return s[:q], vh[:q]


def _csr(x_ng: torch.Tensor) -> sp.csr_matrix:
    """A CPU tensor (dense or CSR) as a SciPy CSR matrix."""
    if is_csr(x_ng):
        return csr_to_scipy(x_ng)
    return csr_to_scipy(x_ng.contiguous().to_sparse_csr())


def _flip_signs(v_kg: torch.Tensor) -> torch.Tensor:
    """Make the largest-magnitude loading of every component positive (deterministic signs)."""
    idx = v_kg.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(v_kg.gather(1, idx))
    sign[sign == 0] = 1
    return v_kg * sign


def check_n_components(n_components, n_vars: int, n_obs: int | None = None) -> int:
    """``n_components`` as an int in ``[1, min(n_obs, n_vars)]``, else a clear error.

    ``n_obs`` (when known before the pass) bounds it too: ``n`` cells span at most ``n``
    directions, and components beyond them would be all-zero.
    """
    n_components = check_int(n_components, "n_components")
    if n_components > n_vars:
        raise ValueError(
            f"n_components={n_components} is more than the number of genes ({n_vars}); "
            f"ask for at most {n_vars} components (or use more genes)."
        )
    if n_obs is not None and n_components > n_obs:
        raise ValueError(
            f"n_components={n_components} is more than the number of cells (n_obs={n_obs}): "
            f"{n_obs} cells span at most {n_obs} directions, so the extra components would be "
            f"all zero; ask for at most {n_obs} components."
        )
    return int(n_components)


class IncrementalPCA(StreamingModel):
    """Principal components of a data set streamed in minibatches and across ranks.

    Parameters
    ----------
    var_names_g
        The gene names (schema of the input).
    n_components
        Number of principal components: an integer in ``[1, n_genes]`` (``cellsight.tl.pca``
        and ``cellsight fit ipca`` also require ``<= n_cells``).
    svd_lowrank_niter
        Power iterations of the randomised truncated SVD of each update.
    perform_mean_correction
        Centre the data with the running mean (``False``: the data are taken as centred, e.g.
        after a z-score transform with the global mean, and are not centred again).
    n_oversamples
        Extra directions kept internally beyond ``n_components`` (accuracy of the trailing
        components); 0 gives the textbook incremental PCA.
    algorithm
        ``"incremental"`` (merging truncated SVDs, any number of genes), ``"gram"`` (exact
        one-pass cross-product matrix, g x g memory) or ``"auto"`` (``"gram"`` up to
        :data:`GRAM_MAX_GENES` genes).
    seed
        Seed of the randomised SVDs.
    """

    def __init__(
        self,
        var_names_g: Sequence[str] | np.ndarray,
        n_components: int,
        svd_lowrank_niter: int = 2,
        perform_mean_correction: bool = True,
        n_oversamples: int = 10,
        algorithm: Literal["auto", "incremental", "gram"] = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__(var_names_g)
        check_n_components(n_components, self.n_vars)
        if svd_lowrank_niter < 0 or n_oversamples < 0:
            raise ValueError("svd_lowrank_niter and n_oversamples must be >= 0.")
        self.n_components = int(n_components)
        self.svd_lowrank_niter = int(svd_lowrank_niter)
        self.perform_mean_correction = bool(perform_mean_correction)
        self.n_oversamples = int(n_oversamples)
        self.n_internal = min(self.n_vars, self.n_components + self.n_oversamples)
        self.seed = int(seed)
        if algorithm not in ("auto", "incremental", "gram"):
            raise ValueError(f"algorithm={algorithm!r}; use 'auto', 'incremental' or 'gram'.")
        if algorithm == "auto":
            algorithm = "gram" if self.n_vars <= GRAM_MAX_GENES else "incremental"
        self.algorithm = algorithm
        q, g, f64 = self.n_internal, self.n_vars, torch.float64
        gram = algorithm == "gram"
        self.register_buffer("gram_gg", torch.zeros((g, g) if gram else (0, 0), dtype=f64))
        self.register_buffer("gram_sums_g", torch.zeros(g if gram else 0, dtype=f64))
        self.register_buffer("gram_shift_g", torch.zeros(g if gram else 0, dtype=f64))
        # sums and count of the sparse minibatches whose raw X^T X is in gram_gg (not shifted)
        self.register_buffer("gram_raw_sums_g", torch.zeros(g if gram else 0, dtype=f64))
        self.register_buffer("gram_raw_n", torch.zeros((), dtype=f64))
        self.register_buffer("S_q", torch.zeros(q, dtype=f64))
        self.register_buffer("V_qg", torch.zeros(q, g, dtype=f64))
        self.register_buffer("x_mean_g", torch.zeros(g, dtype=f64))
        self.register_buffer("x_m2_g", torch.zeros(g, dtype=f64))
        self.register_buffer("x_size", torch.zeros((), dtype=f64))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("finished_at", torch.zeros((), dtype=torch.long))

    def reset_parameters(self) -> None:
        for buf in (self.S_q, self.V_qg, self.x_mean_g, self.x_m2_g, self.x_size, self.n_updates,
                    self.gram_gg, self.gram_sums_g, self.gram_shift_g, self.finished_at,
                    self.gram_raw_sums_g, self.gram_raw_n):
            buf.zero_()

    # ----------------------------------------------------------------- exact (gram) path
    @property
    def accepts_sparse(self) -> bool:
        """The exact (gram) path takes CSR minibatches: ``X^T X`` costs ~ non-zeros x genes."""
        return self.algorithm == "gram"

    def _gram_update(self, x_ng: torch.Tensor) -> None:
        n = x_ng.shape[0]
        if is_csr(x_ng):
            x_sp = _csr(x_ng)
            if self.perform_mean_correction and float(self.x_size) == 0:
                self.gram_shift_g.copy_(torch.from_numpy(np.asarray(x_sp.mean(0)).ravel()))
            nnz_g = torch.from_numpy(np.bincount(x_sp.indices, minlength=self.n_vars))
            self._gram_update_sparse(x_sp, nnz_g, self.gram_shift_g)
            self.x_size += n
            return
        if self.perform_mean_correction and float(self.x_size) == 0:
            self.gram_shift_g.copy_(x_ng.mean(0))
        c_g = self.gram_shift_g
        nnz_g = (x_ng != 0).sum(0)
        if x_ng.device.type == "cpu" and int(nnz_g.sum()) < SPARSE_DENSITY * x_ng.numel():
            self._gram_update_sparse(_csr(x_ng), nnz_g, c_g)
        else:
            xs_ng = x_ng - c_g
            self.gram_gg.addmm_(xs_ng.T, xs_ng)
            self.gram_sums_g += xs_ng.sum(0)
        self.x_size += n

    def _gram_update_sparse(
        self, x_sp: sp.csr_matrix, nnz_g: torch.Tensor, c_g: torch.Tensor
    ) -> None:
        """``(x - c)^T (x - c)`` of a sparse minibatch in ``O(nnz * g)`` instead of ``n g^2``.

        For a gene with at least one zero the shift ``c`` is expanded analytically,
        ``X^T X - c s^T - s c^T + n c c^T``: a gene non-zero in a fraction ``p < 1`` of the
        cells has ``mean^2 / variance <= p / (1 - p) < n``, so the expansion costs at most
        ``log10(n)`` of float64's 16 digits. Genes without a zero (where a large offset over a
        small spread would lose precision: mean 100, std 0.1) are shifted exactly, in a small
        dense block of their own.
        """
        n = x_sp.shape[0]
        dense_g = nnz_g == n
        if not bool(dense_g.any()):
            self._gram_add_expanded(x_sp)
            return
        s_g = torch.from_numpy(np.asarray(x_sp.sum(0), dtype=np.float64).ravel())
        d_idx = torch.nonzero(dense_g).flatten()
        s_idx = torch.nonzero(~dense_g).flatten()
        # sparse-gene columns: shift expanded, products from a CSR matrix
        x_s = x_sp[:, s_idx.numpy()]
        c_s, sum_s = c_g[s_idx], s_g[s_idx]
        ss = torch.from_numpy((x_s.T @ x_s).toarray())
        ss += n * torch.outer(c_s, c_s) - torch.outer(c_s, sum_s) - torch.outer(sum_s, c_s)
        self.gram_gg[s_idx[:, None], s_idx[None, :]] += ss
        self.gram_sums_g[s_idx] += sum_s - n * c_s
        if len(d_idx):
            # dense genes, shifted exactly
            xd_nd = torch.from_numpy(x_sp[:, d_idx.numpy()].toarray()) - c_g[d_idx]
            dd = xd_nd.T @ xd_nd
            self.gram_gg[d_idx[:, None], d_idx[None, :]] += dd
            # cross block: sum_n (x_s - c_s)(x_d - c_d)^T = X_s^T Xd_shifted - c_s (sum Xd_sh)^T
            sd = torch.from_numpy(np.asarray(x_s.T @ xd_nd.numpy()))
            sd -= torch.outer(c_s, xd_nd.sum(0))
            self.gram_gg[s_idx[:, None], d_idx[None, :]] += sd
            self.gram_gg[d_idx[:, None], s_idx[None, :]] += sd.T
            self.gram_sums_g[d_idx] += xd_nd.sum(0)

    def _gram_add_expanded(self, x_sp: sp.csr_matrix) -> None:
        """Add ``(x - c)^T (x - c)`` of a CSR minibatch, the shift expanded (every gene has a
        zero; see :meth:`_gram_update_sparse`)."""
        n = x_sp.shape[0]
        s_g = torch.from_numpy(np.asarray(x_sp.sum(0), dtype=np.float64).ravel())
        # the raw products go in as they are; the shift terms of all such minibatches are
        # added once, before the epoch-end pooling (the same sum: see _fold_raw)
        self.gram_gg += torch.from_numpy((x_sp.T @ x_sp).toarray())
        self.gram_raw_sums_g += s_g
        self.gram_raw_n += n

    def _fold_raw(self) -> None:
        """Add the shift terms of the raw sparse products: ``- c s^T - s c^T + n c c^T``."""
        n = self.gram_raw_n
        if float(n) == 0:
            return
        c_g, s_g = self.gram_shift_g, self.gram_raw_sums_g
        self.gram_gg += n * torch.outer(c_g, c_g) - torch.outer(c_g, s_g) - torch.outer(s_g, c_g)
        self.gram_sums_g += s_g - n * c_g
        self.gram_raw_sums_g.zero_()
        self.gram_raw_n.zero_()

    def _gram_finish(self) -> None:
        """Pool ranks (Chan's correction for their shifts) and take the top eigenpairs."""
        self._fold_raw()
        n_r = all_gather_stack(self.x_size.reshape(1))[:, 0]
        sums_rg = all_gather_stack(self.gram_sums_g)
        shift_rg = all_gather_stack(self.gram_shift_g)
        safe_r = n_r.clamp_min(1)[:, None]
        mean_rg = shift_rg + sums_rg / safe_r
        # each rank's cross-products about its own mean, summed over ranks, plus the spread
        # of the ranks' means
        rank = world_info()[0]
        m2_gg = self.gram_gg - torch.outer(self.gram_sums_g, self.gram_sums_g) / safe_r[rank]
        m2_gg = all_reduce_sum(m2_gg)
        n = n_r.sum()
        mean_g = (n_r[:, None] * mean_rg).sum(0) / n.clamp_min(1)
        if self.perform_mean_correction:
            dev_rg = mean_rg - mean_g
            m2_gg += (n_r[:, None] * dev_rg).T @ dev_rg
        else:
            mean_g = torch.zeros_like(mean_g)
        evals, evecs = torch.linalg.eigh(m2_gg)
        top = torch.argsort(evals, descending=True)[: self.n_internal]
        self.S_q.copy_(evals[top].clamp_min(0).sqrt())
        self.V_qg.copy_(evecs[:, top].T)
        self.x_size.copy_(n)
        self.x_mean_g.copy_(mean_g)
        self.x_m2_g.copy_(torch.diagonal(m2_gg).clamp_min(0))
        self.finished_at.copy_(self.n_updates)

    def _ensure_finished(self) -> None:
        """Gram path: compute the eigenpairs if data arrived since (single process only)."""
        if self.algorithm != "gram" or int(self.finished_at) == int(self.n_updates):
            return
        if world_info()[1] > 1:
            raise ValueError(
                "IncrementalPCA results are read before the epoch-end reduction across ranks; "
                "run the Trainer to the end of the epoch first."
            )
        self._gram_finish()

    # ----------------------------------------------------------------- streaming
    def _merge(
        self,
        state_a: tuple[torch.Tensor, ...],
        rows_b_mg: torch.Tensor,
        moments_b: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        seed: int,
    ) -> tuple[torch.Tensor, ...]:
        """Fold ``rows_b_mg`` (centred rows, or ``S V`` of another state) into ``state_a``.

        States are ``(S_q, V_qg, n, mean_g, m2_g)``; ``moments_b`` is ``(n, mean_g, m2_g)`` of
        the rows' data.
        """
        s_a, v_a, n_a, mean_a, m2_a = state_a
        n_b, mean_b, m2_b = moments_b
        if float(n_b) == 0:
            return state_a
        rows = [rows_b_mg]
        if float(n_a) > 0:
            rows.insert(0, s_a[:, None] * v_a)
            if self.perform_mean_correction:
                scale = torch.sqrt(n_a * n_b / (n_a + n_b))
                rows.append((scale * (mean_b - mean_a))[None])
        s, v = truncated_svd(torch.cat(rows), self.n_internal, self.svd_lowrank_niter, seed)
        n, mean, m2 = combine_moments(
            torch.stack([n_a, n_b])[:, None], torch.stack([mean_a, mean_b]),
            torch.stack([m2_a, m2_b]),
        )
        if len(s) < self.n_internal:  # fewer rows than directions so far
            pad = self.n_internal - len(s)
            s = torch.cat([s, s.new_zeros(pad)])
            v = torch.cat([v, v.new_zeros(pad, v.shape[1])])
        return s, v, n.reshape(()), mean, m2

    def _state(self) -> tuple[torch.Tensor, ...]:
        return self.S_q, self.V_qg, self.x_size, self.x_mean_g, self.x_m2_g

    def _set_state(self, state: tuple[torch.Tensor, ...]) -> None:
        for buf, val in zip(self._state(), state):
            buf.copy_(val)

    def forward(
        self,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray | None = None,
        batch_index_n: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """Fold one minibatch into the partial SVD."""
        self.check_input(x_ng, var_names_g)
        n = x_ng.shape[0]
        if n == 0:
            return {}
        if is_csr(x_ng) and self.algorithm != "gram":
            x_ng = x_ng.to_dense()
        if not is_csr(x_ng):
            x_ng = x_ng.to(torch.float64)
        elif x_ng.dtype != torch.float64:  # products and sums in float64, as for dense input
            x_ng = csr_with_values(x_ng, x_ng.values().to(torch.float64))
        if self.algorithm == "gram":
            self._gram_update(x_ng)
            self.n_updates += 1
            return {}
        if self.perform_mean_correction:
            mean_b = x_ng.mean(0)
            rows_ng = x_ng - mean_b
        else:  # the data are taken as centred: spread is measured about zero
            mean_b = torch.zeros_like(x_ng[0])
            rows_ng = x_ng
        moments_b = (x_ng.new_tensor(float(n)), mean_b, (rows_ng * rows_ng).sum(0))
        seed = self.seed * 1_000_003 + int(self.n_updates)
        self._set_state(self._merge(self._state(), rows_ng, moments_b, seed))
        self.n_updates += 1
        return {}

    def on_train_epoch_end(self, trainer) -> None:
        if self.algorithm == "gram":
            self._gram_finish()
            return
        parts = [all_gather_stack(t) for t in self._state()]
        world = parts[0].shape[0]
        if world == 1:
            return
        state = tuple(p[0] for p in parts)
        for r in range(1, world):
            s_b, v_b, n_b, mean_b, m2_b = (p[r] for p in parts)
            rows_b = s_b[:, None] * v_b
            state = self._merge(state, rows_b, (n_b, mean_b, m2_b), self.seed + 7919 * r)
        self._set_state(state)

    # ----------------------------------------------------------------- results
    @property
    def explained_variance_k(self) -> torch.Tensor:
        """Variance along each component (``S**2 / n``: ``n`` degrees of freedom)."""
        self._ensure_finished()
        return self.S_q[: self.n_components] ** 2 / self.x_size.clamp_min(1)

    @property
    def components_kg(self) -> torch.Tensor:
        """Principal axes, sorted by decreasing explained variance (largest loading > 0)."""
        self._ensure_finished()
        return _flip_signs(self.V_qg[: self.n_components])

    @property
    def mean_g(self) -> torch.Tensor:
        """Mean of every gene (zero when ``perform_mean_correction=False``)."""
        self._ensure_finished()
        return self.x_mean_g

    @property
    def total_variance(self) -> torch.Tensor:
        """Sum of the per-gene variances (``n`` degrees of freedom)."""
        self._ensure_finished()
        return self.x_m2_g.sum() / self.x_size.clamp_min(1)

    @property
    def explained_variance_ratio_k(self) -> torch.Tensor:
        """Fraction of the total variance along each component."""
        return self.explained_variance_k / self.total_variance

    def predict(
        self, x_ng: torch.Tensor, var_names_g: np.ndarray | None = None
    ) -> dict[str, np.ndarray | torch.Tensor]:
        """Centre ``x_ng`` and project it on the components: ``{"x_ng": z_nk}``."""
        self.check_input(x_ng, var_names_g)
        x_ng = x_ng.to(torch.float64)
        if self.perform_mean_correction:
            x_ng = x_ng - self.x_mean_g
        return {"x_ng": x_ng @ self.components_kg.T}

    def to_dataframe(self) -> pd.DataFrame:
        """Components (``PC1``... columns) by gene."""
        comp = self.components_kg.cpu().numpy().T
        return pd.DataFrame(
            comp,
            index=pd.Index(self.var_names_g, name="gene"),
            columns=[f"PC{i + 1}" for i in range(self.n_components)],
        )
