"""Models train from shards with no code change; same weights as in memory; resume; DDP."""

import lightning.pytorch as pl
import numpy as np
import pytest
from shard_helpers import FileRecorder, cut, mouse_cells, read_recorded, write_shards

from cellsight.data import ShardedDataModule, read_shards
from cellsight.train import TrainingPlan, fit
from parity import assert_same_order_training_parity
from toymodel import ToyModel, ToyModule

N = 300


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    cells = mouse_cells(n_cells=N, n_genes=60)
    keep = np.asarray(cells.X.sum(1)).ravel() > 0
    cells = cells[keep].copy()
    paths = write_shards(cells, tmp_path_factory.mktemp("sh"), cut(cells.n_obs, 3))
    return cells, paths


def _pair(data, seed=0):
    cells, paths = data
    mem, stub = cells.copy(), read_shards(paths)
    for a in (mem, stub):
        ToyModel.setup_anndata(a, batch_key="batch")
    return ToyModel(mem, seed=seed), ToyModel(stub, seed=seed), mem, stub


def test_a_model_trains_from_shards_with_no_code_change(data):
    _, m_sh, mem, stub = _pair(data)
    before = m_sh.get_rates()
    hist = m_sh.train(max_epochs=2, batch_size=64, lr=1e-2, enable_progress_bar=False)
    assert list(hist.index) == [0, 1] and "elbo_validation" in hist
    assert len(m_sh.train_indices_) + len(m_sh.validation_indices_) <= stub.n_obs
    after = m_sh.get_rates()
    x = mem.X.toarray()
    nll = [-(x * np.log(r) - r).sum() for r in (before, after)]
    assert nll[1] < nll[0]
    # inference from the shards equals inference from the in-memory AnnData, same weights
    np.testing.assert_allclose(after, m_sh.get_rates(adata=mem), rtol=1e-6)


def test_training_from_shards_gives_the_in_memory_weights_for_the_same_cell_order(data):
    """With one-cell blocks and buffers the shard stream is the in-memory permutation, so the
    same seed gives bit-identical weights."""
    m_mem, m_sh, _, stub = _pair(data)
    assert_same_order_training_parity(m_mem, m_sh, stub)


def test_default_block_shuffle_trains_to_a_comparable_loss(data):
    """Block shuffling changes the order only: the final training loss is close to in-memory
    training's (same data, same epochs; tolerance 5% of the loss)."""
    m_mem, m_sh, _, _ = _pair(data)
    kw = dict(max_epochs=4, batch_size=32, lr=1e-2, train_size=1.0, enable_progress_bar=False)
    a = m_mem.train(**kw)["elbo_train"].iloc[-1]
    b = m_sh.train(**kw)["elbo_train"].iloc[-1]
    assert abs(a - b) < 0.05 * abs(a)


def test_non_count_values_are_caught_when_streaming_starts(data, tmp_path):
    cells, _ = data
    bad = cells.copy()
    x = bad.X.tolil()
    x[100, 2] = 0.5
    bad.X = x.tocsr()
    stub = read_shards(write_shards(bad, tmp_path, [(0, bad.n_obs)]))
    ToyModel.setup_anndata(stub, batch_key="batch")
    model = ToyModel(stub)  # the zero stub passes the up-front check
    with pytest.raises(ValueError, match=r"non-integer value\(s\) \(first at cell"):
        model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)


class _Recorder(pl.Callback):
    """Records the cells of every training step; optionally checkpoints and stops mid-epoch."""

    def __init__(self, stop_at=None, ckpt=None):
        self.seen, self.stop_at, self.ckpt = [], stop_at, ckpt

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch["ind_x"][:, 0].cpu().numpy()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == self.stop_at:
            trainer.save_checkpoint(self.ckpt)
            raise _Stop


class _Stop(Exception):
    pass


def _fit(stub, manager, callback, ckpt_path=None):
    dm = ShardedDataModule(stub, manager, batch_size=40, block_size=8, buffer_blocks=2,
                           return_indices=True)
    plan = TrainingPlan(ToyModule(stub.n_vars, 3), lr=1e-2)
    return fit(plan, dm, max_epochs=3, callbacks=[callback], enable_progress_bar=False,
               ckpt_path=ckpt_path)


