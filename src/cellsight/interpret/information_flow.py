"""Information flow from a block of latent dimensions to a prediction, by Monte Carlo.

For one cell with posterior ``N(mu, diag(std^2))`` over ``k`` latent dimensions and a function
``predict_proba(z) -> class probabilities``, the information flow of a block ``A`` of dimensions
(the other dimensions are ``B``) is the mutual information ``I(z_A; Y_hat)``:

* draw ``n_alpha`` values ``alpha_a`` of ``z_A`` (from the prior ``N(0, I)`` by default);
* for each, draw ``n_beta`` values ``beta_ab`` of ``z_B`` (from the cell's posterior by
  default) and average the predicted probabilities: ``p(y | alpha_a) = mean_b
  predict_proba([alpha_a, beta_ab])``;
* ``I = H(mean_a p(y | alpha_a)) - mean_a H(p(y | alpha_a))`` with ``H(p) = -sum_y p log p``.

:func:`information_flow` evaluates all cells x ``n_alpha`` x ``n_beta`` latent samples in one
batched call of ``predict_proba`` (in chunks of cells when a memory budget asks for it) and is
differentiable, so it serves both as a training loss and as a read-out.
:func:`information_flow_loop` is the plain reference: the same estimator with explicit loops
over cells, ``alpha`` and ``beta`` samples, one latent vector per call. Both take the same
standard-normal draws (:func:`draw_noise`), so they agree to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cellsight.checks import check_int

__all__ = ["FlowNoise", "draw_noise", "information_flow", "information_flow_loop"]

_SOURCES = ("prior", "posterior")


@dataclass
class FlowNoise:
    """Standard-normal draws of the estimator: ``alpha_nsa`` (cells, n_alpha, |A|) and
    ``beta_nstb`` (cells, n_alpha, n_beta, |B|)."""

    alpha_nsa: torch.Tensor
    beta_nstb: torch.Tensor


def _split_dims(dims: Sequence[int], n_latent: int) -> tuple[list[int], list[int]]:
    a = sorted({int(d) for d in dims})
    if not a:
        raise ValueError("dims is empty; give at least one latent dimension to measure.")
    if a[0] < 0 or a[-1] >= n_latent:
        raise ValueError(f"dims {a} are out of range for {n_latent} latent dimensions.")
    b = [d for d in range(n_latent) if d not in set(a)]
    return a, b


def draw_noise(
    n_cells: int,
    n_latent: int,
    dims: Sequence[int],
    n_alpha: int,
    n_beta: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> FlowNoise:
    """The standard-normal draws used by :func:`information_flow` for these sizes."""
    a, b = _split_dims(dims, n_latent)
    check_int(n_cells, "n_cells", what="cells to draw for")
    check_int(n_alpha, "n_alpha", what="draws of the measured block per cell")
    check_int(n_beta, "n_beta", what="draws of the other dimensions per block draw")
    kw = {"generator": generator, "dtype": dtype}
    alpha = torch.randn((n_cells, n_alpha, len(a)), **kw)
    beta = torch.randn((n_cells, n_alpha, n_beta, len(b)), **kw)
    if device is not None:
        alpha, beta = alpha.to(device), beta.to(device)
    return FlowNoise(alpha, beta)


def _scale(eps: torch.Tensor, mu: torch.Tensor, std: torch.Tensor, source: str) -> torch.Tensor:
    return eps if source == "prior" else mu + std * eps


def _entropy(p: torch.Tensor, eps: float) -> torch.Tensor:
    p = p.clamp(eps, 1.0)
    return -(p * p.log()).sum(-1)


def _check_args(mu_nk, std_nk, outer, inner):
    if mu_nk.shape != std_nk.shape or mu_nk.dim() != 2:
        raise ValueError(
            f"mu_nk and std_nk must both be (cells, latent); got {tuple(mu_nk.shape)} and "
            f"{tuple(std_nk.shape)}."
        )
    if mu_nk.shape[0] == 0:
        raise ValueError(
            "information flow got 0 cells (mu_nk has shape "
            f"{tuple(mu_nk.shape)}); pass at least one cell (n_cells >= 1)."
        )
    for name, src in (("outer", outer), ("inner", inner)):
        if src not in _SOURCES:
            raise ValueError(f"{name}={src!r} is not one of {list(_SOURCES)}.")


def _check_noise(noise: FlowNoise, n: int, a: list[int], b: list[int]) -> None:
    alpha, beta = tuple(noise.alpha_nsa.shape), tuple(noise.beta_nstb.shape)
    if (len(alpha) != 3 or len(beta) != 4 or alpha[0] != n or beta[0] != n
            or alpha[1] != beta[1] or alpha[2] != len(a) or beta[3] != len(b)
            or min(alpha[1], beta[2]) < 1):
        raise ValueError(
            f"noise has shapes {alpha} and {beta}, but {n} cells with |A|={len(a)}, "
            f"|B|={len(b)} need (cells, n_alpha, |A|) and (cells, n_alpha, n_beta, |B|) with "
            "n_alpha, n_beta >= 1; draw it with draw_noise for these sizes."
        )


def information_flow(
    predict_proba: Callable[[torch.Tensor], torch.Tensor],
    mu_nk: torch.Tensor,
    std_nk: torch.Tensor,
    dims: Sequence[int],
    *,
    n_alpha: int = 25,
    n_beta: int = 100,
    outer: str = "prior",
    inner: str = "posterior",
    noise: FlowNoise | None = None,
    generator: torch.Generator | None = None,
    max_rows: int = 2**20,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Per-cell information flow ``I(z_dims; Y_hat)``, all Monte Carlo samples batched.

    Parameters
    ----------
    predict_proba
        Maps latent vectors ``(rows, k)`` to class probabilities ``(rows, c)``. It must treat
        rows independently (no batch statistics).
    mu_nk, std_nk
        Posterior means and standard deviations of the cells, ``(cells, k)``.
    dims
        The latent dimensions whose information flow is measured (the block ``A``).
    n_alpha, n_beta
        Draws of the block and, per draw, of the other dimensions.
    outer, inner
        Where the block's draws (``outer``) and the other dimensions' draws (``inner``) come
        from: ``"prior"`` (``N(0, I)``) or ``"posterior"`` (the cell's ``N(mu, std^2)``).
    noise
        Standard-normal draws to use (from :func:`draw_noise`); default: drawn here with
        ``generator``.
    generator
        Random generator of the draws (default: torch's global one).
    max_rows
        Latent rows per call of ``predict_proba``; cells are processed in chunks within it.
    eps
        Probabilities are clamped to ``[eps, 1]`` inside logarithms.

    Returns
    -------
    ``(cells,)`` tensor of information flows in nats (differentiable w.r.t. ``mu_nk``,
    ``std_nk`` and the parameters of ``predict_proba``).
    """
    _check_args(mu_nk, std_nk, outer, inner)
    n, k = mu_nk.shape
    a, b = _split_dims(dims, k)
    if noise is None:
        noise = draw_noise(
            n, k, a, n_alpha, n_beta, generator=generator, device=mu_nk.device, dtype=mu_nk.dtype
        )
    _check_noise(noise, n, a, b)
    n_alpha, n_beta = noise.beta_nstb.shape[1], noise.beta_nstb.shape[2]
    a_idx = torch.as_tensor(a, device=mu_nk.device)
    b_idx = torch.as_tensor(b, device=mu_nk.device)
    order = torch.argsort(torch.cat([a_idx, b_idx]))  # [A, B] columns back to latent order
    per_cell = n_alpha * n_beta
    step = max(1, max_rows // per_cell)
    out = []
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        m = sl.stop - sl.start
        mu, std = mu_nk[sl], std_nk[sl]
        alpha = _scale(noise.alpha_nsa[sl], mu[:, None, a_idx], std[:, None, a_idx], outer)
        beta = _scale(
            noise.beta_nstb[sl], mu[:, None, None, b_idx], std[:, None, None, b_idx], inner
        )
        alpha = alpha[:, :, None, :].expand(m, n_alpha, n_beta, len(a))
        z = torch.cat([alpha, beta], dim=-1)[..., order]
        probs = predict_proba(z.reshape(m * per_cell, k))
        p_sac = probs.reshape(m, n_alpha, n_beta, -1).mean(2)
        p_sc = p_sac.mean(1)
        out.append(_entropy(p_sc, eps) - _entropy(p_sac, eps).mean(1))
    return torch.cat(out)


@torch.no_grad()
def information_flow_loop(
    predict_proba: Callable[[torch.Tensor], torch.Tensor],
    mu_nk: torch.Tensor,
    std_nk: torch.Tensor,
    dims: Sequence[int],
    noise: FlowNoise,
    *,
    outer: str = "prior",
    inner: str = "posterior",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Reference implementation of :func:`information_flow` with plain loops (slow; for tests).

    Every latent vector is assembled one dimension at a time and sent to ``predict_proba``
    alone; averages and entropies are accumulated in Python loops. Same arguments and draws
    as :func:`information_flow`.
    """
    _check_args(mu_nk, std_nk, outer, inner)
    n, k = mu_nk.shape
    a, b = _split_dims(dims, k)
    _check_noise(noise, n, a, b)
    n_alpha, n_beta = noise.beta_nstb.shape[1], noise.beta_nstb.shape[2]
    flows = []
    for i in range(n):
        p_given_alpha = []
        for s in range(n_alpha):
            acc = None
            for t in range(n_beta):
                z = torch.empty(k, dtype=mu_nk.dtype, device=mu_nk.device)
                for j, d in enumerate(a):
                    e = noise.alpha_nsa[i, s, j]
                    z[d] = e if outer == "prior" else mu_nk[i, d] + std_nk[i, d] * e
                for j, d in enumerate(b):
                    e = noise.beta_nstb[i, s, t, j]
                    z[d] = e if inner == "prior" else mu_nk[i, d] + std_nk[i, d] * e
                p = predict_proba(z[None, :])[0]
                acc = p.clone() if acc is None else acc + p
            p_given_alpha.append(acc / n_beta)
        marginal = sum(p_given_alpha) / n_alpha
        h_cond = sum(float(_entropy(p, eps)) for p in p_given_alpha) / n_alpha
        flows.append(float(_entropy(marginal, eps)) - h_cond)
    return torch.tensor(flows, dtype=mu_nk.dtype)
