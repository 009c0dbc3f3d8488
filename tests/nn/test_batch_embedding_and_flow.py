"""Batch embedding, input gene dropout, norm placement and the flow prior."""

import math

import numpy as np
import pytest
import torch

from cellsight.nn.flows import FlowPrior
from cellsight.nn.layers import BatchEmbedding, gene_dropout, norm_placement


def test_batch_embedding_starts_as_one_hot_and_is_a_point_estimate_in_eval():
    emb = BatchEmbedding(3, 3, sampled=True)
    idx = torch.tensor([[2], [0]])
    emb.eval()
    assert torch.equal(emb(idx), torch.eye(3)[[2, 0]])
    emb.train()
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([emb(idx) for _ in range(4000)])
    np.testing.assert_allclose(draws.mean(0).numpy(), torch.eye(3)[[2, 0]].numpy(), atol=0.06)
    np.testing.assert_allclose(draws.std(0).numpy(), 1.0, atol=0.05)  # initial scale 1


def test_batch_embedding_kl_is_the_gaussian_closed_form():
    emb = BatchEmbedding(2, 4, sampled=True)
    with torch.no_grad():
        emb.mean_bd.copy_(torch.randn(2, 4))
        emb.log_scale_bd.copy_(torch.randn(2, 4) * 0.3)
    idx = torch.tensor([1, 0, 1])
    m = emb.mean_bd[idx]
    s = emb.log_scale_bd[idx].exp() + 1e-5
    expected = (0.5 * (s**2 + m**2 - 1) - torch.log(s)).sum(-1)
    torch.testing.assert_close(emb.kl_n(idx), expected)


def test_point_batch_embedding_has_no_distribution():
    emb = BatchEmbedding(2, 2, sampled=False)
    with pytest.raises(ValueError, match="point estimate"):
        emb.kl_n(torch.tensor([0]))


def test_gene_dropout_zeroes_the_requested_fraction_without_rescaling():
    torch.manual_seed(0)
    x = torch.full((200, 500), 3.0)
    y = gene_dropout(x, 0.3)
    assert set(torch.unique(y).tolist()) == {0.0, 3.0}
    assert abs(float((y == 0).float().mean()) - 0.3) < 0.01
    assert gene_dropout(x, 0.0) is x


def test_norm_placement_flags_and_errors():
    assert norm_placement("both", "x") == (True, True)
    assert norm_placement("encoder", "x") == (True, False)
    assert norm_placement("none", "x") == (False, False)
    with pytest.raises(ValueError, match="use_layer_norm='all'"):
        norm_placement("all", "use_layer_norm")


def test_flow_prior_is_a_normalised_density():
    # 1-D flow: the density integrates to one (trapezoid rule on [-12, 12], 1e-3)
    torch.manual_seed(0)
    prior = FlowPrior(1, hidden_features=(8,))
    grid = torch.linspace(-12, 12, 20001)[:, None]
    with torch.no_grad():
        dens = prior.log_prob(grid).exp().numpy()
    integral = np.trapezoid(dens, grid[:, 0].numpy())
    assert math.isclose(integral, 1.0, rel_tol=1e-3)
    assert prior.log_prob(torch.zeros(5, 7, 1)).shape == (5, 7)
    assert prior.sample(3).shape == (3, 1)
