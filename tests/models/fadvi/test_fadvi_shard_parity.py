"""FADVI trained from shards gives bit-identical weights to in-memory training (same seed).

Data as in ``tests/models/test_fadvi_shards.py``: 300 of the bundled PBMC cells with the
planted batch effect and 20% hidden labels, cut into three uneven ``.h5ad`` shards. Shard 0
holds no ``CD34+`` cell, so AnnData drops that category from it when the shard is written:
the stub must still order the label categories as the in-memory AnnData does, or the label
codes (the label head's class order) and with them every weight differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsight.data import ShardedDataModule, read_shards
from cellsight.models import FADVI
from cellsight.models.fadvi.data import pbmc_with_batches

SMALL = dict(n_hidden=16, n_latent_b=4, n_latent_l=4, n_latent_r=2)
SETUP = dict(batch_key="batch", labels_key="labels_observed")
BOUNDS = [(0, 90), (90, 210), (210, 300)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    adata, _ = pbmc_with_batches(seed=0)
    cells = adata[:300].copy()
    out = tmp_path_factory.mktemp("fadvi_parity")
    paths = []
    for k, (lo, hi) in enumerate(BOUNDS):
        path = str(out / f"s{k}.h5ad")
        cells[lo:hi].copy().write_h5ad(path)
        paths.append(path)
    return cells, paths


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
    cells, paths = data
    mem, stub = cells.copy(), read_shards(paths)
    for a in (mem, stub):
        FADVI.setup_anndata(a, **SETUP)
    m_mem, m_sh = FADVI(mem, seed=0, **SMALL), FADVI(stub, seed=0, **SMALL)
    kw = dict(max_epochs=3, batch_size=32, lr=1e-2, enable_progress_bar=False)
    m_mem.train(train_size=0.9, **kw)
    dm = ShardedDataModule(stub, m_sh.adata_manager, batch_size=32, train_size=0.9, seed=0,
                           block_size=1, buffer_blocks=1)
    m_sh.train(datamodule=dm, **kw)
    np.testing.assert_array_equal(np.sort(m_mem.train_indices_), np.sort(dm.train_indices))
    w_mem, w_sh = m_mem.module.state_dict(), m_sh.module.state_dict()
    assert list(w_mem) == list(w_sh)
    for key in w_mem:
        assert torch.equal(w_mem[key], w_sh[key]), key
    assert m_mem.history.equals(m_sh.history)
