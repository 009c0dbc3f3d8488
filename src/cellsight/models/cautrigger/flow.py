"""Information flow read-out of a trained CauTrigger model (per latent dimension and block)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch

from cellsight.checks import check_int
from cellsight.interpret.information_flow import information_flow

__all__ = ["latent_information_flow"]


@torch.no_grad()
def latent_information_flow(
    model,
    adata=None,
    dims=None,
    zero_floor: bool = False,
    plot_info_flow: bool = True,
    skip_single_info: bool = True,
    save_fig: bool = False,
    save_dir: str | None = None,
    n_cells: int = 200,
    n_alpha: int = 25,
    n_beta: int = 100,
    seed: int | None = None,
) -> tuple[pd.DataFrame, pd.Series]:
    """See :meth:`cellsight.models.CauTrigger1L.compute_information_flow`."""
    model._check_trained()
    check_int(n_cells, "n_cells")  # before subsampling; information_flow checks the draws
    m = model.module
    k = m.n_latent
    dims = list(range(k)) if dims is None else [int(d) for d in dims]
    if not dims or min(dims) < 0 or max(dims) >= k:
        raise ValueError(f"dims {dims} must be latent dimensions in 0..{k - 1}.")
    seed = model.seed if seed is None else int(seed)
    xt = model._inputs(adata)[0]
    gen = torch.Generator().manual_seed(seed)
    if xt.shape[0] > n_cells:
        xt = xt[torch.randperm(xt.shape[0], generator=gen)[:n_cells].sort().values]
    was = m.training
    m.eval()
    try:
        w = m.gates(xt)
        qc, _ = m.encoder_c(xt * w)
        qs, _ = m.encoder_s(xt * (1 - w))
        mu = torch.cat([qc.loc, qs.loc], -1)
        std = torch.cat([qc.scale, qs.scale], -1)

        def flow(block):
            return float(information_flow(m.predict_proba_from_latent, mu, std, block,
                                          n_alpha=n_alpha, n_beta=n_beta,
                                          generator=gen).mean())

        per_dim = np.array([flow([d]) for d in dims])
        totals = {"causal": flow(list(range(m.n_causal))),
                  "spurious": flow(list(range(m.n_causal, k)))}
    finally:
        m.train(was)
    if zero_floor:
        per_dim = per_dim - per_dim.min()
    info_flow = pd.DataFrame(
        {"info_flow": per_dim,
         "type": ["causal" if d < m.n_causal else "spurious" for d in dims]},
        index=pd.Index([f"z_{d}" for d in dims], name="dim"),
    )
    info_flow_cat = pd.Series(totals, name="info_flow")
    if plot_info_flow or save_fig:
        import matplotlib.pyplot as plt

        from cellsight.plot.causal import information_flow_bars

        fig = information_flow_bars(info_flow, info_flow_cat, show_dims=not skip_single_info)
        model.info_flow_figure_ = fig
        if save_fig:
            path = os.path.join(save_dir or ".", "information_flow.png")
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fig.savefig(path, dpi=120, bbox_inches="tight")
        if not plot_info_flow:
            plt.close(fig)
    return info_flow, info_flow_cat
