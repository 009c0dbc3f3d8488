"""Pretraining the feature gates (or the attention network) to a prior, e.g. from DE."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats
from scvi import REGISTRY_KEYS as K

from cellsight.data.datamodule import AnnDataModule
from cellsight.data.shards import is_sharded
from cellsight.train import NativeAdam, fit

__all__ = ["de_prior", "fit_attention_prior", "PriorPlan"]

_PRIOR_KEY = "prior_ng"


def de_prior(x_ng: np.ndarray, y_n: np.ndarray, mapping: str = "fdr") -> np.ndarray:
    """A prior probability per feature from differential expression of the states.

    Welch t-tests of each state against the rest, on ``log1p`` values. ``mapping="fdr"``
    (default): ``0.05 + 0.9 (1 - q)`` with ``q`` the Benjamini–Hochberg q-value of the
    feature's smallest p-value over the states: features without evidence of a difference get
    low priors whatever their rank (though with many differential features the q-values of
    null features can be as low as ~0.3). ``mapping="rank"`` (session 3's prior): the largest |t|
    mapped to (0.05, 0.95) by its rank among the features, so half of the features get a prior
    above 0.5 even when none differs. On the grid of ``benchmarks/cautrigger_grid.py`` (both
    fitted for 50 epochs) the ``"fdr"`` prior ranked the causal features slightly better (2L
    Ensemble AUROC 0.919 against 0.914) and kept the significance test of
    ``get_up_significance`` powerful on the three seeds of its calibration test, which the rank
    prior did not (largest true q 0.060 on one seed).
    """
    if mapping not in ("rank", "fdr"):
        raise ValueError(f"mapping={mapping!r} must be 'rank' or 'fdr'.")
    x = np.log1p(np.asarray(x_ng, dtype=np.float64))
    t = np.zeros(x.shape[1])
    p = np.ones(x.shape[1])
    for c in np.unique(y_n):
        with np.errstate(invalid="ignore", divide="ignore"):
            res = stats.ttest_ind(x[y_n == c], x[y_n != c], equal_var=False)
        t = np.maximum(t, np.abs(np.nan_to_num(res.statistic)))
        p = np.minimum(p, np.nan_to_num(res.pvalue, nan=1.0))
    if mapping == "fdr":
        return 0.05 + 0.9 * (1.0 - stats.false_discovery_control(p, method="bh"))
    ranks = stats.rankdata(t) / len(t)
    return 0.05 + 0.9 * ranks


class PriorPlan(pl.LightningModule):
    """Binary cross-entropy between the module's gates and a prior (one Lightning plan)."""

    def __init__(self, module: torch.nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.module, self.lr = module, lr

    def _loss(self, batch) -> torch.Tensor:
        xt = self.module.transform(batch[K.X_KEY])
        w = self.module.gates(xt).clamp(1e-6, 1 - 1e-6)
        return F.binary_cross_entropy(w, batch[_PRIOR_KEY])

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("pretrain_loss_train", loss, on_step=False, on_epoch=True,
                 batch_size=batch[K.X_KEY].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("pretrain_loss_validation", self._loss(batch), on_step=False, on_epoch=True,
                 batch_size=batch[K.X_KEY].shape[0])

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.current_epoch)

    def configure_optimizers(self):
        m = self.module
        params = [m.gate_logit_g] + ([] if m.attention is None else list(m.attention.parameters()))
        return NativeAdam(params, lr=self.lr)


def fit_attention_prior(model, prior_probs, *, max_epochs, lr, batch_size, use_gpu,
                        train_size, validation_size, exact: bool = False) -> pd.DataFrame:
    """See :meth:`cellsight.models.CauTrigger1L.pretrain_attention` (``prior_probs=None``:
    the DE prior of all cells). ``exact``: set per-feature gates to the prior itself (the
    minimum of the fit's loss) instead of fitting them; ``train(prior=...)`` passes it with
    the prior of its training cells."""
    from cellsight.models.cautrigger.core import _accelerator

    if model.adata is None:
        raise ValueError("This model has no AnnData; load it with adata= to pretrain.")
    arrays = model._arrays()
    n, g = arrays[K.X_KEY].shape
    if prior_probs is None:
        prior_probs = de_prior(arrays[K.X_KEY].numpy(), arrays[K.LABELS_KEY].reshape(-1).numpy())
    prior = np.asarray(prior_probs, dtype=np.float32)
    if prior.shape == (g,):
        prior = np.broadcast_to(prior, (n, g))
    if prior.shape != (n, g):
        raise ValueError(
            f"prior_probs has shape {np.shape(prior_probs)}; give one value per feature ({g},) "
            f"or per cell and feature ({n}, {g})."
        )
    if not np.isfinite(prior).all() or (prior < 0).any() or (prior > 1).any():
        raise ValueError("prior_probs must be probabilities in [0, 1] (no NaN).")
    if model.module.attention is None and not np.allclose(prior, prior[:1]):
        raise ValueError(
            "prior_probs varies across cells but the model has one gate per feature; build it "
            "with feature_mapper='attention' for per-cell priors, or pass one value per feature."
        )
    if exact and model.module.attention is None:
        return _set_gates(model, prior[0])
    if is_sharded(model.adata):
        raise ValueError(
            "Fitting the attention network to a prior needs the cells in memory, and this "
            "model's AnnData is a read_shards stub. Use feature_mapper='gate' (its gates are set "
            "to the prior exactly), or load the cells into one AnnData."
        )
    dm = AnnDataModule(model.adata_manager, train_size=train_size,
                       validation_size=validation_size, batch_size=batch_size, seed=model.seed)
    dm.arrays[_PRIOR_KEY] = torch.from_numpy(np.ascontiguousarray(prior))
    accelerator, devices = _accelerator(use_gpu)
    model.module.train()
    history = fit(PriorPlan(model.module, lr=lr), dm, max_epochs=max_epochs,
                  accelerator=accelerator, devices=devices, seed=model.seed,
                  enable_progress_bar=False)
    model.module.eval()
    model.pretrain_history_ = history
    model.prior_fitted_ = True
    return history


def _set_gates(model, prior_g: np.ndarray) -> pd.DataFrame:
    """The exact fit for one gate per feature: the binary cross-entropy to a per-feature prior
    is smallest at ``w = prior``, so the gate logits are set to ``logit(prior)``."""
    from cellsight.models.cautrigger.module import GATE_SCALE

    m = model.module
    p = torch.as_tensor(np.clip(prior_g, 1e-4, 1 - 1e-4), dtype=m.gate_logit_g.dtype)
    with torch.no_grad():
        m.gate_logit_g.copy_(torch.logit(p) / GATE_SCALE)
        xt = m.transform(model._arrays()[K.X_KEY][:1].to(m.gate_logit_g.device))
        loss = F.binary_cross_entropy(m.gates(xt)[0].clamp(1e-6, 1 - 1e-6).cpu(), p)
    history = pd.DataFrame({"pretrain_loss_train": [float(loss)]})
    model.pretrain_history_ = history
    model.prior_fitted_ = True
    return history
