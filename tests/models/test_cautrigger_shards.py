"""CauTrigger1L / 2L train from read_shards stubs on the files' counts (not the stub's zero X),
with CauTrigger2L's downstream matrix loaded through read_shards(obsm_keys=...)."""

import numpy as np
import pytest
import torch

from cellsight.data import read_shards
from cellsight.data.datamodule import AnnDataModule
from cellsight.datasets.causal import simulate_causal_cascade, split_cascade
from cellsight.models import CauTrigger1L, CauTrigger2L

torch.set_num_threads(1)

FAST = dict(max_epochs=3, batch_size=64, n_alpha=3, n_beta=4, enable_progress_bar=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cells = split_cascade(simulate_causal_cascade(
        n_cells=200, n_up=20, n_down=10, n_up_causal=4, n_up_spurious=6, n_down_causal=3,
        n_down_spurious=3, seed=0))
    d = tmp_path_factory.mktemp("ct")
    paths = []
    for k, (lo, hi) in enumerate([(0, 70), (70, 200)]):
        p = str(d / f"s{k}.h5ad")
        cells[lo:hi].copy().write_h5ad(p)
        paths.append(p)
    return cells, paths


@pytest.mark.parametrize("cls", [CauTrigger1L, CauTrigger2L], ids=["1L", "2L"])
def test_training_from_shards_fits_the_counts_as_in_memory(data, cls):
    cells, paths = data
    stub = read_shards(paths, obsm_keys=["X_down"] if cls is CauTrigger2L else None)
    mem = cells.copy()
    models = []
    for a in (mem, stub):
        cls.setup_anndata(a)
        m = cls(a, n_latent=4, n_causal=2, seed=0)
        m.train(**FAST)
        models.append(m)
    m_mem, m_sh = models
    # the same split, so the same training cells for the prior (which reads the files' counts)
    np.testing.assert_array_equal(m_mem.train_indices_, m_sh.train_indices_)
    # training on the stub's zero X gave a reconstruction loss 3.5x in-memory's (2.26 / 0.64)
    rec = [m.history["recons_loss_train"].iloc[-1] for m in models]
    assert abs(rec[1] - rec[0]) < 0.05 * rec[0]
    # the shard-trained model explains the in-memory cells as it explains the stub
    w_sh, _ = m_sh.get_up_feature_weights(method="Grad", sort_by_weight=False)
    w_mem_cells, _ = m_sh.get_up_feature_weights(mem, method="Grad", sort_by_weight=False)
    np.testing.assert_allclose(w_sh["weight"], w_mem_cells["weight"], rtol=1e-5, atol=1e-8)


def test_read_shards_loads_obsm_keys_and_their_names(data):
    cells, paths = data
    stub = read_shards(paths, obsm_keys=["X_down"])
    np.testing.assert_array_equal(stub.obsm["X_down"], cells.obsm["X_down"])
    assert list(stub.uns["X_down_feature"]) == list(cells.uns["X_down_feature"])
    with pytest.raises(ValueError, match=r"has no obsm\['nope'\]"):
        read_shards(paths, obsm_keys=["nope"])
    plain = read_shards(paths)
    with pytest.raises(ValueError, match=r"read_shards\(paths, obsm_keys=\['X_down'\]\)"):
        CauTrigger2L.setup_anndata(plain)


def test_an_in_memory_data_module_refuses_a_shard_stub(data):
    _, paths = data
    stub = read_shards(paths)
    CauTrigger1L.setup_anndata(stub)
    m = CauTrigger1L(stub, n_latent=4, n_causal=2)
    with pytest.raises(ValueError, match="use cellsight.data.ShardedDataModule"):
        AnnDataModule(m.adata_manager)
