"""The user-facing model base: registration, training, inference loaders, save/load.

A model is an AnnData facade over a module (the maths, :mod:`scvi.module.base` style). Every
model trains through :func:`cellsight.train.fit`, so in-memory AnnData, sharded data and
multi-process DDP work the same for all of them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from cellsight.checks import check_int
from cellsight.data import registry as R
from cellsight.data import validate as V
from cellsight.data.datamodule import AnnDataModule
from cellsight.data.loaders import TensorBatchLoader, registry_arrays
from cellsight.data.shards import is_sharded
from cellsight.data.shards_module import ShardedDataModule, sharded_inference_loader
from cellsight.train import TrainingPlan, check_fit_args, check_lr, fit

__all__ = ["BaseModel"]

_MODEL_FILE = "model.pt"
_ADATA_FILE = "adata.h5ad"


def check_epoch_metric(name, what: str) -> str:
    """Reject a metric name that no training plan logs: cellsight's epoch metrics are
    ``<metric>_train`` and ``<metric>_validation`` (``elbo_validation``,
    ``reconstruction_loss_train``, a model's extra terms such as
    ``classification_loss_label_validation``) and ``train_loss``/``validation_loss``. A
    well-formed name the model does not log is reported by Lightning after the first epoch,
    with the names it does log."""
    if not isinstance(name, str) or not (
            name.endswith(("_train", "_validation")) or name in ("train_loss", "validation_loss")):
        raise ValueError(
            f"{what}={name!r} is not an epoch metric: the models log '<metric>_train' and "
            "'<metric>_validation' (e.g. 'elbo_validation', 'reconstruction_loss_train') and "
            "'train_loss'/'validation_loss'."
        )
    return name


class BaseModel:
    """Base of every cellsight model class.

    Subclasses implement :meth:`_build_module` (construct the module from ``self.summary`` and
    ``self.init_params_``) and call ``super().__init__(adata, **init_params)`` from their
    ``__init__`` with all their constructor arguments.
    """

    _plan_cls = TrainingPlan
    _requires_counts = True

    # ------------------------------------------------------------------ set-up
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        unlabeled_category: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        size_factor_key: str | None = None,
    ) -> None:
        """Register ``adata`` for this model.

        Validates keys and values and records the setup in ``adata.uns["_cellsight_setup"]``;
        nothing else in ``adata`` changes.

        Parameters
        ----------
        adata
            Cells x genes.
        layer
            Layer with the model's input (``None``: ``adata.X``). Count models need raw counts.
        batch_key
            ``obs`` column with the batch of each cell.
        labels_key
            ``obs`` column with cell labels.
        unlabeled_category
            Value of ``labels_key`` that marks unlabelled cells.
        categorical_covariate_keys
            ``obs`` columns of extra categorical covariates.
        continuous_covariate_keys
            ``obs`` columns of extra continuous covariates.
        size_factor_key
            ``obs`` column with per-cell size factors (used instead of the observed library).
        """
        R.setup_anndata(
            adata,
            cls.__name__,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            unlabeled_category=unlabeled_category,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            size_factor_key=size_factor_key,
        )

    def __init__(self, adata: AnnData | None, seed: int = 0, **init_params: Any) -> None:
        self.init_params_ = dict(init_params)
        self.seed = int(seed)
        self.adata = adata
        self.history_: pd.DataFrame | None = None
        self.is_trained_ = False
        self.train_indices_: np.ndarray | None = None
        self.validation_indices_: np.ndarray | None = None
        if adata is not None:
            self.setup_args_ = R.read_setup_args(adata, type(self).__name__)
            self._check_counts(adata)
            self.adata_manager = R.register(
                adata,
                self.setup_args_,
                type(self).__name__,
                is_count_data=self._requires_counts,
                extra_fields=self._extra_fields(),
            )
            self.registry_ = self.adata_manager.registry
            self.summary = R.summarize_registry(self.registry_)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.module = self._build_module()

    def _build_module(self) -> torch.nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra_fields(self) -> list:
        """Model-specific scvi-tools fields registered besides the shared ones (e.g. an
        ``ObsmField``); read ``self.setup_args_`` for their keys."""
        return []

    def _count_likelihood(self) -> str | None:
        """Name of the count likelihood (for error messages), ``None`` if counts are not needed."""
        return self.init_params_.get("gene_likelihood", "count") if self._requires_counts else None

    def _check_counts(self, adata: AnnData) -> None:
        lk = self._count_likelihood()
        if lk is not None:
            V.check_matrix_values(
                adata, self.setup_args_["layer"], require_counts=True, likelihood=lk
            )
        self._check_libraries(adata, self.setup_args_["layer"])

    #: whether the model scales by each cell's log library size (then an empty cell is an
    #: error, unless size factors replace the library size; see :meth:`_uses_size_factors`)
    _needs_library_size = False
    #: how the user registers size factors for this model (for the empty-cell error)
    _size_factor_hint = "register size factors"

    def _uses_size_factors(self) -> bool:
        """Whether registered size factors replace the observed library size."""
        return False

    def _check_libraries(self, adata: AnnData, layer: str | None) -> None:
        """Reject cells with zero total counts (in-memory data; shards are checked as they
        stream) when the model needs a library size."""
        if not self._needs_library_size or self._uses_size_factors():
            return
        if is_sharded(adata) or getattr(adata, "isbacked", False):
            return
        totals_n = np.asarray(V.get_matrix(adata, layer).sum(axis=1)).reshape(-1)
        empty = np.flatnonzero(totals_n <= 0)
        if len(empty):
            where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
            raise ValueError(
                f"{where} has {len(empty)} cell(s) with zero total counts (first "
                f"{adata.obs_names[empty[0]]!r}); {type(self).__name__} scales by the log "
                "library size, which is undefined for them. Remove them "
                "(scanpy.pp.filter_cells(adata, min_counts=1)) or "
                f"{self._size_factor_hint}."
            )

    # ------------------------------------------------------------------ properties
    @property
    def var_names(self) -> pd.Index:
        """Genes the model was set up with, in order."""
        return self.summary.var_names

    @property
    def history(self) -> pd.DataFrame:
        """Per-epoch training metrics (empty before training)."""
        return pd.DataFrame() if self.history_ is None else self.history_

    @property
    def device(self) -> torch.device:
        try:
            return next(self.module.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def __repr__(self) -> str:
        n = "no data" if self.adata is None else f"{self.adata.n_obs} cells"
        params = ", ".join(f"{k}={v!r}" for k, v in self.init_params_.items())
        return (
            f"{type(self).__name__}({params}) on {self.summary.n_vars} genes, {n}; "
            f"trained: {self.is_trained_}"
        )

    # ------------------------------------------------------------------ data access
    @contextlib.contextmanager
    def _seeded(self) -> Iterator[None]:
        """Eval mode, no gradients, and torch's RNG seeded with the model's seed (restored)."""
        self.module.eval()
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(self.seed)
            yield

    def _obs_names(self, adata: AnnData | None, indices) -> pd.Index:
        """Names of the cells at ``indices`` (positions or a boolean mask; ``None``: all)."""
        names = pd.Index((self.adata if adata is None else adata).obs_names)
        if indices is None:
            return names
        return names[V.cell_positions(indices, len(names))]

    def _manager_for(self, adata: AnnData | None):
        """The AnnDataManager for ``adata``, validated against the model's registry."""
        if adata is None or adata is self.adata:
            if self.adata is None:
                raise ValueError(
                    "This model has no AnnData attached (it was loaded without one); pass adata=."
                )
            return self.adata_manager
        args = dict(self.setup_args_)
        self._check_counts_with(adata, args)
        return R.register(
            adata,
            args,
            type(self).__name__,
            is_count_data=self._requires_counts,
            source_registry=self.registry_,
            extra_fields=self._extra_fields(),
        )

    def _check_counts_with(self, adata: AnnData, args: dict) -> None:
        lk = self._count_likelihood()
        V.check_layer(adata, args["layer"])
        if lk is not None:
            V.check_matrix_values(adata, args["layer"], require_counts=True, likelihood=lk)
        self._check_libraries(adata, args["layer"])

    def _loader(
        self,
        adata: AnnData | None = None,
        indices: np.ndarray | list | None = None,
        batch_size: int | None = None,
    ) -> TensorBatchLoader:
        """Ordered (unshuffled) minibatches for inference, moved to the module's device."""
        manager = self._manager_for(adata)
        data = self.adata if adata is None else adata
        batch_size = 1024 if batch_size is None else check_int(batch_size, "batch_size")
        if is_sharded(data):  # stream the shards; the same minibatch dicts
            lk = self._count_likelihood()
            return sharded_inference_loader(
                data, manager, indices, batch_size, device=self.device,
                require_counts=lk is not None, likelihood=lk,
            )
        arrays = registry_arrays(manager)
        n = manager.adata.n_obs
        return TensorBatchLoader(
            arrays,
            V.cell_positions(indices, n),
            batch_size=batch_size,
            shuffle=False,
            distributed=False,
            device=self.device,
        )

    # ------------------------------------------------------------------ training
    def _default_max_epochs(self) -> int:
        n = self.adata.n_obs if self.adata is not None else 20000
        return int(min(round((20000 / max(n, 1)) * 400), 400))

    def _datamodule(self, train_size: float, validation_size: float | None, batch_size: int,
                    seed: int, shuffle_set_split: bool = True):
        """The training data module of the registered AnnData: a :class:`ShardedDataModule`
        that streams the files of a ``read_shards`` stub (counts checked per chunk), else an
        in-memory :class:`AnnDataModule`."""
        kw = dict(train_size=train_size, validation_size=validation_size,
                  batch_size=batch_size, seed=seed, shuffle_set_split=shuffle_set_split)
        if is_sharded(self.adata):
            lk = self._count_likelihood()
            return ShardedDataModule(self.adata, self.adata_manager, require_counts=lk is not None,
                                     likelihood=lk, **kw)
        return AnnDataModule(self.adata_manager, **kw)

    def _plan_kwargs(self) -> dict[str, Any]:
        """Model-specific defaults for the training plan (overridden by ``plan_kwargs``)."""
        return {}

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        train_size: float = 0.9,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        accelerator: str = "cpu",
        devices: int | str | list = 1,
        strategy: Any = "auto",
        early_stopping: bool = False,
        early_stopping_monitor: str = "elbo_validation",
        early_stopping_patience: int = 45,
        early_stopping_min_delta: float = 0.0,
        seed: int | None = None,
        datamodule: pl.LightningDataModule | None = None,
        plan_kwargs: dict | None = None,
        enable_progress_bar: bool = True,
        ckpt_path: str | None = None,
        **trainer_kwargs: Any,
    ) -> pd.DataFrame:
        """Train the model (scvi-tools' names and meanings).

        Parameters
        ----------
        max_epochs
            Passes over the training cells (default: scvi-tools' heuristic,
            ``min(round(20000 / n_cells * 400), 400)``).
        batch_size
            Cells per minibatch.
        lr
            Adam learning rate.
        train_size, validation_size
            Fractions of cells for training and validation (``validation_size=None``: the rest).
        shuffle_set_split
            Split cells at random (seeded) rather than in order.
        accelerator, devices, strategy
            Lightning's; ``devices=2`` on CPU trains with 2 DDP processes (``ddp_spawn``, gloo).
        early_stopping, early_stopping_monitor, early_stopping_patience, early_stopping_min_delta
            Stop when the monitored validation metric stops improving. The monitor is an
            epoch metric (``<metric>_train``, ``<metric>_validation``, ``train_loss`` or
            ``validation_loss``); other names are rejected before training.
        seed
            Seeds the split, the shuffles and torch (default: the model's ``seed``). With the
            same seed a CPU run is identical.
        datamodule
            Train from this data module instead of the registered AnnData, e.g. a
            :class:`cellsight.data.ShardedDataModule` over ``.h5ad``/zarr shards.
        plan_kwargs
            Training-plan arguments (``weight_decay``, ``n_epochs_kl_warmup``,
            ``reduce_lr_on_plateau`` ...).
        enable_progress_bar
            Show a progress bar.
        ckpt_path
            Resume from a Lightning checkpoint.
        trainer_kwargs
            Other :class:`lightning.pytorch.Trainer` arguments.

        Returns
        -------
        The per-epoch history (also in ``model.history``).
        """
        seed = self.seed if seed is None else int(seed)
        if max_epochs is None:
            max_epochs = self._default_max_epochs()
        check_fit_args(max_epochs, devices)
        check_lr(lr)
        if early_stopping:
            check_epoch_metric(early_stopping_monitor, "early_stopping_monitor")
        kwargs = {"lr": lr, **self._plan_kwargs(), **(plan_kwargs or {})}
        if kwargs.get("reduce_lr_on_plateau") and "lr_scheduler_metric" in kwargs:
            check_epoch_metric(kwargs["lr_scheduler_metric"], "lr_scheduler_metric")
        if datamodule is None and check_int(batch_size, "batch_size") == 1 and any(
                isinstance(m, (torch.nn.BatchNorm1d, torch.nn.SyncBatchNorm))
                for m in self.module.modules()):
            raise ValueError(
                "batch_size=1 cannot train a model with BatchNorm layers (it needs more than one "
                "cell per minibatch); use batch_size >= 2 or use_batch_norm='none'."
            )
        if datamodule is None:
            if self.adata is None:
                raise ValueError(
                    "This model has no AnnData to train on; pass datamodule= or load it with adata."
                )
            datamodule = self._datamodule(train_size, validation_size, batch_size, seed,
                                          shuffle_set_split)
            self.train_indices_ = datamodule.train_indices
            self.validation_indices_ = datamodule.validation_indices
        self.module.train()  # inference leaves the module in eval mode; Lightning keeps modes
        plan = self._plan_cls(self.module, **kwargs)
        if hasattr(datamodule, "n_train"):
            plan.n_obs_training = datamodule.n_train
            plan.n_obs_validation = getattr(datamodule, "n_validation", 0)
        history = fit(
            plan,
            datamodule,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            early_stopping=early_stopping,
            early_stopping_monitor=early_stopping_monitor,
            early_stopping_patience=early_stopping_patience,
            early_stopping_min_delta=early_stopping_min_delta,
            seed=seed,
            enable_progress_bar=enable_progress_bar,
            ckpt_path=ckpt_path,
            **trainer_kwargs,
        )
        self.module.eval()
        self.module.to("cpu" if accelerator == "cpu" else self.device)
        self.history_ = history if self.history_ is None else pd.concat(
            [self.history_, history.set_index(history.index + len(self.history_))]
        )
        self.is_trained_ = True
        return self.history_

    # ------------------------------------------------------------------ save / load
    def save(self, dir_path: str, overwrite: bool = False, save_anndata: bool = False) -> None:
        """Save the model (weights, constructor arguments, registry, history) to ``dir_path``.

        Parameters
        ----------
        dir_path
            Directory to create.
        overwrite
            Replace an existing saved model there.
        save_anndata
            Also write the AnnData (``adata.h5ad``), so ``load`` needs no data.
        """
        if os.path.exists(os.path.join(dir_path, _MODEL_FILE)) and not overwrite:
            raise ValueError(
                f"{dir_path!r} already holds a saved model; pass overwrite=True to replace it."
            )
        os.makedirs(dir_path, exist_ok=True)
        payload = {
            "class": type(self).__name__,
            "cellsight_version": __import__("cellsight").__version__,
            "init_params": self.init_params_,
            "seed": self.seed,
            "setup_args": self.setup_args_,
            "registry": _plain_registry(self.registry_),
            "state_dict": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "history": self.history_,
            "is_trained": self.is_trained_,
            "train_indices": self.train_indices_,
            "validation_indices": self.validation_indices_,
            "extra": self._extra_state(),
        }
        torch.save(payload, os.path.join(dir_path, _MODEL_FILE))
        if save_anndata:
            if self.adata is None:
                raise ValueError("save_anndata=True but the model has no AnnData attached.")
            self.adata.write_h5ad(os.path.join(dir_path, _ADATA_FILE))

    def _extra_state(self) -> dict:
        """Model-specific state to save (overridden by subclasses)."""
        return {}

    def _load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`_extra_state` saved."""

    @classmethod
    def load(cls, dir_path: str, adata: AnnData | None = None) -> BaseModel:
        """Load a model saved with :meth:`save`.

        Parameters
        ----------
        dir_path
            Directory written by ``save``.
        adata
            Data to attach. It is validated against the saved registry (same genes in the same
            order, known categories). ``None``: the saved AnnData if one was saved, else no data
            (the model can still embed or explain an AnnData passed to its methods).
        """
        path = os.path.join(dir_path, _MODEL_FILE)
        if not os.path.exists(path):
            raise ValueError(f"No saved model at {path!r}; pass the directory given to save().")
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if payload["class"] != cls.__name__:
            raise ValueError(
                f"{dir_path!r} holds a {payload['class']}, not a {cls.__name__}; load it with "
                f"cellsight.models.{payload['class']}.load."
            )
        if adata is None and os.path.exists(os.path.join(dir_path, _ADATA_FILE)):
            import anndata

            adata = anndata.read_h5ad(os.path.join(dir_path, _ADATA_FILE))
        self = cls.__new__(cls)
        self.init_params_ = dict(payload["init_params"])
        self.seed = payload["seed"]
        self.setup_args_ = payload["setup_args"]
        self.registry_ = payload["registry"]
        self.summary = R.summarize_registry(self.registry_)
        self.history_ = payload["history"]
        self.is_trained_ = payload["is_trained"]
        self.train_indices_ = payload["train_indices"]
        self.validation_indices_ = payload["validation_indices"]
        self.adata = None
        self.adata_manager = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.module = self._build_module()
        self.module.load_state_dict(payload["state_dict"])
        self.module.eval()
        self._load_extra_state(payload.get("extra", {}))
        if adata is not None:
            if R.SETUP_UNS_KEY not in adata.uns:
                adata.uns[R.SETUP_UNS_KEY] = json.dumps(
                    {"model_name": cls.__name__, "setup_args": self.setup_args_}
                )
            self.adata_manager = self._manager_for(adata)
            self.adata = adata
        return self


def _plain_registry(registry: dict) -> dict:
    """A deep, plain-dict copy of an AnnDataManager registry (picklable, no defaultdicts)."""

    def plain(obj):
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(plain(v) for v in obj)
        return obj

    return plain(registry)
