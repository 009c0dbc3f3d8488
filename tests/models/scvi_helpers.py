"""Shared data and set-up of the scVI tests (imported from tests/models)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scvi
from anndata import AnnData

from cellsight.models import SCVI


def count_adata(n_cells: int = 120, n_genes: int = 30, n_batch: int = 3, seed: int = 0) -> AnnData:
    """NB counts with batch effects, labels, a categorical and a continuous covariate."""
    rng = np.random.default_rng(seed)
    n_types = 3
    type_n = rng.integers(0, n_types, n_cells)
    batch_n = np.arange(n_cells) % n_batch
    mean_tg = rng.gamma(1.0, 2.0, (n_types, n_genes))
    effect_bg = rng.lognormal(0.0, 0.3, (n_batch, n_genes))
    depth_n = rng.lognormal(0.0, 0.3, n_cells)
    mean_ng = mean_tg[type_n] * effect_bg[batch_n] * depth_n[:, None]
    x = rng.negative_binomial(5, 5 / (5 + mean_ng)).astype(np.float32)
    x[x.sum(1) == 0, 0] = 1.0  # every cell needs a positive library size
    adata = AnnData(sp.csr_matrix(x))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["batch"] = pd.Categorical([f"b{b}" for b in batch_n])
    adata.obs["label"] = pd.Categorical([f"t{t}" for t in type_n])
    adata.obs["donor"] = pd.Categorical([f"d{i % 2}" for i in range(n_cells)])
    adata.obs["age"] = rng.normal(0.0, 1.0, n_cells)
    adata.obs["sf"] = depth_n
    return adata


def copy_scvi_tools_weights(ours: SCVI, ref: scvi.model.SCVI) -> list[str]:
    """Load scvi-tools' ``VAE`` weights into ours; returns the scvi-tools entries left out.

    cellsight's module keeps scvi-tools' attribute names (``z_encoder``, ``decoder``, ``px_r``),
    so the name map is the identity; scvi-tools' library encoder ``l_encoder`` (built even when
    the observed library size is used) and the decoder heads the likelihood does not use have no
    counterpart and are dropped.
    """
    return ours.module.load_scvi_tools_state_dict(ref.module.state_dict())


def model_pair(adata: AnnData, setup: dict, **params) -> tuple[SCVI, scvi.model.SCVI]:
    """cellsight's and scvi-tools' SCVI on copies of ``adata``, ours holding scvi-tools' weights."""
    ours_ad, ref_ad = adata.copy(), adata.copy()
    SCVI.setup_anndata(ours_ad, **setup)
    scvi.model.SCVI.setup_anndata(ref_ad, **setup)
    ours = SCVI(ours_ad, **params)
    ref = scvi.model.SCVI(ref_ad, **params)
    return ours, ref
