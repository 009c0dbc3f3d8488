"""FADVI's cross-correlation penalty between latent blocks (scale-free: Pearson correlations)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["cross_correlation_penalty", "correlation_penalty_and_grad", "correlation_penalty_of"]


def cross_correlation_penalty(*blocks_nk: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Sum over pairs of blocks of the squared Pearson correlations between their columns.

    Each column is centred and divided by its standard deviation over the cells, so the value
    does not change when a latent is rescaled (the raw cross-covariance the peer penalises can
    be lowered by shrinking the latents instead of decorrelating them). With ``B`` blocks of
    widths ``k_1 .. k_B`` the value lies in ``[0, sum_{i<j} k_i k_j]``.

    Parameters
    ----------
    blocks_nk
        Two or more ``(cells, dims)`` tensors over the same cells (at least 2 cells).
    eps
        Added to each standard deviation (a constant column then contributes 0).
    """
    if blocks_nk[0].shape[0] < 2:
        return blocks_nk[0].new_zeros(())
    return correlation_penalty_of(torch.cat(blocks_nk, -1), [z.shape[-1] for z in blocks_nk], eps)


def correlation_penalty_of(z_nk: torch.Tensor, widths: Sequence[int], eps: float = 1e-6):
    """:func:`cross_correlation_penalty` of the column blocks (``widths``) of one matrix: one
    standardisation and one ``k x k`` product, the diagonal blocks masked out by a cached
    weight matrix (0 on them, 1/2 elsewhere: each pair ``i < j`` appears twice in the full
    matrix).

    ``zc / (sqrt(n) (std + eps))`` with ``std = |zc| / sqrt(n)`` is ``zc / (|zc| + sqrt(n) eps)``,
    whose cross-product is the correlation matrix (one norm instead of square, mean and root).
    """
    _, _, _, s_nk = _standardised(z_nk, eps)
    corr_kk = s_nk.T @ s_nk
    return torch.dot(corr_kk.square().reshape(-1), _half_off_blocks(widths, z_nk).reshape(-1))


def _standardised(z_nk: torch.Tensor, eps: float):
    """``(zc, r, r + sqrt(n) eps, s)``: the centred columns, their norms, the denominator and
    ``s = zc / (r + sqrt(n) eps)``, whose cross-product is the correlation matrix."""
    zc = z_nk - z_nk.mean(0, keepdim=True)
    r_k = torch.linalg.vector_norm(zc, dim=0, keepdim=True)
    denom = r_k + eps * math.sqrt(z_nk.shape[0])
    return zc, r_k, denom, zc / denom


def correlation_penalty_and_grad(z_nk: torch.Tensor, widths: Sequence[int], eps: float = 1e-6
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`correlation_penalty_of` and its gradient with respect to ``z_nk``, written out
    (for a training step without autograd; the tests compare it with autograd's).

    With ``P = sum M * C**2``, ``C = s^T s`` and ``s = zc / (r + sqrt(n) eps)`` (``r`` the
    column norms of the centred ``zc``): ``dP/ds = 4 s (M * C)``, then per column
    ``dP/dzc = g / (r + c) - zc (zc . g) / (r (r + c)^2)`` and the centring's
    ``dP/dz = dP/dzc - mean(dP/dzc)``. A constant column (``r = 0``) gets gradient 0, as
    autograd's subgradient of the norm gives.
    """
    zc, r_k, denom, s_nk = _standardised(z_nk, eps)
    corr_kk = s_nk.T @ s_nk
    mc_kk = _half_off_blocks(widths, z_nk) * corr_kk
    value = torch.dot(corr_kk.reshape(-1), mc_kk.reshape(-1))
    g_s = (s_nk @ mc_kk).mul_(4.0)
    proj = (zc * g_s).sum(0, keepdim=True) / (r_k.clamp_min(1e-30) * denom.square())
    g_zc = g_s / denom - zc * proj
    return value, g_zc - g_zc.mean(0, keepdim=True)


_OFF_BLOCKS: dict[tuple, torch.Tensor] = {}


def _half_off_blocks(widths: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """``k x k`` matrix: 0 within the diagonal blocks of ``widths``, 1/2 elsewhere (cached per
    widths, dtype and device)."""
    key = (tuple(int(w) for w in widths), like.dtype, like.device)
    mask = _OFF_BLOCKS.get(key)
    if mask is None:
        block_k = torch.repeat_interleave(torch.arange(len(widths)), torch.as_tensor(key[0]))
        off_kk = block_k[:, None] != block_k[None, :]
        mask = (0.5 * off_kk).to(dtype=like.dtype, device=like.device)
        _OFF_BLOCKS[key] = mask
    return mask
