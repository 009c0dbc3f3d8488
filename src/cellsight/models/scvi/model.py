"""The user-facing scVI model: scvi-tools' ``SCVI`` API on cellsight's core."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS as K

from cellsight.checks import check_int
from cellsight.interpret.mixin import InterpretMixin
from cellsight.models.base import BaseModel
from cellsight.models.expression import ExpressionMixin
from cellsight.models.scvi.module import SingleCellVariationalInference
from cellsight.train import EpochMetricsTrainingPlan

__all__ = ["SCVI"]


class SCVI(ExpressionMixin, InterpretMixin, BaseModel):
    """Single-cell variational inference (Lopez et al. 2018) with scvi-tools' API.

    Defaults are those of ``scvi.model.SCVI`` (128 hidden units, 10 latent dimensions, one
    layer, dropout 0.1, ZINB likelihood, per-gene dispersion, observed library size, batch
    one-hot into the decoder, BatchNorm in encoder and decoder), so the two models have the same
    architecture and the same losses. Cellarium's options (batch embedding, input gene dropout,
    KL maxima and annealing start, flow prior) are off by default.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata` (raw counts).
    n_hidden, n_latent, n_layers, dropout_rate, dispersion, gene_likelihood, latent_distribution
        As in scvi-tools (``gene_likelihood``: ``"zinb"``, ``"nb"`` or ``"poisson"``).
    log_variational, encode_covariates, deeply_inject_covariates, use_batch_norm, use_layer_norm
        As in scvi-tools.
    batch_embedded, n_latent_batch, batch_representation_sampled, batch_kl_weight_max
        Learned (optionally sampled) batch embedding instead of a one-hot code.
    z_kl_weight_max
        Maximum weight of the KL divergence of ``z``.
    input_gene_dropout_rate
        Probability of zeroing each input count to the encoder during training.
    kl_warmup_epochs, kl_warmup_steps, kl_annealing_start
        KL annealing: the weight rises linearly from ``kl_annealing_start`` to its maximum over
        ``kl_warmup_steps`` steps (if given) or ``kl_warmup_epochs`` epochs. Passed to the
        training plan; ``plan_kwargs`` of :meth:`train` override them.
    use_size_factor_key
        Use the size factors registered with ``size_factor_key`` instead of library sizes.
    use_flow, flow_hidden_features
        Neural spline flow prior on ``z`` (``zuko``).
    encoder, decoder
        Optional per-network configs (see :class:`SingleCellVariationalInference`).
    seed
        Seeds the initial weights, the training split and shuffles, and the sampling done by
        the ``get_*`` methods: the same seed gives the same results on CPU.

    Notes
    -----
    Attributions, feature rankings and their significance (``get_feature_attributions``,
    ``rank_features``, ``get_feature_significance``) come from
    :class:`cellsight.interpret.mixin.InterpretMixin` (targets ``"latent"``, ``"expression"``,
    ``"loss"``).

    Training uses :class:`~cellsight.train.EpochMetricsTrainingPlan`: scvi-tools'
    optimisation, KL annealing and ELBO metrics, logged once per epoch.
    """

    _plan_cls = EpochMetricsTrainingPlan

    def __init__(
        self,
        adata: AnnData | None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
        latent_distribution: Literal["normal", "ln"] = "normal",
        log_variational: bool = True,
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_batch_norm: Literal["encoder", "decoder", "none", "both"] = "both",
        use_layer_norm: Literal["encoder", "decoder", "none", "both"] = "none",
        batch_embedded: bool = False,
        n_latent_batch: int | None = None,
        batch_representation_sampled: bool = False,
        batch_kl_weight_max: float = 0.0,
        z_kl_weight_max: float = 1.0,
        input_gene_dropout_rate: float = 0.0,
        kl_warmup_epochs: int | None = 400,
        kl_warmup_steps: int | None = None,
        kl_annealing_start: float = 0.0,
        use_size_factor_key: bool = False,
        use_flow: bool = False,
        flow_hidden_features: Sequence[int] = (64, 64),
        encoder: dict | None = None,
        decoder: dict | None = None,
        seed: int = 0,
    ) -> None:
        params = dict(locals())
        for key in ("self", "adata", "seed", "__class__"):
            params.pop(key, None)
        params["flow_hidden_features"] = [int(h) for h in flow_hidden_features]
        super().__init__(adata, seed=seed, **params)

    # ------------------------------------------------------------------ core hooks
    def _build_module(self) -> SingleCellVariationalInference:
        s = self.summary
        if self.init_params_.get("use_size_factor_key") and not s.has_size_factor:
            raise ValueError(
                "use_size_factor_key=True but no size factors were registered; call "
                "SCVI.setup_anndata(adata, size_factor_key='<obs column>') first."
            )
        return SingleCellVariationalInference(
            var_names_g=list(s.var_names),
            n_batch=s.n_batch,
            n_labels=s.n_labels,
            n_continuous_cov=s.n_continuous_cov,
            n_cats_per_cov=s.n_cats_per_cov,
            **self.init_params_,
        )

    def _plan_kwargs(self) -> dict[str, Any]:
        return self.module.kl_schedule()

    _needs_library_size = True
    _size_factor_hint = "register size factors and pass use_size_factor_key=True"

    def _uses_size_factors(self) -> bool:
        return bool(self.init_params_.get("use_size_factor_key"))

    # ------------------------------------------------------------------ helpers
    def _batch_codes(self, transform_batch: Any) -> list[int | None]:
        """Batch codes for a batch name, a list of names, ``"mean"`` (all) or ``None``.

        The :class:`~cellsight.models.expression.ExpressionMixin` hook (and
        :meth:`get_reconstructed_counts`' lookup of one batch name).
        """
        cats = [str(c) for c in self.summary.batch_categories]
        if transform_batch is None:
            return [None]
        if isinstance(transform_batch, str) and transform_batch == "mean" and "mean" not in cats:
            return list(range(len(cats)))
        values = transform_batch if isinstance(transform_batch, list | tuple) else [transform_batch]
        codes = []
        for value in values:
            if str(value) not in cats:
                raise ValueError(
                    f"transform_batch={value!r} is not a batch of this model; known batches are "
                    f"{cats[:20]} (or pass 'mean' to average over all of them)."
                )
            codes.append(cats.index(str(value)))
        return codes

    def _cat_cov_codes(self, transform_categorical_covariates: Any) -> list[int] | None:
        """Codes of fixed categorical covariates given as ``{key: category}`` or a list."""
        if transform_categorical_covariates is None:
            return None
        cats = self.summary.cat_cov_categories
        keys = list(cats)
        given = transform_categorical_covariates
        if not isinstance(given, dict):
            given = list(given)
            if len(given) != len(keys):
                raise ValueError(
                    f"transform_categorical_covariates has {len(given)} value(s) but the model "
                    f"has {len(keys)} categorical covariate(s) ({keys})."
                )
            given = dict(zip(keys, given))
        if set(given) != set(keys):
            raise ValueError(
                f"transform_categorical_covariates must give one category for each of {keys}."
            )
        codes = []
        for key in keys:
            known = [str(c) for c in cats[key]]
            if str(given[key]) not in known:
                raise ValueError(
                    f"{given[key]!r} is not a category of covariate {key!r} (known: {known[:20]})."
                )
            codes.append(known.index(str(given[key])))
        return codes

    def _forward_losses(self, adata, indices, batch_size) -> tuple[np.ndarray, np.ndarray]:
        """Per-cell reconstruction loss and summed KL (one posterior sample, kl_weight 1)."""
        rec, kl = [], []
        with self._seeded():
            for tensors in self._loader(adata, indices, batch_size):
                _, _, out = self.module(tensors, loss_kwargs={"kl_weight": 1.0})
                rec.append(out.dict_sum(out.reconstruction_loss))
                kl.append(out.dict_sum(out.kl_local))
        return torch.cat(rec).cpu().numpy(), torch.cat(kl).cpu().numpy()

    # ------------------------------------------------------------------ results
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Latent representation ``z`` of each cell, ``(n_cells, n_latent)``.

        Parameters
        ----------
        adata
            Cells to embed (default: the model's AnnData); validated against the model's genes
            and categories.
        indices
            Positions of the cells in ``adata`` (default: all).
        give_mean
            Posterior mean (for ``latent_distribution="ln"``: Monte Carlo mean of
            ``softmax(z)`` over ``mc_samples`` draws); ``False``: one posterior sample.
        mc_samples
            Draws for the ``"ln"`` mean.
        batch_size
            Cells per forward pass.
        return_dist
            Return ``(mean, variance)`` of ``q(z|x)`` instead.
        """
        check_int(mc_samples, "mc_samples")
        means, variances, zs = [], [], []
        with self._seeded():
            for tensors in self._loader(adata, indices, batch_size):
                inf = self.module.inference(**self.module._get_inference_input(tensors))
                qz = inf["qz"]
                if return_dist:
                    means.append(qz.loc)
                    variances.append(qz.scale.square())
                    continue
                if not give_mean:
                    z = inf["z_nk"]
                elif self.module.latent_distribution == "ln":
                    z = torch.softmax(qz.sample((mc_samples,)), dim=-1).mean(0)
                else:
                    z = qz.loc
                zs.append(z)
        if return_dist:
            return torch.cat(means).cpu().numpy(), torch.cat(variances).cpu().numpy()
        return torch.cat(zs).cpu().numpy()

    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: str | Sequence[str] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        return_mean: bool = True,
        return_numpy: bool = False,
        batch_size: int | None = None,
    ) -> pd.DataFrame | np.ndarray:
        """Decoded expression frequencies ``rho`` scaled to ``library_size``.

        Parameters
        ----------
        adata, indices, batch_size
            Cells, as in :meth:`get_latent_representation`.
        transform_batch
            ``None``: each cell's own batch; a batch name or a list of names: decode in those
            batches and average; ``"mean"``: average over all batches.
        gene_list
            Return only these genes (names).
        library_size
            Common library size (rows then sum to it); ``"latent"``: each cell's observed
            library size, i.e. the NB mean.
        n_samples
            Posterior samples of ``z`` (each decoded, then averaged when ``return_mean``).
        return_mean
            Average over samples; ``False`` with ``n_samples > 1`` gives an
            ``(n_samples, n_cells, n_genes)`` array.
        return_numpy
            Return an array instead of a DataFrame (cells x genes, with names).
        """
        return self._normalized_expression(
            adata, indices, transform_batch, gene_list, library_size, n_samples, return_mean,
            return_numpy, batch_size,
        )

    def get_reconstructed_counts(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        gene_list: Sequence[str] | None = None,
        transform_batch: str | int | None = None,
        transform_categorical_covariates: dict | Sequence | None = None,
        n_latent_samples: int = 30,
        use_latent_mean: bool = False,
        use_importance_sampling: bool = False,
        library_size: float = 10000,
        batch_size: int | None = None,
    ) -> pd.DataFrame:
        """Expected counts at a common library size (Cellarium's ``reconstruct``).

        Parameters
        ----------
        adata, indices, batch_size
            Cells, as in :meth:`get_latent_representation`.
        gene_list
            Return only these genes.
        transform_batch
            ``None``: each cell's own batch; a batch name: that batch; ``"mean"``: the average
            over all batches.
        transform_categorical_covariates
            Fix the extra categorical covariates for decoding: ``{key: category}`` or a list in
            the order of ``categorical_covariate_keys``.
        n_latent_samples, use_latent_mean, use_importance_sampling
            Posterior samples averaged (optionally importance-weighted), or the posterior mean.
        library_size
            Library size of every reconstructed cell.
        """
        if transform_batch is None or transform_batch == "mean":
            tb = transform_batch
        else:
            tb = self._batch_codes(transform_batch)[0]
        cat_codes = self._cat_cov_codes(transform_categorical_covariates)
        genes = self._gene_positions(gene_list)
        chunks = []
        with self._seeded():
            for t in self._loader(adata, indices, batch_size):
                cat = t.get(K.CAT_COVS_KEY)
                chunks.append(
                    self.module.reconstruct(
                        t[K.X_KEY],
                        gene_inds=genes,
                        batch_index_n=t[K.BATCH_KEY],
                        continuous_covariates_nc=t.get(K.CONT_COVS_KEY),
                        categorical_covariate_index_nd=cat,
                        label_index_n=t.get(K.LABELS_KEY),
                        transform_batch=tb,
                        transform_categorical_covariates=cat_codes,
                        use_latent_mean=use_latent_mean,
                        n_latent_samples=n_latent_samples,
                        use_importance_sampling=use_importance_sampling,
                        reconstructed_library_size=library_size,
                    ).cpu()
                )
        columns = self.var_names if genes is None else self.var_names[genes]
        return pd.DataFrame(
            torch.cat(chunks).numpy(), index=self._obs_names(adata, indices), columns=columns
        )

    def get_elbo(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | pd.Series:
        """Evidence lower bound per cell, averaged (scvi-tools' ``get_elbo`` convention).

        The ELBO is ``log p(x|z) - KL(q(z|x) || p(z))`` at one posterior sample; it is
        negative and **higher is better** (scvi-tools 1.x returns the same sign). Sampling is
        seeded with the model's seed.

        Returns
        -------
        The mean over cells, or a Series per cell (``return_mean=False``).
        """
        rec_n, kl_n = self._forward_losses(adata, indices, batch_size)
        elbo_n = -(rec_n + kl_n)
        if return_mean:
            return float(elbo_n.mean())
        return pd.Series(elbo_n, index=self._obs_names(adata, indices), name="elbo")

    def get_reconstruction_error(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> dict[str, float | pd.Series]:
        """Reconstruction error ``-log p(x|z)`` (summed over genes), averaged over cells.

        As in scvi-tools, the value is a **positive negative log-likelihood (lower is better)**,
        returned in a dict under ``"reconstruction_loss"``, at one seeded posterior sample.
        """
        rec_n, _ = self._forward_losses(adata, indices, batch_size)
        if return_mean:
            return {"reconstruction_loss": float(rec_n.mean())}
        names = self._obs_names(adata, indices)
        return {"reconstruction_loss": pd.Series(rec_n, index=names, name="reconstruction_loss")}
