"""cellsight's count log-likelihoods against scvi-tools' distributions (values and gradients).

Same formulas, different summation order (non-zero counts only for the gamma terms), so the
values agree to float32 rounding (rtol 1e-5) and the gradients to 1e-4 relative (1e-4 absolute
for the per-gene dispersion, whose gradient is a sum over cells of O(1) terms that cancel).
"""

import pytest
import torch
from scvi.distributions import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial

from cellsight.nn.likelihoods import (
    nb_log_likelihood_n,
    poisson_log_likelihood_n,
    zinb_log_likelihood_n,
)


def _data(per_cell_theta: bool, density_rate: float = 0.5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n, g = 64, 50
    x = torch.poisson(torch.rand(n, g, generator=gen) * density_rate * 4, generator=gen)
    x[0] = 0.0  # an all-zero row
    mu = (torch.rand(n, g, generator=gen) * 5 + 1e-3).requires_grad_()
    shape = (n, g) if per_cell_theta else (g,)
    theta = (torch.rand(shape, generator=gen) * 10 + 0.05).requires_grad_()
    logits = torch.randn(n, g, generator=gen).requires_grad_()
    return x, mu, theta, logits


def _value_and_grads(fn, params):
    value = fn()
    grads = torch.autograd.grad(value.sum(), params)
    return value.detach(), grads


def _compare(ours, ref, params):
    v1, g1 = _value_and_grads(ours, params)
    v2, g2 = _value_and_grads(ref, params)
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-4)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("per_cell_theta", [False, True])
@pytest.mark.parametrize("rate", [0.05, 0.5, 3.0])
def test_nb_matches_scvi_tools(per_cell_theta, rate):
    x, mu, theta, _ = _data(per_cell_theta, rate)
    _compare(
        lambda: nb_log_likelihood_n(x, mu, theta),
        lambda: NegativeBinomial(mu=mu, theta=theta).log_prob(x).sum(-1),
        (mu, theta),
    )


@pytest.mark.parametrize("per_cell_theta", [False, True])
@pytest.mark.parametrize("rate", [0.05, 0.5, 3.0])
def test_zinb_matches_scvi_tools(per_cell_theta, rate):
    x, mu, theta, logits = _data(per_cell_theta, rate)
    _compare(
        lambda: zinb_log_likelihood_n(x, mu, theta, logits),
        lambda: (
            ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=logits).log_prob(x).sum(-1)
        ),
        (mu, theta, logits),
    )


@pytest.mark.parametrize("rate", [0.05, 3.0])
def test_poisson_matches_scvi_tools(rate):
    x, mu, _, _ = _data(False, rate)
    _compare(
        lambda: poisson_log_likelihood_n(x, mu),
        lambda: Poisson(rate=mu).log_prob(x).sum(-1),
        (mu,),
    )


def test_nonzero_flat_equals_torch_nonzero_for_any_layout():
    from cellsight.nn.zinb_grad import nonzero_flat

    x, _, _, _ = _data(False, 0.5)
    for t in (x, x.double(), x.T, x[:, ::3]):  # contiguous, float64, transposed, strided
        assert torch.equal(nonzero_flat(t), torch.nonzero(t.reshape(-1) > 0).reshape(-1))
    assert nonzero_flat(torch.zeros(3, 4)).numel() == 0


def test_lgamma_of_counts_from_the_table_equals_torch_lgamma():
    from cellsight.nn.zinb_grad import lgamma_counts_plus_1

    counts = torch.tensor([1.0, 2.0, 7.0, 150.0, 4095.0])
    assert torch.equal(lgamma_counts_plus_1(counts), torch.lgamma(counts + 1))  # the table
    assert torch.equal(lgamma_counts_plus_1(counts.double()), torch.lgamma(counts.double() + 1))
    for other in (torch.tensor([1.0, 5000.0]), torch.tensor([0.5, 2.0])):  # evaluated
        assert torch.equal(lgamma_counts_plus_1(other), torch.lgamma(other + 1))
    x = counts.clone().requires_grad_()
    lgamma_counts_plus_1(x).sum().backward()  # a gradient reaches the counts (attributions)
    torch.testing.assert_close(x.grad, torch.digamma(counts + 1))