def _epoch(seen, epoch):
    return np.concatenate([c for e, c in seen if e == epoch])


def test_lightning_checkpoint_resumes_mid_epoch_with_exactly_the_remaining_cells(data, tmp_path):
    _, m_sh, _, stub = _pair(data)
    full = _Recorder()
    _fit(stub, m_sh.adata_manager, full)
    e0, e1 = _epoch(full.seen, 0), _epoch(full.seen, 1)
    assert sorted(e1) == list(range(stub.n_obs)) and not np.array_equal(e0, e1)
    ckpt = str(tmp_path / "mid.ckpt")
    stopped = _Recorder(stop_at=(1, 2), ckpt=ckpt)
    with pytest.raises(_Stop):
        _fit(stub, m_sh.adata_manager, stopped)
    resumed = _Recorder()
    _fit(stub, m_sh.adata_manager, resumed, ckpt_path=ckpt)
    done = _epoch(stopped.seen, 1)
    assert len(done) == 3 * 40
    np.testing.assert_array_equal(np.concatenate([done, _epoch(resumed.seen, 1)]), e1)
    np.testing.assert_array_equal(_epoch(resumed.seen, 2), _epoch(full.seen, 2))


def test_scvi_trains_from_shards(data):
    from cellsight.models import SCVI

    cells, paths = data
    stub = read_shards(paths)
    SCVI.setup_anndata(stub, batch_key="batch")
    model = SCVI(stub, n_latent=4, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    z = model.get_latent_representation()
    assert z.shape == (cells.n_obs, 4)
    np.testing.assert_allclose(z, model.get_latent_representation(adata=cells.copy()), rtol=1e-5)


@pytest.mark.ddp
@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_process_ddp_training_splits_cells_and_trains(data, tmp_path, num_workers):
    """Lightning ddp_spawn (gloo): ranks detected from torch.distributed, disjoint training
    cells padded to equal steps, validation cells exactly once, and the model trains; also
    with DataLoader workers, which are forked outside the process group (the loader pins the
    rank before forking them)."""
    _, m_sh, mem, stub = _pair(data)
    before = m_sh.get_rates()
    # 239 training cells: one padded; 55 validation cells, 28 + 27: 2 and 1 uneven steps
    dm = ShardedDataModule(stub, m_sh.adata_manager, batch_size=27, train_size=0.81,
                           block_size=8, buffer_blocks=2, return_indices=True,
                           num_workers=num_workers)
    assert (dm.n_train, dm.n_validation) == (239, 55)
    hist = m_sh.train(max_epochs=2, lr=1e-2, devices=2, accelerator="cpu", datamodule=dm,
                      callbacks=[FileRecorder(str(tmp_path))], enable_progress_bar=False)
    assert len(hist) == 2 and np.isfinite(hist["elbo_train"]).all()
    after = m_sh.get_rates()
    x = mem.X.toarray()
    assert -(x * np.log(after) - after).sum() < -(x * np.log(before) - before).sum()
    train = [read_recorded(str(tmp_path), "train", r) for r in (0, 1)]
    val = [read_recorded(str(tmp_path), "val", r) for r in (0, 1)]
    for epoch in (0, 1):
        parts = [np.concatenate(t[epoch]) for t in train]
        assert len(train[0][epoch]) == len(train[1][epoch])  # same number of steps
        assert not set(parts[0]) & set(parts[1])  # padding repeats a rank's own cells
        assert set(np.concatenate(parts)) == set(dm.train_indices)
        assert sum(map(len, parts)) == dm.n_train + dm.n_train % 2
        assert [len(r[epoch]) for r in val] == [2, 1]
        v = np.concatenate([np.concatenate(r[epoch]) for r in val])
        assert len(v) == dm.n_validation and set(v) == set(dm.validation_indices)
    assert not np.array_equal(np.concatenate(train[0][0]), np.concatenate(train[0][1]))
