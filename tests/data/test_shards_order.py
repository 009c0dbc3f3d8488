"""Sharded data: coverage across ranks and workers, block shuffling, splits, mid-epoch resume."""

import itertools

import numpy as np
import pytest
from shard_helpers import cut, mouse_cells, write_shards

from cellsight.data import ShardedDataModule, read_shards
from cellsight.data.loaders import epoch_permutation, split_indices
from cellsight.data.registry import register, setup_anndata
from cellsight.data.shards_module import sharded_inference_loader
from cellsight.data.shards_plan import epoch_stream, serve_sequence

N = 211  # cells: prime, so no rank, worker or batch count divides it


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    cells = mouse_cells(n_cells=N, n_genes=40)
    return read_shards(write_shards(cells, tmp_path_factory.mktemp("sh"), cut(N, 3)))


def _dm(stub, **kw):
    args = dict(batch_size=16, block_size=8, buffer_blocks=3, seed=7, return_indices=True)
    return ShardedDataModule(stub, **{**args, **kw})


def _cells(batches):
    return np.concatenate([b["ind_x"][:, 0].numpy() for b in batches]).astype(int)


@pytest.mark.parametrize("world,workers", list(itertools.product([1, 2, 3], [0, 2])))
def test_every_cell_exactly_once_across_ranks_and_workers(stub, world, workers):
    parts = []
    for rank in range(world):
        dm = _dm(stub, rank=rank, world_size=world, num_workers=workers)
        loader = dm.predict_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader)
        parts.append(_cells(batches))
    joined = np.concatenate(parts)
    assert len(joined) == N and set(joined) == set(range(N))


@pytest.mark.parametrize("world,workers", [(2, 0), (3, 2)])
def test_training_ranks_run_equal_steps_padding_at_most_world_minus_one_cells(stub, world, workers):
    steps, parts = set(), []
    for rank in range(world):
        dm = _dm(stub, rank=rank, world_size=world, num_workers=workers)
        batches = list(dm.train_dataloader())
        steps.add(len(batches))
        parts.append(_cells(batches))
    joined = np.concatenate(parts)
    assert len(steps) == 1
    assert set(joined) == set(range(N))
    assert len(joined) - N == (-N) % world  # padded to ceil(N / world) per rank


def test_shuffle_is_reproducible_from_the_seed_and_differs_across_epochs(stub):
    a, b = _dm(stub).train_dataloader(), _dm(stub).train_dataloader()
    e0 = _cells(a)
    np.testing.assert_array_equal(e0, _cells(b))
    np.testing.assert_array_equal(e0, _cells(a))  # same epoch again: same order
    a.set_epoch(1)
    e1 = _cells(a)
    assert sorted(e0) == sorted(e1) == list(range(N)) and not np.array_equal(e0, e1)
    other = _dm(stub, seed=8).train_dataloader()
    assert not np.array_equal(e0, _cells(other))


def test_worker_order_is_deterministic(stub):
    a = _cells(_dm(stub, num_workers=2).train_dataloader())
    b = _cells(_dm(stub, num_workers=2).train_dataloader())
    np.testing.assert_array_equal(a, b)


def test_without_buffer_mixing_each_minibatch_is_one_contiguous_block(stub):
    """Block shuffling: with one block per buffer a minibatch is one block of consecutive
    cells, and the blocks come in a shuffled order."""
    dm = _dm(stub, block_size=16, buffer_blocks=1, train_indices=np.arange(208))
    batches = [np.sort(b["ind_x"][:, 0].numpy()) for b in dm.train_dataloader()]
    for c in batches:
        assert len(c) == 16 and (np.diff(c) == 1).all()
    firsts = [c[0] for c in batches]
    assert sorted(firsts) == list(range(0, 208, 16)) and firsts != sorted(firsts)


