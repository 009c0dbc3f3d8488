"""FADVI's faster training pieces equal the plain formulas: the ZINB likelihood with its
hand-written backward, the fast digamma, the stacked head cross-entropies and the per-head
gradient scaling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scvi.distributions import ZeroInflatedNegativeBinomial

from cellsight.models.fadvi.heads import ParallelClassifiers
from cellsight.nn.likelihoods import zinb_log_likelihood_autograd_n as autograd_zinb
from cellsight.nn.likelihoods import zinb_log_likelihood_n
from cellsight.nn.zinb_grad import digamma_from_1


def zinb_inputs(per_cell_theta: bool, dtype=torch.float64, n: int = 40, g: int = 25):
    gen = torch.Generator().manual_seed(0)
    mu = torch.rand(n, g, generator=gen, dtype=dtype) * 8 + 1e-3
    shape = (n, g) if per_cell_theta else (g,)
    theta = torch.rand(shape, generator=gen, dtype=dtype) * 5 + 0.05
    zi = torch.randn(n, g, generator=gen, dtype=dtype) * 2
    keep = torch.rand(n, g, generator=gen, dtype=dtype) > 0.5
    x = torch.poisson(mu * keep, generator=gen)
    return x, mu, theta, zi


@pytest.mark.parametrize("per_cell_theta", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zinb_likelihood_matches_scvi_tools_log_prob(per_cell_theta, dtype):
    x, mu, theta, zi = zinb_inputs(per_cell_theta, dtype)
    params = [t.clone().requires_grad_() for t in (mu, theta, zi)]
    ours_n = zinb_log_likelihood_n(x, *params)  # the hand-written-backward path
    ref_n = ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=zi).log_prob(x).sum(-1)
    # same formulas; float32 rounding of a sum of 25 terms of size ~10 stays below 1e-5 relative
    torch.testing.assert_close(ours_n.detach(), ref_n, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_cell_theta", [False, True])
def test_zinb_hand_written_gradient_equals_autograd(per_cell_theta):
    x, mu, theta, zi = zinb_inputs(per_cell_theta)
    weight_n = torch.randn(x.shape[0], dtype=x.dtype)  # a non-uniform upstream gradient
    grads = []
    for fn in (zinb_log_likelihood_n, autograd_zinb):
        params = [t.clone().requires_grad_() for t in (mu, theta, zi)]
        (fn(x, *params) * weight_n).sum().backward()
        grads.append([p.grad for p in params])
    # float64; the fast digamma is accurate to 3e-9 absolute, hence the tolerance
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-8)


def test_zinb_falls_back_to_autograd_when_counts_need_a_gradient():
    x, mu, theta, zi = zinb_inputs(False)
    x = x.clone().requires_grad_()
    zinb_log_likelihood_n(x, mu, theta, zi).sum().backward()
    assert x.grad is not None  # attributions of the loss differentiate through the counts


def test_fast_digamma_matches_torch_digamma_from_1():
    z = torch.cat([torch.linspace(1.0, 12.0, 2000, dtype=torch.float64),
                   torch.logspace(1, 4, 500, dtype=torch.float64)])
    # asymptotic series after 5 recurrence steps: error < 1/(240 * 6^8) = 2.5e-9
    torch.testing.assert_close(digamma_from_1(z), torch.digamma(z), rtol=0, atol=3e-9)


def test_stacked_cross_entropies_equal_per_head_cross_entropy_with_masks():
    torch.manual_seed(0)
    heads = ParallelClassifiers([(3, 2), (5, 4), (2, 3)], n_hidden=8, n_layers=2,
                                dropout_rate=0.0, use_batch_norm=False, use_layer_norm=True)
    n = 30
    inputs = [torch.randn(n, k) for k in heads.n_inputs]
    target_gn = torch.stack([torch.randint(0, c, (n,)) for c in heads.n_classes])
    weight_gn = torch.ones(3, n)
    weight_gn[1, :12] = 0.0  # unlabelled cells of head 1
    weight_gn[2] = 0.0  # a minibatch without labelled cells: 0, not NaN
    logits = heads(inputs)
    ce_g = heads.cross_entropy_g(heads.logits_gnc(inputs), target_gn, weight_gn)
    torch.testing.assert_close(ce_g[0], F.cross_entropy(logits[0], target_gn[0]))
    torch.testing.assert_close(ce_g[1], F.cross_entropy(logits[1][12:], target_gn[1, 12:]))
    assert ce_g[2].item() == 0.0


def test_grad_scale_multiplies_each_heads_input_gradient():
    torch.manual_seed(0)
    heads = ParallelClassifiers([(3, 2), (3, 2)], n_hidden=8, n_layers=1, dropout_rate=0.0,
                                use_batch_norm=False)
    x = torch.randn(10, 3)
    grads = {}
    for name, scale in (("plain", None), ("scaled", torch.tensor([-1.0, 2.5]))):
        inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        heads.logits_gnc(inputs, scale).sum().backward()
        grads[name] = [t.grad for t in inputs]
    torch.testing.assert_close(grads["scaled"][0], -grads["plain"][0])
    torch.testing.assert_close(grads["scaled"][1], 2.5 * grads["plain"][1])


def test_fast_dropout_mask_is_the_comparison_of_15_bit_uniforms_with_the_threshold():
    from cellsight.models.fadvi.heads import fast_dropout
    from cellsight.nn.dropout import splitmix_words_torch

    x = torch.randn(3, 50, 7)
    for p in (0.1, 0.5, 0.9):
        torch.manual_seed(1)
        out = fast_dropout(x, p)
        torch.manual_seed(1)  # the same draw, masked by the plain comparison
        n, threshold = x.numel(), round(p * 2**15)
        seed = int(torch.empty((), dtype=torch.int64).random_())  # the generator's seed
        bits = splitmix_words_torch(seed, (n + 3) // 4)
        u = bits.view(torch.int16)[:n] & (2**15 - 1)
        keep = (u >= threshold).view(x.shape).to(x.dtype)
        assert torch.equal(out, x * (keep * (2**15 / (2**15 - threshold))))


def test_correlation_penalty_equals_half_the_off_block_squared_pearson_sum():
    import numpy as np

    from cellsight.models.fadvi.correlation import correlation_penalty_of

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200, 9, generator=gen, dtype=torch.float64)
    z[:, 5] += 0.7 * z[:, 1]  # a cross-block correlation
    widths = [3, 4, 2]
    corr = np.corrcoef(z.numpy(), rowvar=False)
    block = np.repeat(np.arange(3), widths)
    expected = 0.5 * (corr[block[:, None] != block[None, :]] ** 2).sum()
    # eps = 0: the plain Pearson correlations (float64, hence the tight tolerance)
    assert float(correlation_penalty_of(z, widths, eps=0.0)) == pytest.approx(expected, rel=1e-10)


def test_decoder_gets_the_one_hot_batch_and_covariates_scvi_fclayers_would_build():
    """FADVI's module one-hot encodes the decoder's categoricals itself (cheaper than
    ``F.one_hot`` inside ``scvi.nn.FCLayers``); the decoder output is bit-for-bit the same."""
    from scvi import REGISTRY_KEYS as K

    from cellsight.models.fadvi.module import FactorDisentanglementVAE
    from cellsight.models.scvi.module import SingleCellVariationalInference

    torch.manual_seed(0)
    module = FactorDisentanglementVAE([f"g{i}" for i in range(20)], n_batch=3, n_labels=2,
                                      n_classes=2, n_hidden=16, n_cats_per_cov=[4]).eval()
    n = 12
    tensors = {K.X_KEY: torch.poisson(torch.rand(n, 20) * 3) + 1,
               K.BATCH_KEY: torch.randint(0, 3, (n, 1)).float(),
               K.LABELS_KEY: torch.randint(0, 2, (n, 1)).float(),
               K.CAT_COVS_KEY: torch.randint(0, 4, (n, 1)).float()}
    with torch.no_grad():
        inf = module.inference(**module._get_inference_input(tensors), use_latent_mean=True)
        gen_in = module._get_generative_input(tensors, inf)
        ours = module.generative(**gen_in)
        module._categoricals = lambda b, c: SingleCellVariationalInference._categoricals(
            module, b, c)
        ref = module.generative(**gen_in)
    assert torch.equal(ours["px"].mu, ref["px"].mu)
    assert torch.equal(ours["zi_logits"], ref["zi_logits"])


def test_written_out_correlation_gradient_equals_autograd():
    from cellsight.models.fadvi.correlation import (
        correlation_penalty_and_grad,
        correlation_penalty_of,
    )

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(50, 12, generator=gen, dtype=torch.float64)
    z[:, 3] = 2.0  # a constant column: gradient 0 (autograd's subgradient of the norm)
    z[:, 5] += 2 * z[:, 0]  # correlated across blocks
    leaf = z.clone().requires_grad_()
    value = correlation_penalty_of(leaf, [5, 4, 3])
    (grad,) = torch.autograd.grad(value, leaf)
    ours, ours_grad = correlation_penalty_and_grad(z, [5, 4, 3])
    torch.testing.assert_close(ours, value.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, grad, rtol=1e-10, atol=1e-12)
    assert float(grad.abs().max()) > 1e-3 and torch.all(ours_grad[:, 3] == 0)
