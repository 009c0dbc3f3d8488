"""FADVI's weight averaging: the trained weights are the mean of the epoch-end weights of the
second half of training (:class:`cellsight.models.fadvi.averaging.EpochWeightAveraging`).

Data: 200 of the bundled PBMC cells with the planted batch effect and hidden labels; a small
FADVI (16 hidden units, 4/4/2 latents) trains 4 epochs in about a second.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from cellsight.models import FADVI
from cellsight.models.fadvi.data import pbmc_with_batches
from cellsight.train import EpochWeightAveraging

SMALL = dict(n_hidden=16, n_latent_b=4, n_latent_l=4, n_latent_r=2)
KW = dict(max_epochs=4, batch_size=64, lr=1e-2, enable_progress_bar=False)


@pytest.fixture(scope="module")
def cells():
    adata, _ = pbmc_with_batches(seed=0)
    adata = adata[:200].copy()
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels_observed")
    return adata


class _EpochEnds(pl.Callback):
    """The module's weights at every epoch end and after the final validation."""

    def __init__(self):
        self.epochs, self.validated = [], None

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append({k: v.clone() for k, v in pl_module.module.state_dict().items()})

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated = {k: v.clone() for k, v in pl_module.module.state_dict().items()}


def _weights(model):
    return model.module.state_dict()


def test_trained_weights_are_the_mean_of_the_second_half_epoch_end_weights(cells):
    """Without validation cells the average is swapped in at the end of training: epochs 3 and
    4 of 4 (1-based). The mean is taken in float64 and cast back, as here: equal to float32
    rounding (one ulp, rtol 1e-6)."""
    rec = _EpochEnds()
    model = FADVI(cells, seed=0, **SMALL)
    model.train(train_size=1.0, weight_averaging=0.5, callbacks=[rec], **KW)
    assert len(rec.epochs) == 4
    for key, value in _weights(model).items():
        if not value.is_floating_point():
            continue
        mean = torch.stack([e[key].double() for e in rec.epochs[2:]]).mean(0).to(value.dtype)
        torch.testing.assert_close(value, mean, rtol=1e-6, atol=0.0, msg=key)
    changed = [k for k, v in _weights(model).items() if not torch.equal(v, rec.epochs[-1][k])]
    assert changed  # the average is not the last iterate


def test_validation_after_the_last_epoch_scores_the_averaged_weights(cells):
    rec = _EpochEnds()
    model = FADVI(cells, seed=0, **SMALL)
    model.train(weight_averaging=0.5, callbacks=[rec], **KW)  # 90% train, validated at the end
    for key, value in _weights(model).items():
        assert torch.equal(value, rec.validated[key]), key


def test_weight_averaging_none_keeps_the_last_iterate(cells):
    rec = _EpochEnds()
    model = FADVI(cells, seed=0, **SMALL)
    model.train(train_size=1.0, weight_averaging=None, callbacks=[rec], **KW)
    for key, value in _weights(model).items():
        assert torch.equal(value, rec.epochs[-1][key]), key


def test_weight_averaging_start_outside_0_1_is_rejected():
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        EpochWeightAveraging(1.0)