def test_within_a_buffer_cells_from_several_blocks_are_mixed(stub):
    batch = next(iter(_dm(stub, batch_size=24, block_size=8, buffer_blocks=3).train_dataloader()))
    blocks = set(batch["ind_x"][:, 0].numpy() // 8)
    assert len(blocks) > 1


def test_block_size_one_reproduces_the_in_memory_loader_order(stub):
    train = np.sort(np.random.default_rng(0).choice(N, 150, replace=False))
    for epoch in (0, 3):
        cells, _ = epoch_stream(train, block_size=1, buffer_blocks=1, shuffle=True, seed=4,
                                epoch=epoch)
        np.testing.assert_array_equal(cells, train[epoch_permutation(150, 4, epoch)])


def test_train_validation_split_is_disjoint_complete_and_as_in_memory(stub):
    dm = _dm(stub, train_size=0.7, validation_size=0.3, seed=2)
    train = _cells(dm.train_dataloader())
    val = _cells(dm.val_dataloader())
    assert len(train) == dm.n_train and len(val) == dm.n_validation
    assert not set(train) & set(val) and set(train) | set(val) == set(range(N))
    # the in-memory AnnDataModule's split (an AnnDataModule refuses a stub: its X is zeros)
    train_mem, val_mem = split_indices(N, 0.7, 0.3, 2, shuffle=True)
    np.testing.assert_array_equal(dm.train_indices, train_mem)
    np.testing.assert_array_equal(dm.validation_indices, val_mem)


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_serves_exactly_the_remaining_cells_in_order(stub, workers):
    loader = _dm(stub, num_workers=workers).train_dataloader()
    loader.set_epoch(2)
    full = [b["ind_x"][:, 0].numpy() for b in loader]
    it = iter(loader)
    first = [next(it)["ind_x"][:, 0].numpy() for _ in range(5)]
    state = loader.state_dict()
    del it
    resumed = _dm(stub, num_workers=workers).train_dataloader()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # as the training plan does at the start of the resumed epoch
    rest = [b["ind_x"][:, 0].numpy() for b in resumed]
    np.testing.assert_array_equal(np.concatenate(first + rest), np.concatenate(full))
    assert resumed.state_dict()["batches_done"] == len(full)
    assert len(_cells(resumed)) == N  # then whole epochs again


def test_a_state_saved_at_the_end_of_an_epoch_resumes_with_the_next_full_epoch(stub):
    loader = _dm(stub).train_dataloader()
    loader.set_epoch(4)
    list(loader)
    state = loader.state_dict()
    resumed = _dm(stub).train_dataloader()
    resumed.load_state_dict(state)
    resumed.set_epoch(5)  # the next epoch starts
    expect = _dm(stub).train_dataloader()
    expect.set_epoch(5)
    np.testing.assert_array_equal(_cells(resumed), _cells(expect))


def test_resume_with_another_worker_count_still_serves_exactly_the_rest(stub):
    loader = _dm(stub, num_workers=2).train_dataloader()
    it = iter(loader)
    first = [next(it)["ind_x"][:, 0].numpy() for _ in range(4)]
    state = loader.state_dict()
    del it
    resumed = _dm(stub, num_workers=0).train_dataloader()
    resumed.load_state_dict(state)
    rest = _cells(resumed)
    full = _cells(_dm(stub, num_workers=2).train_dataloader())
    np.testing.assert_array_equal(np.concatenate(first + [rest]), full)


def test_a_dataloader_serves_the_planned_sequence():
    assert list(serve_sequence(7, 3)) == [0, 3, 5, 1, 4, 6, 2]
    assert list(serve_sequence(7, 1)) == list(range(7))


def test_drop_last_and_single_cell_batches(stub):
    assert all(len(b["X"]) == 16 for b in _dm(stub, drop_last=True).train_dataloader())
    # N = 211 = 13 * 16 + 3; with batch_size 30: 211 = 7 * 30 + 1 -> the 1-cell batch is dropped
    sizes = [len(b["X"]) for b in _dm(stub, batch_size=30).train_dataloader()]
    assert sizes == [30] * 7
    sizes = [len(b["X"]) for b in _dm(stub, batch_size=30).predict_dataloader()]
    assert sizes == [30] * 7 + [1]


def test_model_free_module_serves_x_and_batch_codes(stub):
    dm = ShardedDataModule(stub, batch_key="batch", batch_size=64, shuffle=False)
    assert dm.batch_categories == ["b0", "b1", "b2"]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"X", "batch"} and batch["batch"].shape == (64, 1)
    np.testing.assert_array_equal(batch["batch"][:, 0].numpy(), np.arange(64) % 3)


def test_ordered_inference_loader_follows_the_given_indices(stub):
    idx = np.random.default_rng(1).permutation(N)[:90]
    manager = register(stub, setup_anndata(stub, "Toy", batch_key="batch"), "Toy")
    got = list(sharded_inference_loader(stub, manager, idx, batch_size=25))
    assert [len(b["X"]) for b in got] == [25, 25, 25, 15]
    x = np.concatenate([b["X"].numpy() for b in got])
    np.testing.assert_array_equal(x, mouse_cells(n_cells=N, n_genes=40).X[idx].toarray())
