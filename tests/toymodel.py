"""A tiny count model on the real core, for testing the data layer and training path alone."""

from __future__ import annotations

import numpy as np
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS as K
from scvi.module.base import BaseModuleClass, LossOutput

from cellsight.models.base import BaseModel


class ToyModule(BaseModuleClass):
    """log1p(x) -> linear (+ batch one-hot) -> softplus Poisson rate; one sampled noise term."""

    def __init__(self, n_genes: int, n_batch: int) -> None:
        super().__init__()
        self.n_batch = n_batch
        self.lin = torch.nn.Linear(n_genes + n_batch, n_genes)

    def _get_inference_input(self, tensors):
        return {"x_ng": tensors[K.X_KEY], "batch_n1": tensors[K.BATCH_KEY]}

    def hidden(self, x_ng, batch_n1):
        onehot_nb = torch.nn.functional.one_hot(batch_n1.long().squeeze(-1), self.n_batch)
        return self.lin(torch.cat([torch.log1p(x_ng), onehot_nb.float()], dim=-1))

    def inference(self, x_ng, batch_n1):
        h_ng = self.hidden(x_ng, batch_n1)
        return {"h_ng": h_ng + 0.01 * torch.randn_like(h_ng)}

    def _get_generative_input(self, tensors, inference_outputs):
        return {"h_ng": inference_outputs["h_ng"]}

    def generative(self, h_ng):
        return {"rate_ng": torch.nn.functional.softplus(h_ng) + 1e-4}

    def loss(self, tensors, inference_outputs, generative_outputs, kl_weight: float = 1.0):
        x_ng = tensors[K.X_KEY]
        rec_n = -torch.distributions.Poisson(generative_outputs["rate_ng"]).log_prob(x_ng).sum(-1)
        return LossOutput(
            loss=rec_n.mean(), reconstruction_loss=rec_n, kl_local=torch.zeros_like(rec_n)
        )


class ToyModel(BaseModel):
    """User-facing facade of :class:`ToyModule`."""

    def __init__(self, adata: AnnData | None, gene_likelihood: str = "poisson", seed: int = 0):
        super().__init__(adata, seed=seed, gene_likelihood=gene_likelihood)

    def _build_module(self):
        return ToyModule(self.summary.n_vars, self.summary.n_batch)

    @torch.inference_mode()
    def get_rates(self, adata=None, indices=None) -> np.ndarray:
        """Deterministic Poisson rates (no noise) of the given cells."""
        self.module.eval()
        out = [
            self.module.generative(self.module.hidden(b[K.X_KEY], b[K.BATCH_KEY]))["rate_ng"]
            for b in self._loader(adata, indices)
        ]
        return torch.cat(out).cpu().numpy()


def toy_adata(n_cells: int = 240, n_genes: int = 30, n_batch: int = 3, seed: int = 0) -> AnnData:
    rng = np.random.default_rng(seed)
    mu_g = rng.gamma(2.0, 1.0, n_genes)
    x = rng.poisson(mu_g * rng.gamma(5.0, 0.2, (n_cells, 1))).astype(np.float32)
    adata = AnnData(x)
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["batch"] = [f"b{i % n_batch}" for i in range(n_cells)]
    adata.obs["label"] = [["T", "B", "NK", "unknown"][i % 4] for i in range(n_cells)]
    adata.obs["donor"] = [f"d{i % 2}" for i in range(n_cells)]
    adata.obs["age"] = rng.normal(50, 10, n_cells)
    return adata
