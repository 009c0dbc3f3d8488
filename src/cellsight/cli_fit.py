"""``cellsight fit <model> --config x.yaml``: run a streaming statistic from a config file.

A config has five sections (print a full one with ``--print_config``)::

    data:        {paths: [s0.h5ad, s1.h5ad], layer: null, batch_key: null,
                  batch_size: 1024, num_workers: 0}
    transforms:  [{class_path: cellsight.stats.transforms.NormalizeTotal,
                   init_args: {target_count: 10000}}, ...]
    model:       the model's own arguments (genes, batches and cells come from the data)
    trainer:     {devices: 1, accelerator: cpu, seed: 0, ...} (ppca also: max_epochs, lr,
                  lr_schedule)
    output_dir:  where ``<model>.csv`` (the result table) and ``<model>.pt`` (state) go

plus ``quantiles`` (tdigest) or ``mean_path`` (ppca). Config values are checked before any
data are read: a bad value is a ``ValueError`` naming its key (``cellsight fit: error: ...``).
``mean_var`` defaults to ``algorithm: shifted_data``, as :func:`cellsight.pp.mean_var`.

Runs chain through files: the ``mean_var`` table feeds a ``ZScore`` transform
(``init_args: {stats_path: out/mean_var.csv}``) of a later ``ipca`` run, and the ``hvg`` table
a ``Filter``; ``ppca`` takes ``mean_path`` (a mean/var table) for its fixed mean.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Sequence

import pandas as pd
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from cellsight.stats.base import fit_statistic
from cellsight.stats.data import stream_data
from cellsight.stats.hvg import HVGSeuratV3
from cellsight.stats.ipca import IncrementalPCA, check_n_components
from cellsight.stats.mean_var import OnePassMeanVarStd
from cellsight.stats.ppca import ProbabilisticPCA
from cellsight.stats.tdigest import TDigest, check_quantiles
from cellsight.stats.transforms import GeneTransform, bind_transforms

__all__ = ["MODELS", "build_parser", "check_config", "main", "run"]

MODELS = {
    "mean_var": OnePassMeanVarStd,
    "tdigest": TDigest,
    "hvg": HVGSeuratV3,
    "ipca": IncrementalPCA,
    "ppca": ProbabilisticPCA,
}
ALIASES = {
    "onepassmeanvarstd": "mean_var", "onepass_mean_var_std": "mean_var", "meanvar": "mean_var",
    "hvgseuratv3": "hvg", "hvg_seurat_v3": "hvg", "incrementalpca": "ipca",
    "incremental_pca": "ipca", "probabilisticpca": "ppca", "probabilistic_pca": "ppca",
}
# filled in from the data, never from the config
FROM_DATA = {"var_names_g", "n_batch", "batch_categories", "n_obs", "mean_g", "use_batch_key"}


def _model_name(name: str) -> str:
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in MODELS:
        raise ValueError(
            f"Unknown model {name!r}; choose one of {sorted(MODELS)} (or a class name such as "
            "OnePassMeanVarStd)."
        )
    return key


def build_parser(model: str):
    """The jsonargparse parser of ``cellsight fit <model>``: only the options of that model.

    ``--quantiles`` exists for ``tdigest`` only, ``--mean_path`` for ``ppca`` only, and the
    optimiser options (``trainer.max_epochs``, ``lr``, ``lr_schedule``) for the trainable
    ``ppca`` only. ``mean_var`` defaults to ``model.algorithm: shifted_data``, as
    :func:`cellsight.pp.mean_var` (the class itself keeps Cellarium's ``"naive"`` default).
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    name = _model_name(model)
    cls = MODELS[name]
    parser = ArgumentParser(
        prog=f"cellsight fit {name}",
        description=f"Stream data through transforms into {cls.__name__}.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file")
    parser.add_argument("--data.paths", type=list[str], required=True,
                        help="shard (.h5ad / zarr) paths, or one .h5ad")
    parser.add_argument("--data.layer", type=str | None, default=None)
    parser.add_argument("--data.batch_key", type=str | None, default=None)
    parser.add_argument("--data.batch_size", type=int, default=1024, help="cells per minibatch")
    parser.add_argument("--data.num_workers", type=int, default=0,
                        help="DataLoader workers per process (>= 0)")
    parser.add_argument("--transforms", type=list[GeneTransform] | None, default=None,
                        help="per-batch transforms (class_path / init_args), applied in order")
    # results go to output_dir: the classes' own output_path is not an option here
    parser.add_class_arguments(cls, "model", skip=FROM_DATA | {"output_path"},
                               instantiate=False)
    if name == "mean_var":
        parser.set_defaults({"model.algorithm": "shifted_data"})  # as cellsight.pp.mean_var
    parser.add_argument("--trainer.devices", type=int | str, default=1,
                        help="processes: a positive integer or 'auto'")
    parser.add_argument("--trainer.accelerator", type=str, default="cpu")
    if cls.is_trainable:
        parser.add_argument("--trainer.max_epochs", type=int | None, default=None)
        parser.add_argument("--trainer.lr", type=float, default=1e-2)
        parser.add_argument("--trainer.lr_schedule", type=str, default="constant")
    parser.add_argument("--trainer.seed", type=int, default=0)
    parser.add_argument("--trainer.enable_progress_bar", type=bool, default=True)
    parser.add_argument("--output_dir", type=str, default="cellsight_fit_output")
    if name == "tdigest":
        parser.add_argument("--quantiles", type=list[float], default=[0.5, 0.9],
                            help="quantiles in [0, 1] written to the table")
    if name == "ppca":
        parser.add_argument("--mean_path", type=str | None, default=None,
                            help="mean/var CSV whose 'mean' column fixes the model mean")
    return parser


def check_config(name: str, cfg) -> None:
    """Reject bad config values before any data is read (``ValueError`` naming the key)."""
    data, trainer = cfg.data, cfg.trainer
    if not data.paths:
        raise ValueError("data.paths is empty; list the shard (.h5ad / zarr) files to read.")
    if data.batch_size < 1:
        raise ValueError(f"data.batch_size={data.batch_size} must be >= 1 (cells per minibatch).")
    if data.num_workers < 0:
        raise ValueError(f"data.num_workers={data.num_workers} must be >= 0.")
    devices = trainer.devices
    if isinstance(devices, str):
        devices = int(devices) if devices.strip().lstrip("-").isdigit() else devices
    if devices != "auto" and (not isinstance(devices, int) or devices < 1):
        raise ValueError(
            f"trainer.devices={trainer.devices!r} must be a positive integer (1: this process, "
            "N > 1: N DDP processes) or 'auto'."
        )
    trainer.devices = devices
    if name == "tdigest":
        check_quantiles(cfg.quantiles, name="quantiles")
    if MODELS[name].is_trainable and trainer.max_epochs is not None and trainer.max_epochs < 1:
        raise ValueError(f"trainer.max_epochs={trainer.max_epochs} must be >= 1 (or null).")


def run(name: str, cfg) -> dict[str, str]:
    """Fit ``name`` as configured by a parsed ``cfg``; returns the files written."""
    check_config(name, cfg)
    data, trainer = cfg.data, cfg.trainer
    cls = MODELS[name]
    trainable = cls.is_trainable
    src = stream_data(
        data.paths if len(data.paths) != 1 else data.paths[0], layer=data.layer,
        batch_key=data.batch_key, batch_size=data.batch_size, num_workers=data.num_workers,
        pad=trainable, shuffle=trainable, seed=trainer.seed, require_counts=name == "hvg",
    )
    transforms = list(cfg.transforms or [])
    genes = bind_transforms(transforms, src.var_names_g)
    kwargs = cfg.model.as_dict() if hasattr(cfg.model, "as_dict") else dict(vars(cfg.model))
    kwargs["var_names_g"] = genes
    if "output_path" in inspect.signature(cls).parameters:
        kwargs["output_path"] = None  # the table goes to output_dir
    if name == "ipca":
        check_n_components(kwargs.get("n_components"), len(genes), src.n_obs)
    if name == "mean_var":
        kwargs.update(n_batch=src.n_batch, batch_categories=src.batch_categories)
    elif name == "hvg":
        kwargs.update(n_batch=src.n_batch, use_batch_key=data.batch_key is not None)
    elif name == "ppca":
        kwargs["n_obs"] = src.n_obs
        if cfg.mean_path is not None:
            table = pd.read_csv(cfg.mean_path, index_col=0)
            table.index = table.index.astype(str)
            missing = pd.Index(genes).difference(table.index)
            if len(missing):
                raise ValueError(
                    f"mean_path {cfg.mean_path!r} has no mean for {len(missing)} gene(s) "
                    f"({list(missing[:5])}); compute it with the same transforms."
                )
            kwargs["mean_g"] = table.loc[genes, "mean"].to_numpy()
    model = cls(**kwargs)
    optim = {}
    if trainable:
        optim = dict(max_epochs=trainer.max_epochs, lr=trainer.lr,
                     lr_schedule=trainer.lr_schedule)
    try:
        fit_statistic(
            model, src.datamodule, transforms=transforms, input_var_names_g=src.var_names_g,
            accelerator=trainer.accelerator, devices=trainer.devices, seed=trainer.seed,
            enable_progress_bar=trainer.enable_progress_bar, **optim,
        )
    except MisconfigurationException as err:  # raised by the Trainer, before the pass
        raise ValueError(f"the trainer section is not valid: {err}") from None
    os.makedirs(cfg.output_dir, exist_ok=True)
    files = {}
    table = model.to_dataframe(cfg.quantiles) if name == "tdigest" else model.to_dataframe()
    files["table"] = os.path.join(cfg.output_dir, f"{name}.csv")
    table.to_csv(files["table"])
    if name == "ipca":
        files["variance"] = os.path.join(cfg.output_dir, f"{name}_variance.csv")
        pd.DataFrame({
            "explained_variance": model.explained_variance_k.numpy(),
            "explained_variance_ratio": model.explained_variance_ratio_k.numpy(),
        }, index=pd.Index([f"PC{i + 1}" for i in range(model.n_components)], name="component")
        ).to_csv(files["variance"])
    files["state"] = os.path.join(cfg.output_dir, f"{name}.pt")
    torch.save({"model": name, "var_names_g": [str(g) for g in genes],
                "state_dict": model.state_dict()},
               files["state"])
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cellsight fit``: ``argv`` is ``[<model>, --config, x.yaml, ...]``.

    Returns 0 on success (``--print_config`` prints and exits 0), 2 without a model name.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: cellsight fit MODEL --config CONFIG.yaml [--print_config] [--key value ...]\n"
            f"models: {', '.join(sorted(MODELS))}\n"
            "see `cellsight fit MODEL --help` for a model's options"
        )
        return 0 if argv else 2
    name = _model_name(argv[0])
    parser = build_parser(name)
    cfg = parser.instantiate_classes(parser.parse_args(argv[1:]))
    files = run(name, cfg)
    print(f"cellsight fit {name}: wrote {', '.join(files.values())}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
