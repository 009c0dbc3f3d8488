"""Small layers that scvi-tools' ``scvi.nn`` does not provide.

``scvi.nn.Encoder`` / ``DecoderSCVI`` / ``FCLayers`` do the fully-connected work; this file adds
what cellsight's models need around them: a learned (optionally sampled) batch embedding, input
gene dropout, and the ``'encoder' | 'decoder' | 'none' | 'both'`` placement option of
normalisation layers.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

__all__ = ["BatchEmbedding", "gene_dropout", "norm_placement"]

Placement = Literal["encoder", "decoder", "none", "both"]
_PLACEMENTS = ("encoder", "decoder", "none", "both")


def norm_placement(option: str, name: str) -> tuple[bool, bool]:
    """``(in encoder, in decoder)`` flags of a ``'encoder' | 'decoder' | 'none' | 'both'`` option.

    Parameters
    ----------
    option
        Where the layer goes.
    name
        Argument name, for the error message.
    """
    if option not in _PLACEMENTS:
        raise ValueError(f"{name}={option!r} is not one of {list(_PLACEMENTS)}.")
    return option in ("encoder", "both"), option in ("decoder", "both")


def gene_dropout(x_ng: torch.Tensor, rate: float) -> torch.Tensor:
    """Zero each entry of ``x_ng`` with probability ``rate`` (no rescaling of the survivors).

    Counts stay counts, so the encoder sees inputs on the scale it sees at inference time, only
    with some genes missing (a denoising objective on the encoder input).
    """
    if rate <= 0.0:
        return x_ng
    keep_ng = torch.rand_like(x_ng) >= rate
    return x_ng * keep_ng


class BatchEmbedding(nn.Module):
    """A learned ``n_latent_batch``-dimensional representation of each batch.

    Each batch ``b`` has a mean vector ``mean_bd[b]`` (initialised to the ``b``-th row of an
    identity matrix, i.e. a one-hot code when ``n_latent_batch == n_batch``) and, when sampled,
    a scale ``exp(log_scale_bd[b]) + 1e-5`` (initialised to 1).

    Parameters
    ----------
    n_batch
        Number of batches.
    n_latent_batch
        Dimension of the representation.
    sampled
        Draw the representation from ``Normal(mean, scale)`` during training (reparameterised);
        otherwise (and in eval mode) use the mean.
    """

    def __init__(self, n_batch: int, n_latent_batch: int, sampled: bool = False) -> None:
        super().__init__()
        if n_batch < 1 or n_latent_batch < 1:
            raise ValueError(
                f"BatchEmbedding needs n_batch >= 1 and n_latent_batch >= 1, got {n_batch} and "
                f"{n_latent_batch}."
            )
        self.n_batch = n_batch
        self.n_latent_batch = n_latent_batch
        self.sampled = sampled
        self.mean_bd = nn.Parameter(torch.eye(n_batch, n_latent_batch))
        self.log_scale_bd = nn.Parameter(torch.zeros(n_batch, n_latent_batch)) if sampled else None

    def distribution(self, batch_index_n1: torch.Tensor) -> Normal:
        """``Normal`` of the representation of each cell's batch (needs ``sampled=True``)."""
        if self.log_scale_bd is None:
            raise ValueError("This batch embedding is a point estimate; it has no distribution.")
        idx_n = batch_index_n1.reshape(-1).long()
        return Normal(self.mean_bd[idx_n], self.log_scale_bd[idx_n].exp() + 1e-5)

    def forward(self, batch_index_n1: torch.Tensor, use_mean: bool | None = None) -> torch.Tensor:
        """The representation ``(n, n_latent_batch)`` of each cell's batch.

        Parameters
        ----------
        batch_index_n1
            Batch codes, shape ``(n, 1)`` or ``(n,)``.
        use_mean
            Return the mean even when sampled (default: the mean in eval mode only).
        """
        if use_mean is None:
            use_mean = not self.training
        if not self.sampled or use_mean:
            return self.mean_bd[batch_index_n1.reshape(-1).long()]
        return self.distribution(batch_index_n1).rsample()

    def kl_n(self, batch_index_n1: torch.Tensor) -> torch.Tensor:
        """KL divergence of each cell's batch representation from ``Normal(0, 1)``, summed."""
        q = self.distribution(batch_index_n1)
        return kl_divergence(q, Normal(torch.zeros_like(q.loc), torch.ones_like(q.scale))).sum(-1)
