"""Demo step ``scvi``: scVI on the bundled PBMC 68k (700 cells) counts, UMAP, loss curves."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from cellsight.demo.core import DemoContext, DemoStep
from cellsight.demo.metrics import knn_label_accuracy, majority_accuracy

__all__ = ["STEP", "run", "FULL_EPOCHS", "N_LATENT"]

FULL_EPOCHS = 200
QUICK_EPOCHS = 3
N_LATENT = 10
BATCH_SIZE = 128
LABEL_KEY = "bulk_labels"
LATENT_FILE = "latent.h5ad"
FIGURE_FILE = "scvi_umap_loss.png"
HISTORY_FILE = "scvi_history.csv"


def _last(history: pd.DataFrame, column: str) -> str:
    if column not in history.columns:
        return "n/a"
    values = history[column].dropna()
    return f"{values.iloc[-1]:.2f}" if len(values) else "n/a"


def run(ctx: DemoContext) -> None:
    """Train scVI, embed, plot and report (see the module docstring)."""
    import matplotlib.pyplot as plt
    import scanpy as sc

    from cellsight.models import SCVI
    from cellsight.plot import embedding_and_loss

    adata = ctx.dataset("pbmc68k_reduced")
    baseline_pca = np.asarray(adata.obsm["X_pca"])  # shipped: PCA of scaled log-normalised data
    del adata.obsm["X_pca"], adata.obsm["X_umap"]  # both computed from other data
    n_types = adata.obs[LABEL_KEY].nunique()
    ctx.log(
        f"  data: pbmc68k_reduced, {adata.n_obs} cells x {adata.n_vars} genes, integer counts, "
        f"{n_types} cell types in obs[{LABEL_KEY!r}]"
    )
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_latent=N_LATENT, seed=ctx.seed)
    epochs = ctx.epochs(full=FULL_EPOCHS, quick=QUICK_EPOCHS)
    ctx.log(f"  training scVI (n_latent={N_LATENT}) for {epochs} epochs on CPU")
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=BATCH_SIZE,
        train_size=0.9,
        seed=ctx.seed,
        enable_progress_bar=ctx.progress_bar,
    )
    train_s = time.perf_counter() - t0
    history = model.history
    adata.obsm["X_scVI"] = np.asarray(model.get_latent_representation(), dtype=np.float32)

    ctx.log("  UMAP of the latent (scanpy)")
    sc.pp.neighbors(adata, use_rep="X_scVI", n_neighbors=15, random_state=ctx.seed)
    sc.tl.umap(adata, random_state=ctx.seed)
    adata.write_h5ad(ctx.path(LATENT_FILE))
    ctx.add_file(LATENT_FILE, "counts, cell labels, `obsm['X_scVI']` (latent), `obsm['X_umap']`")
    history.to_csv(ctx.path(HISTORY_FILE))
    ctx.add_file(HISTORY_FILE, "per-epoch training metrics")

    fig = embedding_and_loss(
        adata,
        history,
        basis="X_umap",
        color=LABEL_KEY,
        metrics=None,
        title=f"scVI on pbmc68k_reduced: {adata.n_obs} cells, {epochs} epochs",
    )
    fig.savefig(ctx.path(FIGURE_FILE), dpi=110, bbox_inches="tight")
    plt.close(fig)
    ctx.add_file(FIGURE_FILE, f"UMAP of the scVI latent coloured by `{LABEL_KEY}`, loss curves")

    labels = adata.obs[LABEL_KEY].to_numpy()
    acc_scvi = knn_label_accuracy(adata.obsm["X_scVI"], labels, seed=ctx.seed)
    acc_pca = knn_label_accuracy(baseline_pca, labels, seed=ctx.seed)
    acc_major = majority_accuracy(labels)
    ctx.log(f"  kNN accuracy of {LABEL_KEY}: scVI latent {acc_scvi:.3f}, chance {acc_major:.3f}")
    ctx.add_section(
        "scVI on PBMC 68k (reduced)",
        f"""
- data: `cellsight.datasets.pbmc68k_reduced()`: {adata.n_obs} cells x {adata.n_vars} genes,
  integer UMI counts ({int(adata.X.sum()):,} in total), {n_types} cell types in `{LABEL_KEY}`
  (used only to evaluate), no batches
- model: `SCVI(adata, n_latent={N_LATENT}, seed={ctx.seed})`, defaults otherwise
- training: {epochs} epochs, batch size {BATCH_SIZE}, 90% train / 10% validation, CPU,
  {train_s:.1f} s ({train_s / max(epochs, 1):.2f} s per epoch)

Final epoch (per-cell losses; the ELBO here is the negative ELBO, lower is better):

| metric | train | validation |
|---|---|---|
| ELBO | {_last(history, "elbo_train")} | {_last(history, "elbo_validation")} |
| reconstruction loss | {_last(history, "reconstruction_loss_train")} | \
{_last(history, "reconstruction_loss_validation")} |
| KL (local) | {_last(history, "kl_local_train")} | {_last(history, "kl_local_validation")} |

Sanity check: accuracy of a 15-nearest-neighbour classifier of `{LABEL_KEY}` (5-fold,
held-out cells):

| embedding | kNN accuracy |
|---|---|
| scVI latent ({N_LATENT} dims) | {acc_scvi:.3f} |
| PCA shipped with the data (50 PCs of scaled log-normalised data) | {acc_pca:.3f} |
| always the most frequent type (chance) | {acc_major:.3f} |
""",
    )


STEP = DemoStep(
    name="scvi",
    title="scVI on bundled PBMC counts: latent, UMAP, loss curves",
    run=run,
)
