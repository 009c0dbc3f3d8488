"""Statistics as Lightning models: update per minibatch, reduce across ranks at epoch end.

A streaming statistic is a :class:`StreamingModel` (a ``torch.nn.Module``) whose ``forward``
folds one minibatch into running sums held as float64 buffers, and whose epoch hooks reduce
those sums across DDP ranks so that every rank ends with the same, complete result.
:class:`StatisticPlan` is the LightningModule around it: it applies the per-batch transforms
(:mod:`cellsight.stats.transforms`), calls the model, and forwards the Trainer's hooks.

Everything a result depends on lives in buffers of a fixed shape, so ``ddp_spawn`` (whose
workers hand the state dict back to the launching process) returns complete results, and
results are recomputed from buffers on demand rather than cached as Python objects.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch import distributed as dist

from cellsight.data.sparse import csr_with_values, is_csr
from cellsight.stats.transforms import apply_transforms, bind_transforms
from cellsight.train.native_adam import NativeAdam

__all__ = [
    "StreamingModel",
    "StatisticPlan",
    "stats_strategy",
    "fit_statistic",
    "world_info",
    "all_reduce_sum",
    "all_gather_stack",
    "broadcast_from_zero",
]


# ---------------------------------------------------------------------------- distributed


def world_info() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside DDP."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op outside DDP); returns it."""
    if world_info()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_op(tensor: torch.Tensor, op: str) -> torch.Tensor:
    """``"min"`` / ``"max"`` / ``"sum"`` reduction over ranks in place."""
    if world_info()[1] > 1:
        ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def all_gather_stack(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` stacked along a new first axis (rank order), on every rank."""
    rank, world = world_info()
    if world == 1:
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def broadcast_from_zero(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank 0's value (in place)."""
    if world_info()[1] > 1:
        dist.broadcast(tensor, src=0)
    return tensor


# ---------------------------------------------------------------------------- models


def check_var_names(var_names_g: Sequence[str] | np.ndarray) -> np.ndarray:
    """Gene names as a 1-d string array; reject empty or duplicated names."""
    names = np.asarray(var_names_g).astype(str)
    if names.ndim != 1 or names.size == 0:
        raise ValueError(
            f"var_names_g must be a non-empty 1-d array of gene names, got shape {names.shape}; "
            "pass adata.var_names."
        )
    index = pd.Index(names)
    if not index.is_unique:
        dup = list(index[index.duplicated()].unique()[:5])
        raise ValueError(
            f"var_names_g has duplicated gene names ({dup}); genes are matched by name, so "
            "call adata.var_names_make_unique() first."
        )
    return names


class StreamingModel(torch.nn.Module):
    """Base class of the streaming statistics.

    Subclasses hold their running state in buffers, fold one minibatch in ``forward``, and
    reduce across ranks in the epoch hooks. ``n_epochs`` is the number of passes they need;
    ``is_trainable`` marks models fitted by gradient descent (probabilistic PCA).

    Parameters
    ----------
    var_names_g
        The gene names the model expects, in order (the schema of its input).
    """

    n_epochs: int = 1
    is_trainable: bool = False

    @property
    def accepts_sparse(self) -> bool:
        """Whether :meth:`forward` takes torch CSR minibatches (work ~ non-zeros)."""
        return False

    def __init__(self, var_names_g: Sequence[str] | np.ndarray) -> None:
        super().__init__()
        self.var_names_g = check_var_names(var_names_g)
        self.n_vars = len(self.var_names_g)

    # ----------------------------------------------------------------- validation
    def check_input(self, x_ng: torch.Tensor, var_names_g: np.ndarray | None) -> None:
        """Reject inputs whose genes differ from the model's (names and order)."""
        if x_ng.ndim != 2 or x_ng.shape[1] != self.n_vars:
            raise ValueError(
                f"{type(self).__name__} expects minibatches of shape (n_cells, {self.n_vars}), "
                f"got {tuple(x_ng.shape)}; subset the genes with a Filter transform."
            )
        if var_names_g is not None and not np.array_equal(
            np.asarray(var_names_g).astype(str), self.var_names_g
        ):
            got = np.asarray(var_names_g).astype(str)
            diff = np.flatnonzero(got != self.var_names_g)
            raise ValueError(
                f"{type(self).__name__} was built for other genes: first difference at position "
                f"{int(diff[0])} (model {self.var_names_g[diff[0]]!r}, data {got[diff[0]]!r}); "
                "select and order the genes with cellsight.stats.transforms.Filter."
            )

    def batch_codes(self, batch_index_n: torch.Tensor | None, n: int, n_batch: int) -> torch.Tensor:
        """Batch codes as a long (n,) tensor, checked against ``n_batch``."""
        if n_batch == 1:
            return torch.zeros(n, dtype=torch.long)
        if batch_index_n is None:
            raise ValueError(
                f"{type(self).__name__} has n_batch={n_batch} but the minibatches carry no "
                "'batch' codes; pass batch_key when building the data, or use n_batch=1."
            )
        codes = batch_index_n.reshape(-1).long().cpu()
        if codes.numel() and (codes.min() < 0 or codes.max() >= n_batch):
            raise ValueError(
                f"batch codes must be in [0, {n_batch}), got values in "
                f"[{int(codes.min())}, {int(codes.max())}]; set n_batch to the number of batches."
            )
        return codes

    # ----------------------------------------------------------------- hooks
    def check_epoch(self, trainer: pl.Trainer) -> None:
        """Refuse to run more passes than the statistic needs."""
        if trainer.current_epoch >= self.n_epochs and not self.is_trainable:
            raise ValueError(
                f"{type(self).__name__} needs exactly {self.n_epochs} epoch(s); run the Trainer "
                f"with max_epochs={self.n_epochs}."
            )

    def on_train_start(self, trainer: pl.Trainer) -> None:
        """Called once before the first epoch."""

    def on_train_epoch_start(self, trainer: pl.Trainer) -> None:
        """Called at the start of every epoch."""
        self.check_epoch(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer) -> None:
        """Called at the end of every epoch (reduce across ranks here)."""

    def on_train_end(self, trainer: pl.Trainer) -> None:
        """Called once after training (write outputs here, on rank 0)."""

    def reset_parameters(self) -> None:
        """Reset every running buffer to its initial value."""

    def to_dataframe(self) -> pd.DataFrame:
        """The result as a DataFrame indexed by gene."""
        raise NotImplementedError


# ---------------------------------------------------------------------------- plan


class StatisticPlan(pl.LightningModule):
    """LightningModule that streams minibatches through transforms into a statistic.

    Parameters
    ----------
    model
        The statistic (:class:`StreamingModel`).
    transforms
        Per-batch transforms applied in order to ``batch["X"]`` (see
        :mod:`cellsight.stats.transforms`); each is bound to the genes of its input.
    input_var_names_g
        Gene names of the data as loaded (before transforms); defaults to the model's genes.
    dtype
        Floating type the minibatch is cast to before the transforms (float64 by default:
        sums of squares over millions of cells need it).
    lr
        Adam learning rate for trainable models.
    lr_schedule
        ``"constant"`` or ``"cosine"`` (annealed to zero over the run: needed to reach the
        optimum closely with stochastic gradients).
    """

    def __init__(
        self,
        model: StreamingModel,
        transforms: Sequence[torch.nn.Module] | None = None,
        input_var_names_g: Sequence[str] | np.ndarray | None = None,
        dtype: torch.dtype = torch.float64,
        lr: float = 1e-2,
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__()
        self.model = model
        self.transforms = torch.nn.ModuleList(list(transforms or []))
        names = model.var_names_g if input_var_names_g is None else input_var_names_g
        names = bind_transforms(self.transforms, check_var_names(names))
        if not np.array_equal(names, model.var_names_g):
            model.check_input(torch.empty(0, len(names)), names)
        self.dtype_ = dtype
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule={lr_schedule!r}; use 'constant' or 'cosine'.")
        self.lr = lr
        self.lr_schedule = lr_schedule
        self.automatic_optimization = model.is_trainable
        if not model.is_trainable:
            # DDP refuses to wrap a module without a trainable parameter; this one is never used
            self._ddp_anchor = torch.nn.Parameter(torch.zeros(1))

    def transform(self, x_ng: torch.Tensor) -> torch.Tensor:
        """Cast and apply the transforms to one minibatch.

        A CSR minibatch stays sparse through the transforms that keep zeros and reaches the
        model sparse when the model takes it (``accepts_sparse``); otherwise it is densified
        where needed.
        """
        if is_csr(x_ng):
            x_ng = csr_with_values(x_ng, x_ng.values().to(self.dtype_))
        elif x_ng.layout != torch.strided:
            x_ng = x_ng.to_dense().to(self.dtype_)
        else:
            x_ng = x_ng.to(self.dtype_)
        return apply_transforms(self.transforms, x_ng, keep_sparse=self.model.accepts_sparse)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Any:
        x_ng = self.transform(batch["X"])
        batch_index_n = batch.get("batch")
        if self.model.is_trainable:
            out = self.model(x_ng, self.model.var_names_g, batch_index_n=batch_index_n)
            self.log("loss", out["loss"].detach(), on_step=False, on_epoch=True, sync_dist=True,
                     batch_size=x_ng.shape[0], prog_bar=True)
            return out["loss"]
        with torch.no_grad():
            self.model(x_ng, self.model.var_names_g, batch_index_n=batch_index_n)
        return None

    def configure_optimizers(self):
        if not self.model.is_trainable:
            return None
        opt = NativeAdam(self.model.parameters(), lr=self.lr)
        if self.lr_schedule == "constant":
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        ddp = self.trainer.strategy.model
        if (
            not self.model.is_trainable
            and isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
            and ddp.broadcast_buffers
        ):
            raise ValueError(
                f"{type(self.model).__name__} keeps per-rank running sums in buffers, which DDP "
                "overwrites with rank 0's at every step when broadcast_buffers=True; use "
                "cellsight.stats.stats_strategy() or DDPStrategy(broadcast_buffers=False)."
            )
        self.model.on_train_start(self.trainer)

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.current_epoch)
        self.model.on_train_epoch_start(self.trainer)

    def on_train_epoch_end(self) -> None:
        self.model.on_train_epoch_end(self.trainer)

    def on_train_end(self) -> None:
        self.model.on_train_end(self.trainer)


# ---------------------------------------------------------------------------- running


def stats_strategy(devices: int | str | list, accelerator: str = "cpu") -> Any:
    """The Lightning strategy for streaming statistics on ``devices``.

    One device: ``"auto"``. Several: DDP launched with spawn (gloo on CPU) and
    ``broadcast_buffers=False`` so every rank keeps its own running sums until the epoch-end
    reduction.
    """
    if isinstance(devices, int):
        n_dev = devices
    else:
        n_dev = len(devices) if isinstance(devices, list) else 0
    if n_dev <= 1 and devices != "auto":
        return "auto"
    from lightning.pytorch.strategies import DDPStrategy

    backend = "gloo" if accelerator in ("cpu", "auto") else None
    return DDPStrategy(
        start_method="spawn", broadcast_buffers=False, process_group_backend=backend
    )


def fit_statistic(
    model: StreamingModel,
    datamodule: pl.LightningDataModule,
    *,
    transforms: Sequence[torch.nn.Module] | None = None,
    input_var_names_g: Sequence[str] | np.ndarray | None = None,
    max_epochs: int | None = None,
    accelerator: str = "cpu",
    devices: int | str | list = 1,
    strategy: Any = None,
    lr: float = 1e-2,
    lr_schedule: str = "constant",
    seed: int = 0,
    enable_progress_bar: bool = False,
    callbacks: list | None = None,
    **trainer_kwargs: Any,
) -> pd.DataFrame:
    """Stream ``datamodule`` through ``transforms`` into ``model`` (fitted in place).

    Parameters
    ----------
    model
        The statistic; its buffers hold the result afterwards (also after ``ddp_spawn``).
    datamodule
        Yields dict minibatches with ``"X"`` (and ``"batch"`` codes when the model has
        batches), e.g. ``cellsight.stats.stream_data(...).datamodule``. Statistics need every
        cell exactly once: training data modules (``AnnDataModule``, ``ShardedDataModule``)
        pad DDP ranks with repeated cells and split off validation cells.
    transforms
        Per-batch transforms, applied in order.
    input_var_names_g
        Gene names of the data before the transforms (default: the model's genes).
    max_epochs
        Passes over the data; defaults to the model's ``n_epochs`` (1, or 2 for HVG).
    accelerator, devices, strategy
        As in Lightning; ``strategy=None`` picks :func:`stats_strategy`.
    lr, lr_schedule
        Adam learning rate and its schedule (``"constant"`` / ``"cosine"``; trainable models).
    seed
        Seed of Python, NumPy and torch.
    enable_progress_bar
        Show Lightning's progress bar.
    callbacks
        Extra Lightning callbacks.

    Returns
    -------
    The per-epoch history (empty columns for statistics without a loss).
    """
    from cellsight.train import fit

    if max_epochs is None:
        max_epochs = model.n_epochs
    elif not model.is_trainable and max_epochs != model.n_epochs:
        raise ValueError(
            f"{type(model).__name__} needs max_epochs={model.n_epochs}, got {max_epochs}."
        )
    plan = StatisticPlan(model, transforms, input_var_names_g, lr=lr, lr_schedule=lr_schedule)
    if strategy is None:
        strategy = stats_strategy(devices, accelerator)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*returned `None`, this fit will run with no optim.*")
        warnings.filterwarnings("ignore", ".*`training_step` returned `None`.*")
        warnings.filterwarnings("ignore", ".*Consider setting `persistent_workers.*")
        return fit(
            plan,
            datamodule,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            seed=seed,
            enable_progress_bar=enable_progress_bar,
            callbacks=callbacks,
            **trainer_kwargs,
        )
