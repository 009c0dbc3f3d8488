"""FADVI's alternating adversarial optimisation (``adversarial_training="alternating"``): it
trains, is seeded, round-trips through save/load, gives the encoders the reversal gradient,
rejects what it cannot do, and keeps the batch out of ``z_l`` on the benchmark data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData
from lightning.pytorch import Callback

from cellsight.models import FADVI
from cellsight.models.fadvi.plan import FADVITrainingPlan

SMALL = dict(n_hidden=16, n_latent_b=3, n_latent_l=3, n_latent_r=2, n_layers=1)


def small_adata(n_cells: int = 120, n_genes: int = 30, seed: int = 0) -> AnnData:
    """NB counts of 3 cell types in 2 batches (a per-gene batch effect), 20 labels hidden."""
    rng = np.random.default_rng(seed)
    type_n = rng.integers(0, 3, n_cells)
    batch_n = np.arange(n_cells) % 2
    mean_ng = (rng.gamma(1.0, 2.0, (3, n_genes))[type_n]
               * rng.lognormal(0.0, 0.3, (2, n_genes))[batch_n])
    x = rng.negative_binomial(5, 5 / (5 + mean_ng)).astype(np.float32)
    x[x.sum(1) == 0, 0] = 1.0
    adata = AnnData(sp.csr_matrix(x))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["batch"] = pd.Categorical([f"b{b}" for b in batch_n])
    labels = np.array([f"t{t}" for t in type_n], dtype=object)
    labels[:20] = "Unknown"
    adata.obs["label_obs"] = pd.Categorical(labels)
    return adata


def small_model(adata=None, **params) -> FADVI:
    adata = small_adata() if adata is None else adata
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="label_obs")
    return FADVI(adata, **{**SMALL, "adversarial_training": "alternating", **params})


def test_alternating_training_is_seeded_and_updates_the_adversaries():
    runs, moved = [], []
    for _ in range(2):
        model = small_model(seed=3)
        before = [p.detach().clone() for p in model.module.adversaries.parameters()]
        history = model.train(max_epochs=2, enable_progress_bar=False)
        after = list(model.module.adversaries.parameters())
        moved.append(all(not torch.equal(a, b) for a, b in zip(after, before)))
        assert np.isfinite(history["elbo_train"]).all()
        assert np.isfinite(history["adversarial_loss_train"]).all()
        runs.append(model.get_latent_representation(representation="full"))
    assert all(moved)  # the adversaries' own optimiser stepped every weight
    np.testing.assert_array_equal(runs[0], runs[1])  # same seed, same CPU result


def test_frozen_adversaries_give_the_encoders_the_reversal_gradient():
    model = small_model(dropout_rate=0.0)
    module = model.module.train()
    tensors = next(iter(model._loader(batch_size=1000)))
    grads = {}
    for mode in ("reversal", "frozen"):
        module.zero_grad(set_to_none=True)
        for p in module.adversaries.parameters():
            p.requires_grad_(mode == "reversal")
        torch.manual_seed(0)  # the same latent sample in both passes
        _, _, out = module(tensors, loss_kwargs={"adversarial": mode})
        out.loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in module.named_parameters()
                       if n.startswith("encoder_")}
    for p in module.adversaries.parameters():
        p.requires_grad_(True)
    # reversal adds +CE with gradient -alpha dCE/dz to z; frozen adds -alpha CE: same gradient
    for name, g in grads["reversal"].items():
        torch.testing.assert_close(grads["frozen"][name], g, rtol=1e-5, atol=1e-6)


def test_alternating_model_round_trips_through_save_and_load(tmp_path):
    adata = small_adata()
    model = small_model(adata)
    model.train(max_epochs=1, enable_progress_bar=False)
    model.save(str(tmp_path / "m"))
    loaded = FADVI.load(str(tmp_path / "m"), adata=adata)
    assert loaded.init_params_["adversarial_training"] == "alternating"
    for rep in ("b", "l", "r"):
        np.testing.assert_array_equal(loaded.get_latent_representation(representation=rep),
                                      model.get_latent_representation(representation=rep))
    np.testing.assert_array_equal(loaded.predict(), model.predict())
    loaded.train(max_epochs=1, enable_progress_bar=False)  # and trains on, alternating
    assert len(loaded.history) == 2


def test_adversarial_training_options_are_validated():
    with pytest.raises(ValueError, match="adversarial_training"):
        small_model(adversarial_training="both")
    with pytest.raises(ValueError, match="adversarial_training"):
        FADVITrainingPlan(small_model().module, adversarial_training="both")


def test_alternating_is_the_default():
    adata = small_adata()
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="label_obs")
    model = FADVI(adata, **SMALL)
    assert model.init_params_["adversarial_training"] == "alternating"
    assert FADVITrainingPlan(model.module, **model._plan_kwargs()).automatic_optimization is False


class LearningRates(Callback):
    """Records every optimiser's learning rate at the end of training."""

    def on_train_end(self, trainer, pl_module):
        self.lrs = [opt.param_groups[0]["lr"] for opt in trainer.optimizers]


@pytest.mark.parametrize("mode", ["alternating", "reversal"])
def test_reduce_lr_on_plateau_steps_every_optimiser_once_per_epoch(mode):
    """threshold 1e9: only the first epoch counts as an improvement, so with patience 0 each
    later epoch multiplies the learning rates by lr_factor (here twice in 3 epochs); the
    validation cells are scored every epoch, as the scheduler needs."""
    model = small_model(adversarial_training=mode, adversary_lr_factor=3.0)
    record = LearningRates()
    history = model.train(
        max_epochs=3, lr=1e-3, enable_progress_bar=False, callbacks=[record],
        plan_kwargs={"reduce_lr_on_plateau": True, "lr_patience": 0, "lr_factor": 0.5,
                     "lr_threshold": 1e9, "lr_min": 0.0})
    assert np.isfinite(history["elbo_validation"]).all()
    expected = [2.5e-4, 7.5e-4] if mode == "alternating" else [2.5e-4]
    np.testing.assert_allclose(record.lrs, expected, rtol=1e-12)


def test_reduce_lr_on_plateau_without_its_metric_is_rejected():
    model = small_model()
    with pytest.raises(ValueError, match="check_val_every_n_epoch=1"):
        model.train(max_epochs=3, check_val_every_n_epoch=3, enable_progress_bar=False,
                    plan_kwargs={"reduce_lr_on_plateau": True})


@pytest.mark.slow
def test_alternating_keeps_the_batch_at_chance_in_z_l_on_the_benchmark_data():
    from cellsight.models.fadvi.data import pbmc_with_batches
    from cellsight.models.fadvi.metrics import latent_predictability

    adata, _ = pbmc_with_batches(seed=0)
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels_observed")
    model = FADVI(adata, seed=0, adversarial_training="alternating")
    model.train(max_epochs=30, enable_progress_bar=False)
    batch = adata.obs["batch"].astype(str).to_numpy()
    acc = {r: latent_predictability(model.get_latent_representation(representation=r),
                                    batch)["accuracy"] for r in ("b", "l")}
    # two balanced batches: chance 0.5; measured 0.54 after 30 epochs (gradient reversal 0.50),
    # 0.59-0.60 for BatchNorm encoders, the failure this guards against
    assert acc["l"] < 0.58
    assert acc["b"] > 0.95
