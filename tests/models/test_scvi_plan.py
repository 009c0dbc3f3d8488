"""The epoch-metrics training plan against scvi-tools' per-step ElboMetric logging."""

import numpy as np
import pytest
import torch
from scvi_helpers import count_adata

from cellsight.models import SCVI
from cellsight.train import EpochMetricsTrainingPlan, TrainingPlan

COLUMNS = [
    "elbo_train",
    "reconstruction_loss_train",
    "kl_local_train",
    "kl_global_train",
    "train_loss",
    "elbo_validation",
    "reconstruction_loss_validation",
    "kl_local_validation",
    "validation_loss",
]


def _trained(plan_cls, epochs=3):
    adata = count_adata(n_cells=150)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=4, seed=1)
    model._plan_cls = plan_cls
    model.train(max_epochs=epochs, batch_size=32, enable_progress_bar=False)
    return model


def test_epoch_metrics_equal_scvi_tools_training_plan_metrics():
    # same seed and data: the runs differ only by fused vs. loop Adam (float32 rounding of the
    # updates), so the logged epoch metrics agree to 1e-4 relative
    ours = _trained(EpochMetricsTrainingPlan)
    ref = _trained(TrainingPlan)
    assert set(COLUMNS) <= set(ours.history.columns)
    for col in COLUMNS:
        np.testing.assert_allclose(ours.history[col], ref.history[col], rtol=1e-4, err_msg=col)
    for key, value in ours.module.state_dict().items():
        torch.testing.assert_close(value, ref.module.state_dict()[key], rtol=1e-3, atol=1e-4)


def test_plan_uses_fused_adam_with_scvi_tools_settings():
    adata = count_adata(n_cells=40)
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=8, n_latent=2)
    plan = EpochMetricsTrainingPlan(model.module, lr=3e-3, weight_decay=1e-5)
    opt = plan.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.Adam)
    group = opt.param_groups[0]
    assert group["fused"] and group["lr"] == 3e-3 and group["weight_decay"] == 1e-5
    assert group["eps"] == 0.01


@pytest.mark.ddp
def test_two_process_training_trains_and_records_finite_epoch_metrics():
    adata = count_adata(n_cells=150)
    SCVI.setup_anndata(adata, batch_key="batch")
    ddp = SCVI(adata, n_hidden=16, n_latent=4, seed=1)
    before = {k: v.clone() for k, v in ddp.module.state_dict().items()}
    hist = ddp.train(
        max_epochs=2, batch_size=32, devices=2, accelerator="cpu", enable_progress_bar=False
    )
    assert len(hist) == 2 and np.isfinite(hist[COLUMNS]).all().all()
    assert any(not torch.equal(v, ddp.module.state_dict()[k]) for k, v in before.items())


def test_early_stopping_and_lr_schedule_see_the_epoch_metrics():
    # metrics go to trainer.callback_metrics: early stopping on elbo_validation must stop a run
    # whose ELBO cannot improve by 1e6 per epoch, after patience + 1 epochs
    adata = count_adata(n_cells=120)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=4)
    hist = model.train(
        max_epochs=50,
        batch_size=32,
        early_stopping=True,
        early_stopping_patience=2,
        early_stopping_min_delta=1e6,
        plan_kwargs={"reduce_lr_on_plateau": True, "lr_patience": 1},
        enable_progress_bar=False,
    )
    assert len(hist) == 3
