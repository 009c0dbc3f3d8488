"""Cellarium's ``reconstruct``: expected counts at a common library size, in chosen batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.distributions import Normal

__all__ = ["reconstruct_counts"]


def reconstruct_counts(
    module,
    x_ng: torch.Tensor,
    batch_n1: torch.Tensor,
    cont_covs_nc: torch.Tensor | None,
    cat_covs_nd: torch.Tensor | None,
    labels_n1: torch.Tensor | None,
    *,
    gene_inds: Sequence[int] | None,
    batches: list[int | None],
    transform_categorical_covariates: Sequence[int] | None,
    n_latent_samples: int,
    use_latent_mean: bool,
    use_importance_sampling: bool,
    library_size: float,
    samples_per_pass: int = 32,
) -> torch.Tensor:
    """Average of the decoded mean counts over latent samples and batches.

    Parameters
    ----------
    module
        A :class:`~cellsight.models.scvi.module.SingleCellVariationalInference`.
    x_ng, batch_n1, cont_covs_nc, cat_covs_nd, labels_n1
        The cells (codes as long tensors); the encoder sees them as they are.
    gene_inds
        Columns to return (``None``: all).
    batches
        Batch codes to decode in (``None`` in the list: each cell's own batch); the result is
        their average.
    transform_categorical_covariates
        Codes fixing the extra categorical covariates for decoding (``None``: the cells' own).
    n_latent_samples, use_latent_mean
        Posterior draws of ``z`` (``use_latent_mean``: the posterior mean, one "sample").
    use_importance_sampling
        Weight the draws by ``p(x|z) p(z) / q(z|x)`` (normalised over draws), computed in the
        cells' own batch at their observed library size.
    library_size
        Library size of the reconstruction.
    samples_per_pass
        Draws decoded at once (bounds memory at ``samples_per_pass * n * g`` floats).
    """
    n = x_ng.shape[0]
    genes = slice(None) if gene_inds is None else torch.as_tensor(list(gene_inds), dtype=torch.long)
    inf = module.inference(x_ng, batch_n1, cont_covs_nc, cat_covs_nd)
    qz = inf["qz"]
    s_total = n_latent_samples
    u_snk = qz.loc[None] if use_latent_mean else qz.sample((s_total,))
    weights_sn = torch.full((s_total, n), 1.0 / s_total, device=x_ng.device)
    chunks = range(0, s_total, samples_per_pass)
    if use_importance_sampling:
        log_w = []
        for start in chunks:
            u = u_snk[start : start + samples_per_pass]
            px = module.generative(
                module.z_encoder.z_transformation(u),
                inf["library_n1"],
                batch_n1,
                labels_n1,
                cont_covs_nc,
                cat_covs_nd,
            )["px"]
            if module.flow_prior is None:
                log_pz = Normal(0.0, 1.0).log_prob(u).sum(-1)
            else:
                log_pz = module.flow_prior.log_prob(u)
            log_w.append(px.log_prob(x_ng).sum(-1) + log_pz - qz.log_prob(u).sum(-1))
        weights_sn = torch.softmax(torch.cat(log_w), dim=0)
    library_n1 = torch.full((n, 1), float(np.log(library_size)), device=x_ng.device)
    size_factor_n1 = torch.full_like(library_n1, library_size)
    out_ng = torch.zeros((), device=x_ng.device)
    for batch in batches:
        for start in chunks:
            u = u_snk[start : start + samples_per_pass]
            px = module.generative(
                module.z_encoder.z_transformation(u),
                library_n1,
                batch_n1,
                labels_n1,
                cont_covs_nc,
                cat_covs_nd,
                size_factor_n1,
                transform_batch=batch,
                transform_categorical_covariates=transform_categorical_covariates,
            )["px"]
            w_sn1 = weights_sn[start : start + samples_per_pass, :, None]
            out_ng = out_ng + (w_sn1 * px.mean[..., genes]).sum(0) / len(batches)
    return out_ng
