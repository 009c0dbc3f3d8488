"""The ZINB log-likelihood with a hand-written backward, behind
:func:`cellsight.nn.likelihoods.zinb_log_likelihood_n` (used by every model with a ZINB
likelihood: SCVI, FADVI).

``ZINBLogLikelihood.apply(x, mu, theta, zi_logits)`` equals scvi-tools'
``ZeroInflatedNegativeBinomial(mu, theta, zi_logits).log_prob(x).sum(-1)`` (same formulas and
``eps``; the gamma-function terms evaluated at the non-zero counts only, as in
:func:`cellsight.nn.likelihoods.zinb_log_likelihood_n`). What differs is the gradient: autograd
records about twenty ``(cells, genes)`` operations for the backward of the ZINB formula; with
``a = theta (log theta - log(theta + mu)) - zi_logits`` (the log-probability of a zero under
the NB minus the zero-inflation logit) and ``w = sigmoid(a)`` at zero counts, ``1`` at non-zero
ones, the derivatives per entry are

* ``d/d zi_logits = sigmoid(-zi_logits) - w``
* ``d/d mu = -w theta / (theta + mu) + x (1 / mu - 1 / (theta + mu))``
* ``d/d theta = w (log theta + 1 - log(theta + mu) - theta / (theta + mu)) - x / (theta + mu)
  + [x > 0] (digamma(x + theta) - digamma(theta))``

(``eps`` where scvi-tools puts it), which take about ten dense operations, most in place, and a
few on the non-zero entries; ``digamma(theta)`` is taken per gene, not per non-zero entry, and
``digamma(x + theta)`` by :func:`digamma_from_1`. The tests compare values with scvi-tools and
gradients with autograd's.

The hand-written backward is used when only the model's outputs need gradients (training);
when the counts themselves require a gradient (attributions of the loss) or a second derivative
may be needed, the autograd version is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ZINBLogLikelihood", "digamma_from_1"]

_EPS = 1e-8


def digamma_from_1(z: torch.Tensor) -> torch.Tensor:
    """``digamma(z)`` for ``z >= 1`` (a count ``>= 1`` plus ``theta > 0``): on CPU about 1.5
    times cheaper than ``torch.digamma`` (285 against 420 us for 22,000 values, one thread).

    Five steps of the recurrence ``psi(z) = psi(z + 1) - 1 / z`` bring the argument to
    ``w = z + 5 >= 6``, where the asymptotic series ``log w - 1/(2w) - 1/(12w^2) + 1/(120w^4)
    - 1/(252w^6)`` is accurate to ``1/(240 w^8) < 3e-9``.
    """
    shift = torch.arange(5, dtype=z.dtype, device=z.device)
    acc = (z.unsqueeze(-1) + shift).reciprocal_().sum(-1)
    w = z + 5.0
    r = w.reciprocal()
    r2 = r * r
    series = r2 * (r2 * (r2 * (-1.0 / 252.0) + 1.0 / 120.0) - 1.0 / 12.0)
    return torch.log(w).sub_(acc).sub_(r, alpha=0.5).add_(series)


class ZINBLogLikelihood(torch.autograd.Function):
    """Per-cell ZINB log-likelihood with an analytic backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x_ng, mu_ng, theta, zi_ng):
        g = x_ng.shape[-1]
        theta_e = theta + _EPS
        tm_ng = mu_ng + theta_e  # theta + mu + eps
        t_ng = torch.log(tm_ng)
        lth = torch.log(theta_e)
        a_ng = (lth - t_ng).mul_(theta).sub_(zi_ng)
        dense_ng = F.softplus(a_ng).sub_(F.softplus(-zi_ng)).sub_(x_ng * t_ng)
        flat = torch.nonzero(x_ng.reshape(-1) > 0).reshape(-1)
        rows = flat // g
        cols = flat - rows * g
        x_v = x_ng.reshape(-1).index_select(0, flat)
        if theta.dim() == 1:
            th_v = theta.index_select(0, cols)
            lgamma_th_v = torch.lgamma(theta).index_select(0, cols)
        else:
            th_v = theta.reshape(-1).index_select(0, flat)
            lgamma_th_v = torch.lgamma(th_v)
        mu_v = mu_ng.reshape(-1).index_select(0, flat)
        a_v = a_ng.reshape(-1).index_select(0, flat)
        terms_v = x_v * torch.log(mu_v + _EPS)
        terms_v += torch.lgamma(x_v + th_v) - lgamma_th_v - torch.lgamma(x_v + 1)
        terms_v += a_v - F.softplus(a_v)
        ll_n = dense_ng.sum(-1).index_add_(0, rows, terms_v)
        ctx.save_for_backward(theta, zi_ng, tm_ng, t_ng, lth, a_ng, flat, rows, cols, x_v,
                              th_v, mu_v)
        return ll_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_n):
        theta, zi_ng, tm_ng, t_ng, lth, a_ng, flat, rows, cols, x_v, th_v, mu_v = (
            ctx.saved_tensors
        )
        need_mu, need_theta, need_zi = ctx.needs_input_grad[1:4]
        grad_n1 = grad_n.unsqueeze(-1)
        w_ng = torch.sigmoid(a_ng)
        w_ng.view(-1).index_fill_(0, flat, 1.0)
        tm_v = tm_ng.reshape(-1).index_select(0, flat)
        g_rows_v = grad_n.index_select(0, rows)
        grad_mu = grad_theta = grad_zi = None
        r_ng = None
        if need_mu or need_theta:
            r_ng = theta / tm_ng
        if need_mu:
            grad_mu = (w_ng * r_ng).neg_()
            sparse_v = x_v * (1.0 / (mu_v + _EPS) - 1.0 / tm_v)
            grad_mu.view(-1).index_add_(0, flat, sparse_v)
            grad_mu.mul_(grad_n1)
        if need_zi:
            grad_zi = torch.sigmoid(zi_ng).neg_().add_(1.0).sub_(w_ng).mul_(grad_n1)
        if need_theta:
            c = lth + theta / (theta + _EPS)
            d_ng = (c - t_ng).sub_(r_ng).mul_(w_ng)
            if theta.dim() == 1:  # digamma of the genes' theta, then picked
                digamma_th_v = torch.digamma(theta).index_select(0, cols)
            else:
                digamma_th_v = torch.digamma(th_v)
            sparse_v = digamma_from_1(x_v + th_v) - digamma_th_v - x_v / tm_v
            if theta.dim() == 1:
                grad_theta = grad_n @ d_ng
                grad_theta.index_add_(0, cols, sparse_v * g_rows_v)
            else:
                grad_theta = d_ng.mul_(grad_n1)
                grad_theta.view(-1).index_add_(0, flat, sparse_v * g_rows_v)
        return None, grad_mu, grad_theta, grad_zi

