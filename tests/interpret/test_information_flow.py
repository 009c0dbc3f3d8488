"""Argument checks of the information-flow estimator (the estimator itself is tested against
its loop reference in tests/models/test_cautrigger.py)."""

import pytest
import torch

from cellsight.interpret.information_flow import draw_noise, information_flow


def _proba(z):
    return torch.softmax(torch.stack([z.sum(-1), -z.sum(-1)], -1), -1)


def _posterior(n=3, k=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, k, generator=g), torch.rand(n, k, generator=g) + 0.1


def test_zero_cells_is_a_clear_error_not_an_empty_cat():
    mu, std = _posterior(0)
    with pytest.raises(ValueError, match=r"got 0 cells.*n_cells >= 1"):
        information_flow(_proba, mu, std, [0], n_alpha=2, n_beta=2)


@pytest.mark.parametrize("name", ["n_alpha", "n_beta"])
@pytest.mark.parametrize("value, err, match", [
    (0, ValueError, "=0 must be >= 1"),
    (-3, ValueError, "=-3 must be >= 1"),
    (2.5, TypeError, "must be an integer >= 1"),
    (True, TypeError, "must be an integer >= 1"),
])
def test_draw_counts_must_be_positive_integers(name, value, err, match):
    mu, std = _posterior()
    sizes = {"n_alpha": 2, "n_beta": 2, name: value}
    with pytest.raises(err, match=f"{name}{match}" if err is ValueError else match):
        information_flow(_proba, mu, std, [0], **sizes)


def test_draw_noise_rejects_zero_cells():
    with pytest.raises(ValueError, match="n_cells=0 must be >= 1"):
        draw_noise(0, 4, [0], 2, 2)


def test_noise_of_the_wrong_size_is_rejected():
    mu, std = _posterior(3)
    noise = draw_noise(2, 4, [0], 2, 2)  # drawn for 2 cells
    with pytest.raises(ValueError, match="noise has shapes"):
        information_flow(_proba, mu, std, [0], noise=noise)


def test_valid_arguments_still_give_one_flow_per_cell():
    mu, std = _posterior(3)
    flow = information_flow(_proba, mu, std, [0, 1], n_alpha=3, n_beta=4,
                            generator=torch.Generator().manual_seed(1))
    assert flow.shape == (3,) and torch.isfinite(flow).all() and (flow >= -1e-6).all()
