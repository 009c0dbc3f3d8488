"""``cellsight fit <model> --config x.yaml``: run a streaming statistic from a config file.

A config has five sections (print a full one with ``--print_config``)::

    data:        {paths: [s0.h5ad, s1.h5ad], layer: null, batch_key: null,
                  batch_size: 1024, num_workers: 0}
    transforms:  [{class_path: cellsight.stats.transforms.NormalizeTotal,
                   init_args: {target_count: 10000}}, ...]
    model:       the model's own arguments (genes, batches and cells come from the data)
    trainer:     {devices: 1, accelerator: cpu, max_epochs: null, lr: 0.01, seed: 0, ...}
    output_dir:  where ``<model>.csv`` (the result table) and ``<model>.pt`` (state) go

Runs chain through files: the ``mean_var`` table feeds a ``ZScore`` transform
(``init_args: {stats_path: out/mean_var.csv}``) of a later ``ipca`` run, and the ``hvg`` table
a ``Filter``; ``ppca`` takes ``mean_path`` (a mean/var table) for its fixed mean.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from cellsight.stats.base import fit_statistic
from cellsight.stats.data import stream_data
from cellsight.stats.hvg import HVGSeuratV3
from cellsight.stats.ipca import IncrementalPCA
from cellsight.stats.mean_var import OnePassMeanVarStd
from cellsight.stats.ppca import ProbabilisticPCA
from cellsight.stats.tdigest import TDigest
from cellsight.stats.transforms import GeneTransform

__all__ = ["MODELS", "build_parser", "main", "run"]

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
    """The jsonargparse parser of ``cellsight fit <model>``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    name = _model_name(model)
    parser = ArgumentParser(
        prog=f"cellsight fit {name}",
        description=f"Stream data through transforms into {MODELS[name].__name__}.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file")
    parser.add_argument("--data.paths", type=list[str], required=True,
                        help="shard (.h5ad / zarr) paths, or one .h5ad")
    parser.add_argument("--data.layer", type=str | None, default=None)
    parser.add_argument("--data.batch_key", type=str | None, default=None)
    parser.add_argument("--data.batch_size", type=int, default=1024)
    parser.add_argument("--data.num_workers", type=int, default=0)
    parser.add_argument("--transforms", type=list[GeneTransform] | None, default=None,
                        help="per-batch transforms (class_path / init_args), applied in order")
    parser.add_class_arguments(MODELS[name], "model", skip=FROM_DATA, instantiate=False)
    if "model.output_path" in parser.get_defaults():
        parser.set_defaults({"model.output_path": None})  # results go to output_dir
    parser.add_argument("--trainer.devices", type=int, default=1)
    parser.add_argument("--trainer.accelerator", type=str, default="cpu")
    parser.add_argument("--trainer.max_epochs", type=int | None, default=None)
    parser.add_argument("--trainer.lr", type=float, default=1e-2)
    parser.add_argument("--trainer.lr_schedule", type=str, default="constant")
    parser.add_argument("--trainer.seed", type=int, default=0)
    parser.add_argument("--trainer.enable_progress_bar", type=bool, default=True)
    parser.add_argument("--output_dir", type=str, default="cellsight_fit_output")
    parser.add_argument("--quantiles", type=list[float], default=[0.5, 0.9],
                        help="tdigest: quantiles written to the table")
    parser.add_argument("--mean_path", type=str | None, default=None,
                        help="ppca: mean/var CSV whose 'mean' column fixes the model mean")
    return parser


def _bind(transforms: Sequence[torch.nn.Module], var_names_g: np.ndarray) -> np.ndarray:
    names = var_names_g
    for t in transforms:
        names = t.setup_genes(names)
    return names


def run(name: str, cfg) -> dict[str, str]:
    """Fit ``name`` as configured by a parsed ``cfg``; returns the files written."""
    data, trainer = cfg.data, cfg.trainer
    cls = MODELS[name]
    trainable = cls.is_trainable
    src = stream_data(
        data.paths if len(data.paths) != 1 else data.paths[0], layer=data.layer,
        batch_key=data.batch_key, batch_size=data.batch_size, num_workers=data.num_workers,
        pad=trainable, shuffle=trainable, seed=trainer.seed, require_counts=name == "hvg",
    )
    transforms = list(cfg.transforms or [])
    genes = _bind(transforms, src.var_names_g)
    kwargs = cfg.model.as_dict() if hasattr(cfg.model, "as_dict") else dict(vars(cfg.model))
    kwargs["var_names_g"] = genes
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
    fit_statistic(
        model, src.datamodule, transforms=transforms, input_var_names_g=src.var_names_g,
        max_epochs=trainer.max_epochs, accelerator=trainer.accelerator,
        devices=trainer.devices, lr=trainer.lr, lr_schedule=trainer.lr_schedule,
        seed=trainer.seed, enable_progress_bar=trainer.enable_progress_bar,
    )
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
