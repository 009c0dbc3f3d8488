"""Training from shards in the in-memory cell order gives the in-memory weights, bit for bit."""

from __future__ import annotations

import numpy as np
import torch

from cellsight.data import ShardedDataModule


def assert_same_order_training_parity(m_mem, m_sh, stub, **train_kwargs) -> None:
    """Train ``m_mem`` in memory and ``m_sh`` from the shard ``stub`` with one-cell blocks and
    buffers (the shard stream is then the in-memory permutation) and assert identical training
    cells, weights (tolerance 0) and history. Both models are built with the same seed."""
    kw = dict(max_epochs=3, batch_size=32, lr=1e-2, enable_progress_bar=False, **train_kwargs)
    m_mem.train(train_size=0.9, **kw)
    dm = ShardedDataModule(stub, m_sh.adata_manager, batch_size=kw["batch_size"],
                           train_size=0.9, seed=0, block_size=1, buffer_blocks=1)
    m_sh.train(datamodule=dm, **kw)
    np.testing.assert_array_equal(np.sort(m_mem.train_indices_), np.sort(dm.train_indices))
    w_mem, w_sh = m_mem.module.state_dict(), m_sh.module.state_dict()
    assert list(w_mem) == list(w_sh)
    for key in w_mem:
        assert torch.equal(w_mem[key], w_sh[key]), key
    assert m_mem.history.equals(m_sh.history)
