"""FADVI trains from ``cellsight.data.read_shards`` shards and with two DDP processes on CPU.

Data: 300 of the bundled PBMC cells with the planted batch effect and 20% hidden labels
(:func:`cellsight.models.fadvi.data.pbmc_with_batches`), written as three uneven ``.h5ad``
shards; a small FADVI (16 hidden units, 4/4/2 latents) keeps each run to a few seconds.
Shard 0 holds no ``CD34+`` cell, so AnnData drops that category from it when the shard is
written: the stub must still order the label categories as the in-memory AnnData does, or the
label codes (the label head's class order) and with them every weight differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from cellsight.data import read_shards
from cellsight.models import FADVI
from cellsight.models.fadvi.data import pbmc_with_batches
from parity import assert_same_order_training_parity

SMALL = dict(n_hidden=16, n_latent_b=4, n_latent_l=4, n_latent_r=2)
SETUP = dict(batch_key="batch", labels_key="labels_observed")
BOUNDS = [(0, 90), (90, 210), (210, 300)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    adata, _ = pbmc_with_batches(seed=0)
    cells = adata[:300].copy()
    out = tmp_path_factory.mktemp("fadvi_shards")
    paths = []
    for k, (lo, hi) in enumerate(BOUNDS):
        path = str(out / f"s{k}.h5ad")
        cells[lo:hi].copy().write_h5ad(path)
        paths.append(path)
    return cells, paths


def _pair(data, seed=0):
    cells, paths = data
    mem, stub = cells.copy(), read_shards(paths)
    for a in (mem, stub):
        FADVI.setup_anndata(a, **SETUP)
    return FADVI(mem, seed=seed, **SMALL), FADVI(stub, seed=seed, **SMALL), mem, stub


def _label_loss(model, adata) -> float:
    """Mean label cross-entropy of the label head over the labelled cells."""
    prob = model.predict(adata=adata, soft=True)
    obs = adata.obs["labels_observed"].astype(str).to_numpy()
    keep = obs != "Unknown"
    cols = prob.columns.get_indexer(obs[keep])
    return float(-np.log(prob.to_numpy()[keep][np.arange(keep.sum()), cols]).mean())


def test_fadvi_trains_from_shards_and_infers_as_from_memory(data):
    _, m_sh, mem, stub = _pair(data)
    before = _label_loss(m_sh, mem)
    hist = m_sh.train(max_epochs=3, batch_size=64, lr=1e-2, enable_progress_bar=False)
    assert list(hist.index) == [0, 1, 2] and np.isfinite(hist["elbo_train"]).all()
    assert "classification_loss_label_train" in hist and "adversarial_loss_train" in hist
    assert _label_loss(m_sh, mem) < before  # the label head learnt from the streamed labels
    # inference over the shards equals inference over the in-memory AnnData (same weights)
    for rep in ("b", "l", "r"):
        z_sh = m_sh.get_latent_representation(representation=rep)
        z_mem = m_sh.get_latent_representation(adata=mem, representation=rep)
        assert z_sh.shape == (stub.n_obs, SMALL[f"n_latent_{rep}"])
        np.testing.assert_allclose(z_sh, z_mem, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(m_sh.predict()), np.asarray(m_sh.predict(adata=mem))
    )


class RanksAgree(Callback):
    """Fails the run if, at any epoch end, a rank's weights differ from rank 0's."""

    def on_train_epoch_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.module.parameters()])
        every = trainer.strategy.all_gather(flat)
        if not all(torch.equal(every[0], w) for w in every[1:]):
            raise AssertionError(f"rank weights differ after epoch {trainer.current_epoch}")


@pytest.mark.ddp
@pytest.mark.parametrize("mode", ["alternating", "reversal"])
def test_fadvi_trains_with_two_ddp_processes_on_shards(data, mode):
    """ddp_spawn (gloo) over the shards, both adversarial modes: every parameter gets a
    gradient on both ranks (DDP would fail on an unused one, e.g. a label head in a minibatch
    with no labelled cell), the ranks see different cells yet keep identical weights (DDP's
    reducer for reversal; the plan's own all-reduce of both backward passes for alternating),
    the epoch metrics are reduced over the ranks and the label head learns."""
    _, m_sh, mem, _ = _pair(data)
    before = _label_loss(m_sh, mem)
    adv_before = [p.detach().clone() for p in m_sh.module.adversaries.parameters()]
    hist = m_sh.train(max_epochs=3, batch_size=32, lr=1e-2, devices=2, accelerator="cpu",
                      enable_progress_bar=False, callbacks=[RanksAgree()],
                      plan_kwargs={"adversarial_training": mode})
    assert all(not torch.equal(a, b)
               for a, b in zip(m_sh.module.adversaries.parameters(), adv_before))
    assert list(hist.index) == [0, 1, 2]
    assert np.isfinite(hist["elbo_train"]).all()
    # the validation cells (on both ranks) are scored after the last epoch only
    assert np.isfinite(hist["elbo_validation"].iloc[-1])
    assert hist["elbo_validation"].iloc[:-1].isna().all()
    assert _label_loss(m_sh, mem) < before
    z = m_sh.get_latent_representation()
    assert np.isfinite(z).all() and z.shape == (mem.n_obs, SMALL["n_latent_l"])


def test_shard_stub_keeps_the_in_memory_label_order_when_shard_0_lacks_a_class(data):
    cells, paths = data
    stub = read_shards(paths)
    assert "CD34+" not in set(cells[:90].obs["labels_observed"])  # the case under test
    assert list(stub.obs["labels_observed"].cat.categories) == list(
        cells.obs["labels_observed"].cat.categories
    )
    mem = cells.copy()
    for a in (mem, stub):
        FADVI.setup_anndata(a, **SETUP)
    assert FADVI(stub, **SMALL).class_names == FADVI(mem, **SMALL).class_names


def test_training_from_shards_gives_the_in_memory_weights_for_the_same_cell_order(data):
    """With one-cell blocks and buffers the shard stream is the in-memory permutation, so the
    same seed gives bit-identical weights and history (tolerance 0, as for SCVI's toy model in
    ``tests/data/test_shards_training.py``): the minibatches hold the same float32 values, and
    dropout, the training split and the shuffles draw the same random numbers."""
    m_mem, m_sh, _, stub = _pair(data)
    assert_same_order_training_parity(m_mem, m_sh, stub)
