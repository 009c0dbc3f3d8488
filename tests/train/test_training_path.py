"""The one training path: determinism, history, split, early stopping, DDP, save/load."""

import math

import numpy as np
import pytest
import torch

from toymodel import ToyModel, toy_adata


def _model(seed=0, n_cells=240):
    adata = toy_adata(n_cells=n_cells)
    ToyModel.setup_anndata(adata, batch_key="batch")
    return ToyModel(adata, seed=seed), adata


def _weights(model):
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def test_same_seed_gives_identical_weights_and_history():
    m1, _ = _model()
    m2, _ = _model()
    h1 = m1.train(max_epochs=3, batch_size=32, enable_progress_bar=False)
    h2 = m2.train(max_epochs=3, batch_size=32, enable_progress_bar=False)
    for k, v in _weights(m1).items():
        assert torch.equal(v, _weights(m2)[k]), k
    assert h1.equals(h2)


def test_different_seed_gives_different_weights():
    m1, _ = _model(seed=0)
    m2, _ = _model(seed=1)
    m1.train(max_epochs=1, enable_progress_bar=False)
    m2.train(max_epochs=1, enable_progress_bar=False)
    assert not torch.equal(m1.module.lin.weight, m2.module.lin.weight)


def test_history_has_one_row_per_epoch_with_train_and_validation_metrics():
    m, _ = _model()
    hist = m.train(max_epochs=4, batch_size=32, lr=1e-2, enable_progress_bar=False)
    assert list(hist.index) == [0, 1, 2, 3]
    for col in ("elbo_train", "elbo_validation", "reconstruction_loss_train", "train_loss"):
        assert col in hist.columns
    # the training ELBO is a per-epoch value, not repeated, and it improves with lr=1e-2
    assert hist["elbo_train"].nunique() == 4
    assert hist["elbo_train"].iloc[-1] < hist["elbo_train"].iloc[0]
    assert hist["elbo_validation"].nunique() == 4


def test_split_sizes_follow_scvi_tools_and_are_disjoint():
    m, adata = _model(n_cells=101)
    m.train(max_epochs=1, train_size=0.8, enable_progress_bar=False)
    assert len(m.train_indices_) == math.ceil(0.8 * 101)
    assert len(m.validation_indices_) == math.floor(0.2 * 101)
    assert not set(m.train_indices_) & set(m.validation_indices_)
    assert len(set(m.train_indices_) | set(m.validation_indices_)) == 101


def test_explicit_validation_size_leaves_cells_out():
    m, _ = _model(n_cells=100)
    m.train(max_epochs=1, train_size=0.5, validation_size=0.2, enable_progress_bar=False)
    assert (len(m.train_indices_), len(m.validation_indices_)) == (50, 20)


def test_bad_split_is_rejected():
    m, _ = _model()
    with pytest.raises(ValueError, match="must be <= 1"):
        m.train(max_epochs=1, train_size=0.9, validation_size=0.3)


def test_early_stopping_stops_when_validation_does_not_improve():
    m, _ = _model()
    hist = m.train(
        max_epochs=50,
        lr=0.0,
        early_stopping=True,
        early_stopping_patience=2,
        early_stopping_min_delta=1.0,  # far above the sampling noise of a frozen model
        enable_progress_bar=False,
    )
    assert len(hist) == 3  # epoch 0 sets the best value; 2 more epochs without improvement


def test_early_stopping_without_validation_set_is_rejected():
    m, _ = _model()
    with pytest.raises(ValueError, match="no validation split"):
        m.train(max_epochs=2, train_size=1.0, early_stopping=True)


def test_second_train_call_appends_to_history():
    m, _ = _model()
    m.train(max_epochs=2, enable_progress_bar=False)
    hist = m.train(max_epochs=3, enable_progress_bar=False)
    assert list(hist.index) == [0, 1, 2, 3, 4]


def test_save_load_round_trip_is_exact(tmp_path):
    m, adata = _model()
    m.train(max_epochs=2, enable_progress_bar=False)
    m.save(tmp_path / "toy")
    loaded = ToyModel.load(tmp_path / "toy", adata=adata)
    np.testing.assert_array_equal(m.get_rates(), loaded.get_rates())
    assert loaded.history.equals(m.history)
    np.testing.assert_array_equal(loaded.train_indices_, m.train_indices_)


def test_load_without_adata_explains_queries(tmp_path):
    m, adata = _model()
    m.train(max_epochs=1, enable_progress_bar=False)
    m.save(tmp_path / "toy")
    loaded = ToyModel.load(tmp_path / "toy")
    with pytest.raises(ValueError, match="no AnnData attached"):
        loaded.get_rates()
    np.testing.assert_array_equal(loaded.get_rates(adata), m.get_rates())


def test_save_anndata_lets_load_restore_data(tmp_path):
    m, _ = _model()
    m.save(tmp_path / "toy", save_anndata=True)
    loaded = ToyModel.load(tmp_path / "toy")
    np.testing.assert_array_equal(loaded.get_rates(), m.get_rates())


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    m, _ = _model()
    m.save(tmp_path / "toy")
    with pytest.raises(ValueError, match="overwrite=True"):
        m.save(tmp_path / "toy")
    m.save(tmp_path / "toy", overwrite=True)


def test_load_with_mismatched_genes_is_rejected(tmp_path):
    m, adata = _model()
    m.save(tmp_path / "toy")
    with pytest.raises(ValueError, match="missing from the query"):
        ToyModel.load(tmp_path / "toy", adata=adata[:, 1:].copy())


def test_load_from_missing_directory_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="No saved model"):
        ToyModel.load(tmp_path / "nothing")


@pytest.mark.ddp
def test_two_process_ddp_training_produces_a_trained_model():
    m, adata = _model(n_cells=400)
    before = m.get_rates()
    x = adata.X
    nll_before = -(x * np.log(before) - before).sum()
    hist = m.train(
        max_epochs=3,
        batch_size=50,
        lr=1e-2,
        devices=2,
        accelerator="cpu",
        enable_progress_bar=False,
    )
    after = m.get_rates()
    nll_after = -(x * np.log(after) - after).sum()
    assert m.is_trained_ and len(hist) == 3
    assert nll_after < nll_before  # weights trained in the workers came back to this process
    # metrics are reduced over both ranks: the epoch ELBO covers all training cells
    assert np.isfinite(hist["elbo_train"]).all()
