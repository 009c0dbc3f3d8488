"""Probabilistic PCA fitted by stochastic gradients on streamed minibatches.

Model (Tipping & Bishop 1999): ``z_k ~ N(0, I)``, ``x_g | z ~ N(W_kg^T z + mean_g, sigma^2 I)``,
so ``x ~ N(mean, C)`` with ``C = W^T W + sigma^2 I``.

* ``"marginalized"``: minimise the exact negative log-likelihood of ``x`` under ``N(mean, C)``,
  evaluated in O(g k^2) with the k x k matrix ``M = W W^T + sigma^2 I``:
  ``log|C| = (g - k) log sigma^2 + log|M|`` and
  ``x^T C^-1 x = (|x|^2 - (W x)^T M^-1 (W x)) / sigma^2``.
* ``"linear_vae"`` (Lucas et al. 2019): a linear encoder ``q(z | x) = N(V^T (x - mean), diag(d))``
  and the analytic evidence lower bound; at its optimum the decoder is the PPCA maximum
  likelihood solution.

At the maximum likelihood solution ``W^T W + sigma^2 I`` has the top ``k`` eigenvalues of the
data covariance (``L_k``) along its principal axes (``U_gk``), and ``sigma^2`` is the mean of
the remaining eigenvalues. Parameters are float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch

from cellsight.stats.base import StreamingModel

__all__ = ["ProbabilisticPCA"]


class ProbabilisticPCA(StreamingModel):
    """Probabilistic PCA (marginalised likelihood or linear VAE), trained on minibatches.

    Parameters
    ----------
    n_obs
        Number of cells (scales the minibatch objective to the whole data set).
    var_names_g
        The gene names (schema of the input).
    n_components
        Number of principal components ``k``.
    ppca_flavor
        ``"marginalized"`` or ``"linear_vae"``.
    mean_g
        Per-gene mean of the data (e.g. ``OnePassMeanVarStd.mean_g``); ``None`` learns it.
    W_init_scale
        Standard deviation of the random initial ``W_kg``.
    sigma_init_scale
        Initial noise standard deviation ``sigma``.
    seed
        Seed of the initial parameters.
    """

    is_trainable = True

    def __init__(
        self,
        n_obs: int,
        var_names_g: Sequence[str] | np.ndarray,
        n_components: int,
        ppca_flavor: Literal["marginalized", "linear_vae"],
        mean_g: torch.Tensor | Sequence[float] | None = None,
        W_init_scale: float = 1.0,
        sigma_init_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(var_names_g)
        if ppca_flavor not in ("marginalized", "linear_vae"):
            raise ValueError(f"ppca_flavor={ppca_flavor!r}; use 'marginalized' or 'linear_vae'.")
        if int(n_obs) < 1:
            raise ValueError(f"n_obs={n_obs} must be >= 1 (the number of cells).")
        if not 1 <= int(n_components) < self.n_vars:
            raise ValueError(
                f"n_components={n_components} must be between 1 and n_genes - 1 "
                f"({self.n_vars - 1})."
            )
        if W_init_scale <= 0 or sigma_init_scale <= 0:
            raise ValueError("W_init_scale and sigma_init_scale must be > 0.")
        self.n_obs = int(n_obs)
        self.n_components = int(n_components)
        self.ppca_flavor = ppca_flavor
        self.W_init_scale = float(W_init_scale)
        self.sigma_init_scale = float(sigma_init_scale)
        self.seed = int(seed)
        k, g, f64 = self.n_components, self.n_vars, torch.float64
        self.W_kg = torch.nn.Parameter(torch.empty(k, g, dtype=f64))
        self.log_sigma = torch.nn.Parameter(torch.empty((), dtype=f64))
        if mean_g is None:
            self.mean_g = torch.nn.Parameter(torch.zeros(g, dtype=f64))
            self._learn_mean = True
        else:
            mean = torch.as_tensor(np.asarray(mean_g, dtype=np.float64))
            if mean.shape != (g,) or not torch.isfinite(mean).all():
                raise ValueError(f"mean_g must be {g} finite values (one per gene).")
            self.register_buffer("mean_g", mean.clone())
            self._learn_mean = False
        if ppca_flavor == "linear_vae":
            self.V_gk = torch.nn.Parameter(torch.empty(g, k, dtype=f64))
            self.log_d_k = torch.nn.Parameter(torch.empty(k, dtype=f64))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        k, g = self.n_components, self.n_vars
        with torch.no_grad():
            w_kg = torch.randn(k, g, generator=gen, dtype=torch.float64)
            self.W_kg.copy_(w_kg * self.W_init_scale)
            self.log_sigma.fill_(math.log(self.sigma_init_scale))
            if self._learn_mean:
                self.mean_g.zero_()
            if self.ppca_flavor == "linear_vae":
                self.V_gk.copy_(
                    torch.randn(g, k, generator=gen, dtype=torch.float64) * self.W_init_scale
                    / math.sqrt(g)
                )
                self.log_d_k.zero_()

    # ----------------------------------------------------------------- objective
    def _m_kk(self) -> torch.Tensor:
        sigma2 = torch.exp(2 * self.log_sigma)
        eye = torch.eye(self.n_components, dtype=self.W_kg.dtype, device=self.W_kg.device)
        return self.W_kg @ self.W_kg.T + sigma2 * eye

    def _marginal_nll_n(self, xc_ng: torch.Tensor) -> torch.Tensor:
        g, k = self.n_vars, self.n_components
        sigma2 = torch.exp(2 * self.log_sigma)
        m_kk = self._m_kk()
        chol = torch.linalg.cholesky(m_kk)
        logdet_c = (g - k) * torch.log(sigma2) + 2 * torch.log(torch.diagonal(chol)).sum()
        wx_nk = xc_ng @ self.W_kg.T
        sol_nk = torch.cholesky_solve(wx_nk.T, chol).T
        quad_n = ((xc_ng * xc_ng).sum(1) - (wx_nk * sol_nk).sum(1)) / sigma2
        return 0.5 * (g * math.log(2 * math.pi) + logdet_c + quad_n)

    def _neg_elbo_n(self, xc_ng: torch.Tensor) -> torch.Tensor:
        g = self.n_vars
        sigma2 = torch.exp(2 * self.log_sigma)
        d_k = torch.exp(self.log_d_k)
        m_nk = xc_ng @ self.V_gk
        resid_ng = xc_ng - m_nk @ self.W_kg
        w_sq_k = (self.W_kg * self.W_kg).sum(1)
        expected_sq_n = (resid_ng * resid_ng).sum(1) + (d_k * w_sq_k).sum()
        rec_n = 0.5 * (g * torch.log(2 * math.pi * sigma2) + expected_sq_n / sigma2)
        kl_n = 0.5 * (d_k.sum() + (m_nk * m_nk).sum(1) - self.n_components - self.log_d_k.sum())
        return rec_n + kl_n

    def forward(
        self,
        x_ng: torch.Tensor,
        var_names_g: np.ndarray | None = None,
        batch_index_n: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """The minibatch objective: ``{"loss": mean negative log-likelihood (or ELBO) per cell}``.

        ``loss * n_obs`` is the minibatch estimate of the whole data set's objective.
        """
        self.check_input(x_ng, var_names_g)
        xc_ng = x_ng.to(self.W_kg.dtype) - self.mean_g
        if self.ppca_flavor == "marginalized":
            per_cell = self._marginal_nll_n(xc_ng)
        else:
            per_cell = self._neg_elbo_n(xc_ng)
        return {"loss": per_cell.mean()}

    # ----------------------------------------------------------------- results
    @torch.no_grad()
    def _svd_w(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, s_k, vh_kg = torch.linalg.svd(self.W_kg, full_matrices=False)
        return s_k, vh_kg

    @property
    @torch.no_grad()
    def L_k(self) -> torch.Tensor:
        """Eigenvalues of ``W^T W + sigma^2 I`` along the components (descending)."""
        s_k, _ = self._svd_w()
        return s_k**2 + torch.exp(2 * self.log_sigma)

    @property
    @torch.no_grad()
    def U_gk(self) -> torch.Tensor:
        """Principal axes of ``W`` (orthonormal columns; largest loading positive)."""
        _, vh_kg = self._svd_w()
        idx = vh_kg.abs().argmax(dim=1, keepdim=True)
        sign = torch.sign(vh_kg.gather(1, idx))
        sign[sign == 0] = 1
        return (vh_kg * sign).T.contiguous()

    @property
    @torch.no_grad()
    def W_variance(self) -> float:
        """Variance carried by the components: ``trace(W^T W)``."""
        return float((self.W_kg * self.W_kg).sum())

    @property
    @torch.no_grad()
    def sigma_variance(self) -> float:
        """Variance carried by the isotropic noise: ``n_genes * sigma^2``."""
        return float(self.n_vars * torch.exp(2 * self.log_sigma))

    @torch.no_grad()
    def predict(
        self, x_ng: torch.Tensor, var_names_g: np.ndarray | None = None
    ) -> dict[str, np.ndarray | torch.Tensor]:
        """Centre and project on the principal axes: ``{"z_nk": (x - mean) U}``."""
        self.check_input(x_ng, var_names_g)
        xc_ng = x_ng.to(self.W_kg.dtype) - self.mean_g
        return {"z_nk": xc_ng @ self.U_gk}

    def to_dataframe(self) -> pd.DataFrame:
        """Principal axes (``PC1``... columns) by gene."""
        return pd.DataFrame(
            self.U_gk.cpu().numpy(),
            index=pd.Index(self.var_names_g, name="gene"),
            columns=[f"PC{i + 1}" for i in range(self.n_components)],
        )
