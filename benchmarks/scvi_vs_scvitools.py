"""scVI in cellsight vs scvi-tools' ``scvi.model.SCVI``: same data, architecture and split.

Both models are built with scvi-tools' default architecture (128 hidden units, 10 latent
dimensions, one layer, dropout 0.1, per-gene dispersion, BatchNorm) and the chosen likelihood,
trained in this process with the same epochs, batch size (128), optimiser settings and
train/validation cells (scvi-tools gets cellsight's split through ``external_indexing``), one
torch thread each, validating every epoch.

Datasets (bundled with cellsight, nothing is downloaded):

* ``pbmc``: the 700 PBMC 68k cells x 765 genes with integer counts; batch = cell-cycle
  ``phase`` (3 batches);
* ``mouse``: the 10,000 mouse cells x 1,000 genes (6.9% non-zero), no batch (the one cell with
  zero counts is dropped: its log library size is undefined).

Printed, one line per metric:

* median seconds per training epoch (wall clock and process CPU time; the machine may be
  shared, CPU time is the steadier one) of each and the ratio cellsight / scvi-tools
  (goal <= 0.6);
* held-out ELBO (``get_elbo`` on the validation cells, higher is better) of each and the
  relative difference (goal <= 2%).

scvi-tools is a dependency of cellsight, so it runs in this environment; if it cannot be
imported the comparison is reported as skipped. Exits 0 whatever the numbers.

Usage: ``python benchmarks/scvi_vs_scvitools.py [--datasets pbmc mouse] [--epochs 30]
[--likelihood zinb] [--seed 0]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings

import numpy as np
import torch

from cellsight.train import EpochTimer

GOAL_RATIO = 0.6
GOAL_ELBO = 0.02


def load(name: str):
    """The dataset and its batch key."""
    import cellsight.datasets as ds

    if name == "pbmc":
        return ds.pbmc68k_reduced(), "phase"
    adata = ds.mouse_10k()
    keep = np.asarray(adata.X.sum(axis=1)).reshape(-1) > 0
    return adata[keep].copy(), None


def train_cellsight(adata, batch_key, args):
    from cellsight.models import SCVI

    adata = adata.copy()
    SCVI.setup_anndata(adata, batch_key=batch_key)
    model = SCVI(adata, gene_likelihood=args.likelihood, seed=args.seed)
    timer = EpochTimer()
    model.train(
        max_epochs=args.epochs, batch_size=128, enable_progress_bar=False, callbacks=[timer]
    )
    return model, timer


def train_scvitools(adata, batch_key, split, args):
    import scvi

    scvi.settings.seed = args.seed
    adata = adata.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    model = scvi.model.SCVI(adata, gene_likelihood=args.likelihood)
    timer = EpochTimer()
    train_idx, val_idx = split
    rest = np.setdiff1d(np.arange(adata.n_obs), np.concatenate([train_idx, val_idx]))
    model.train(
        max_epochs=args.epochs,
        batch_size=128,
        enable_progress_bar=False,
        check_val_every_n_epoch=1,
        datasplitter_kwargs={"external_indexing": [train_idx, val_idx, rest]},
        callbacks=[timer],
    )
    return model, timer


def run(name: str, args) -> None:
    adata, batch_key = load(name)
    label = f"{name} {adata.n_obs}x{adata.n_vars}, {args.likelihood}, {args.epochs} epochs"
    ours, t_ours = train_cellsight(adata, batch_key, args)
    try:
        ref, t_ref = train_scvitools(
            adata, batch_key, (ours.train_indices_, ours.validation_indices_), args
        )
    except ImportError as err:
        print(f"scvi {name}: scvi-tools skipped ({err})")
        return
    for kind in ("wall", "cpu"):
        a = statistics.median(getattr(t_ours, kind)[1:])
        b = statistics.median(getattr(t_ref, kind)[1:])
        print(
            f"scvi epoch seconds ({kind}, {label}): cellsight {a:.3f}, scvi-tools {b:.3f}, "
            f"ratio {a / b:.2f} (goal <= {GOAL_RATIO})"
        )
    val = ours.validation_indices_
    e_ours = ours.get_elbo(indices=val)
    e_ref = float(ref.get_elbo(indices=val))
    rel = abs(e_ours - e_ref) / abs(e_ref)
    print(
        f"scvi held-out ELBO ({label}, {len(val)} cells): cellsight {e_ours:.2f}, "
        f"scvi-tools {e_ref:.2f}, relative difference {100 * rel:.2f}% "
        f"(goal <= {100 * GOAL_ELBO:.0f}%)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["pbmc", "mouse"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--likelihood", default="zinb", choices=["zinb", "nb", "poisson"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    for name in args.datasets:
        run(name, args)


if __name__ == "__main__":
    main()
