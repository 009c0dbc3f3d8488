"""scVI (Lopez et al. 2018) as a module: encoder q(z|x), decoder p(x|z, batch), ELBO loss.

The networks are scvi-tools' public ``scvi.nn.Encoder`` and ``scvi.nn.DecoderSCVI`` under the
attribute names scvi-tools' ``VAE`` uses (``z_encoder``, ``decoder``, ``px_r``), so a trained
scvi-tools model's weights load into this module (:meth:`load_scvi_tools_state_dict`) and the
two compute the same losses. Parameters the likelihood never uses (scvi-tools' library encoder
when the observed library size is used, the zero-inflation head outside ZINB, the per-cell
dispersion head outside ``"gene-cell"``, ``px_r`` for Poisson) are not built.

On top of scvi-tools' VAE it has Cellarium's options: a learned (optionally sampled) batch
embedding, input gene dropout, separate KL maxima for ``z`` and the batch embedding, and a
normalising-flow prior on ``z``.

Batches are dicts keyed by ``scvi.REGISTRY_KEYS``; the module never sees AnnData.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scvi import REGISTRY_KEYS as K
from scvi.distributions import NegativeBinomial, Poisson, ZeroInflatedNegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput
from scvi.nn import DecoderSCVI, Encoder
from torch.distributions import Distribution, Normal, kl_divergence

from cellsight.checks import check_int
from cellsight.models.scvi.config import check_module_args, network_config
from cellsight.models.scvi.reconstruct import reconstruct_counts
from cellsight.nn.flows import FlowPrior
from cellsight.nn.layers import BatchEmbedding, gene_dropout, norm_placement
from cellsight.nn.likelihoods import (
    nb_log_likelihood_n,
    poisson_log_likelihood_n,
    zinb_log_likelihood_n,
)

__all__ = ["SingleCellVariationalInference"]


class SingleCellVariationalInference(BaseModuleClass):
    """Single-cell variational inference (scVI), Cellarium's flexible variant.

    Parameters
    ----------
    var_names_g
        Gene names, in the order of the input columns.
    encoder, decoder
        Optional network configs overriding ``n_hidden`` / ``n_layers`` (/ ``dropout_rate`` for
        the encoder), see :func:`cellsight.models.scvi.config.network_config`.
    n_batch
        Number of batches (0 or 1: no batch covariate).
    n_latent
        Dimension of the latent space ``z``.
    n_hidden, n_layers
        Width and depth of the encoder and decoder.
    n_continuous_cov
        Number of continuous covariates (concatenated to the decoder input).
    n_cats_per_cov
        Number of categories of each extra categorical covariate (one-hot into the decoder).
    n_labels
        Number of labels (only used by ``dispersion="gene-label"``).
    dropout_rate
        Dropout of the encoder's hidden units.
    dispersion
        NB/ZINB inverse dispersion ``theta``: per ``"gene"``, ``"gene-batch"``, ``"gene-label"``
        or ``"gene-cell"`` (decoded from ``z``).
    log_variational
        Encode ``log1p(x)`` instead of ``x``.
    gene_likelihood
        ``"nb"``, ``"zinb"`` or ``"poisson"`` (``scvi.distributions``).
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal: the decoder sees ``softmax(z)``).
    encode_covariates
        Also feed the batch (and covariates) to the encoder (scvi-tools' default: ``False``).
    deeply_inject_covariates
        Inject categorical covariates into every hidden layer, not only the first.
    batch_embedded
        Represent batches by a learned ``n_latent_batch``-dimensional embedding instead of a
        one-hot code.
    batch_representation_sampled
        Sample the batch embedding from a learned Normal during training (needs
        ``batch_embedded``); its KL divergence from ``Normal(0, 1)`` is weighted by
        ``batch_kl_weight_max``.
    n_latent_batch
        Dimension of the batch embedding (default ``n_batch``).
    z_kl_weight_max, batch_kl_weight_max
        Maximum weights of the KL terms of ``z`` and of the batch embedding. The training plan's
        annealed weight (from ``kl_annealing_start`` to 1) multiplies both.
    input_gene_dropout_rate
        During training, each input count to the encoder is zeroed with this probability.
    use_batch_norm, use_layer_norm
        Where to put ``BatchNorm1d`` / ``LayerNorm``: ``"encoder"``, ``"decoder"``, ``"both"``,
        ``"none"``.
    kl_warmup_epochs, kl_warmup_steps, kl_annealing_start
        KL annealing schedule, read by the training plan (see :meth:`kl_schedule`).
    use_size_factor_key
        Scale the decoder output by the registered size factor instead of the observed library
        size (the scale activation becomes softplus, as in scvi-tools).
    use_flow
        Use a neural spline flow prior ``p(z)`` (``zuko``) instead of ``Normal(0, I)``; its KL
        term is the one-sample Monte Carlo estimate ``log q(z|x) - log p(z)``.
    flow_hidden_features
        Hidden widths of the flow's conditioner networks.
    """

    def __init__(
        self,
        var_names_g: Sequence[str],
        encoder: dict | None = None,
        decoder: dict | None = None,
        n_batch: int = 0,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        n_continuous_cov: int = 0,
        n_cats_per_cov: Sequence[int] | None = None,
        n_labels: int = 0,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        log_variational: bool = True,
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "nb",
        latent_distribution: Literal["normal", "ln"] = "normal",
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        batch_embedded: bool = False,
        batch_representation_sampled: bool = False,
        n_latent_batch: int | None = None,
        z_kl_weight_max: float = 1.0,
        batch_kl_weight_max: float = 0.0,
        input_gene_dropout_rate: float = 0.0,
        use_batch_norm: Literal["encoder", "decoder", "none", "both"] = "both",
        use_layer_norm: Literal["encoder", "decoder", "none", "both"] = "none",
        kl_warmup_epochs: int | None = 400,
        kl_warmup_steps: int | None = None,
        kl_annealing_start: float = 0.0,
        use_size_factor_key: bool = False,
        use_flow: bool = False,
        flow_hidden_features: Sequence[int] = (64, 64),
    ) -> None:
        super().__init__()
        check_module_args(
            gene_likelihood=gene_likelihood,
            dispersion=dispersion,
            latent_distribution=latent_distribution,
            input_gene_dropout_rate=input_gene_dropout_rate,
            kl_annealing_start=kl_annealing_start,
            n_latent=n_latent,
            n_batch=n_batch,
            n_labels=n_labels,
            z_kl_weight_max=z_kl_weight_max,
            batch_kl_weight_max=batch_kl_weight_max,
            batch_embedded=batch_embedded,
            batch_representation_sampled=batch_representation_sampled,
            n_latent_batch=n_latent_batch,
        )
        check_int(kl_warmup_epochs, "kl_warmup_epochs", 0, allow_none=True)
        check_int(kl_warmup_steps, "kl_warmup_steps", 0, allow_none=True)
        enc_bn, dec_bn = norm_placement(use_batch_norm, "use_batch_norm")
        enc_ln, dec_ln = norm_placement(use_layer_norm, "use_layer_norm")

        self.var_names_g = np.asarray(var_names_g).astype(str)
        n_genes = len(self.var_names_g)
        self.n_input = n_genes
        self.n_batch = int(n_batch)
        self.n_labels = int(n_labels)
        self.n_latent = int(n_latent)
        self.n_cats_per_cov = list(n_cats_per_cov or [])
        self.n_continuous_cov = int(n_continuous_cov)
        self.dispersion = dispersion
        self.gene_likelihood = gene_likelihood
        self.latent_distribution = latent_distribution
        self.log_variational = log_variational
        self.encode_covariates = encode_covariates
        self.batch_embedded = batch_embedded
        self.batch_representation_sampled = batch_representation_sampled
        self.n_latent_batch = (n_latent_batch or max(self.n_batch, 1)) if batch_embedded else None
        self.z_kl_weight_max = float(z_kl_weight_max)
        self.batch_kl_weight_max = float(batch_kl_weight_max)
        self.input_gene_dropout_rate = float(input_gene_dropout_rate)
        self.kl_warmup_epochs = kl_warmup_epochs
        self.kl_warmup_steps = kl_warmup_steps
        self.kl_annealing_start = float(kl_annealing_start)
        self.use_size_factor_key = use_size_factor_key
        self.use_flow = use_flow

        enc_hidden, enc_layers, enc_dropout = network_config(
            encoder, "encoder", n_hidden, n_layers, dropout_rate
        )
        dec_hidden, dec_layers, _ = network_config(decoder, "decoder", n_hidden, n_layers, 0.0)

        batch_cats = [] if batch_embedded else [self.n_batch]
        cat_list = batch_cats + self.n_cats_per_cov
        n_batch_rep = self.n_latent_batch or 0
        n_enc_in = n_genes
        if encode_covariates:
            n_enc_in += self.n_continuous_cov + n_batch_rep
        self.z_encoder = Encoder(
            n_enc_in,
            self.n_latent,
            n_cat_list=cat_list if encode_covariates else None,
            n_layers=enc_layers,
            n_hidden=enc_hidden,
            dropout_rate=enc_dropout,
            distribution=latent_distribution,
            inject_covariates=deeply_inject_covariates,
            use_batch_norm=enc_bn,
            use_layer_norm=enc_ln,
            return_dist=True,
        )
        self.decoder = DecoderSCVI(
            self.n_latent + self.n_continuous_cov + n_batch_rep,
            n_genes,
            n_cat_list=cat_list,
            n_layers=dec_layers,
            n_hidden=dec_hidden,
            inject_covariates=deeply_inject_covariates,
            use_batch_norm=dec_bn,
            use_layer_norm=dec_ln,
            scale_activation="softplus" if use_size_factor_key else "softmax",
        )
        # DecoderSCVI always builds the zero-inflation and per-cell dispersion heads; drop the
        # ones this likelihood does not use (unused parameters would stall DDP's gradient sync)
        if dispersion != "gene-cell" or gene_likelihood == "poisson":
            self.decoder.px_r_decoder = None
        if gene_likelihood != "zinb":
            self.decoder.px_dropout_decoder = None
        n_px_r = {"gene": None, "gene-batch": self.n_batch, "gene-label": self.n_labels}
        if gene_likelihood != "poisson" and dispersion in n_px_r:
            shape = (n_genes,) if n_px_r[dispersion] is None else (n_genes, n_px_r[dispersion])
            self.px_r = torch.nn.Parameter(torch.randn(shape))
        self.batch_embedding = (
            BatchEmbedding(max(self.n_batch, 1), n_batch_rep, batch_representation_sampled)
            if batch_embedded
            else None
        )
        self.flow_prior = FlowPrior(self.n_latent, flow_hidden_features) if use_flow else None

    def load_scvi_tools_state_dict(self, state_dict: dict) -> list[str]:
        """Load the weights of an scvi-tools ``VAE`` with the same architecture.

        Entries this module does not build (see the module docstring) are skipped; every
        parameter and buffer of this module must be present with the same shape.

        Returns
        -------
        The names of the skipped entries.
        """
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        if missing:
            raise ValueError(
                f"The scvi-tools weights lack {missing[:5]}; build this module with the same "
                "architecture (n_hidden, n_layers, covariates, dispersion, likelihood)."
            )
        bad = [k for k in own if own[k].shape != state_dict[k].shape]
        if bad:
            raise ValueError(
                f"Shapes differ for {bad[:5]} (e.g. {tuple(own[bad[0]].shape)} here, "
                f"{tuple(state_dict[bad[0]].shape)} in the scvi-tools weights); build this "
                "module with the same architecture."
            )
        self.load_state_dict({k: state_dict[k] for k in own}, strict=True)
        return [k for k in state_dict if k not in own]

    # ------------------------------------------------------------------ seed helpers
    def batch_representation_from_batch_index(
        self, batch_index_n: torch.Tensor, use_mean_though_sampling: bool = False
    ) -> torch.Tensor:
        """The decoder's batch input: one-hot ``(n, n_batch)``, or the learned embedding."""
        if self.batch_embedding is None:
            idx_n = batch_index_n.reshape(-1).long()
            return torch.nn.functional.one_hot(idx_n, max(self.n_batch, 1)).float()
        return self.batch_embedding(batch_index_n, use_mean=use_mean_though_sampling or None)

    def categorical_onehot_from_categorical_index(
        self, categorical_covariate_index_nd: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Concatenated one-hot codes ``(n, sum(n_cats_per_cov))`` of the covariate codes."""
        if categorical_covariate_index_nd is None or not self.n_cats_per_cov:
            return None
        codes_nd = categorical_covariate_index_nd.long()
        parts = [
            torch.nn.functional.one_hot(codes_nd[:, i], n_cat).float()
            for i, n_cat in enumerate(self.n_cats_per_cov)
        ]
        return torch.cat(parts, dim=-1)

    # ------------------------------------------------------------------ schedule
    def kl_schedule(self) -> dict:
        """Training-plan arguments of the KL annealing (scvi-tools' ``TrainingPlan`` names).

        The plan's KL weight rises linearly from ``kl_annealing_start`` to 1 over
        ``kl_warmup_steps`` steps if given, else over ``kl_warmup_epochs`` epochs; :meth:`loss`
        multiplies it by ``z_kl_weight_max`` / ``batch_kl_weight_max``.
        """
        steps = self.kl_warmup_steps
        return {
            "n_epochs_kl_warmup": None if steps is not None else self.kl_warmup_epochs,
            "n_steps_kl_warmup": steps,
            "min_kl_weight": self.kl_annealing_start,
            "max_kl_weight": 1.0,
        }

    # ------------------------------------------------------------------ inputs
    def _get_inference_input(self, tensors: dict, **kwargs) -> dict:
        cat = tensors.get(K.CAT_COVS_KEY)
        return {
            "x_ng": tensors[K.X_KEY],
            "batch_index_n1": tensors[K.BATCH_KEY].long(),
            "cont_covs_nc": tensors.get(K.CONT_COVS_KEY),
            "cat_covs_nd": None if cat is None else cat.long(),
        }

    def _get_generative_input(self, tensors: dict, inference_outputs: dict, **kwargs) -> dict:
        cat = tensors.get(K.CAT_COVS_KEY)
        return {
            "z_nk": inference_outputs["z_nk"],
            "library_n1": inference_outputs["library_n1"],
            "batch_index_n1": tensors[K.BATCH_KEY].long(),
            "labels_n1": tensors[K.LABELS_KEY].long() if K.LABELS_KEY in tensors else None,
            "cont_covs_nc": tensors.get(K.CONT_COVS_KEY),
            "cat_covs_nd": None if cat is None else cat.long(),
            "size_factor_n1": tensors.get(K.SIZE_FACTOR_KEY),
        }

    def _categoricals(self, batch_index_n1, cat_covs_nd) -> list:
        cats = [] if self.batch_embedded else [batch_index_n1]
        if cat_covs_nd is not None:
            cats += list(torch.split(cat_covs_nd, 1, dim=1))
        return cats

    # ------------------------------------------------------------------ inference
    def inference(
        self,
        x_ng: torch.Tensor,
        batch_index_n1: torch.Tensor,
        cont_covs_nc: torch.Tensor | None = None,
        cat_covs_nd: torch.Tensor | None = None,
        n_samples: int = 1,
        use_latent_mean: bool = False,
    ) -> dict:
        """Encode ``x_ng`` into ``q(z|x)`` and draw ``z``.

        Returns ``qz`` (Normal over the untransformed latent), ``u_nk`` (its sample, or its mean
        with ``use_latent_mean``), ``z_nk`` (``u`` for a normal latent, ``softmax(u)`` for
        ``"ln"``) and ``library_n1`` (log observed library size). With ``n_samples > 1`` the
        samples get a leading ``s`` dimension.
        """
        library_n1 = torch.log(x_ng.sum(dim=-1, keepdim=True))
        x_in = x_ng
        if self.training and self.input_gene_dropout_rate > 0:
            x_in = gene_dropout(x_ng, self.input_gene_dropout_rate)
        if self.log_variational:
            x_in = torch.log1p(x_in)
        cats: list = []
        if self.encode_covariates:
            parts = [x_in]
            if cont_covs_nc is not None:
                parts.append(cont_covs_nc)
            if self.batch_embedding is not None:
                parts.append(self.batch_embedding(batch_index_n1))
            x_in = torch.cat(parts, dim=-1)
            cats = self._categoricals(batch_index_n1, cat_covs_nd)
        enc = self.z_encoder
        h_nh = enc.encoder(x_in, *cats)
        qz_mean_nk = enc.mean_encoder(h_nh)
        qz_var_nk = enc.var_activation(enc.var_encoder(h_nh)) + enc.var_eps
        qz = Normal(qz_mean_nk, qz_var_nk.sqrt())
        shape = torch.Size([]) if n_samples == 1 else torch.Size([n_samples])
        if use_latent_mean:
            u_nk = qz_mean_nk.expand(shape + qz_mean_nk.shape)
        else:
            u_nk = qz.rsample(shape)
        if n_samples > 1:
            library_n1 = library_n1.expand((n_samples,) + library_n1.shape)
        return {
            "qz": qz,
            "u_nk": u_nk,
            "z_nk": enc.z_transformation(u_nk),
            "library_n1": library_n1,
        }

    # ------------------------------------------------------------------ generative
    def generative(
        self,
        z_nk: torch.Tensor,
        library_n1: torch.Tensor,
        batch_index_n1: torch.Tensor,
        labels_n1: torch.Tensor | None = None,
        cont_covs_nc: torch.Tensor | None = None,
        cat_covs_nd: torch.Tensor | None = None,
        size_factor_n1: torch.Tensor | None = None,
        transform_batch: int | None = None,
        transform_categorical_covariates: Sequence[int] | None = None,
    ) -> dict[str, Distribution]:
        """``p(x | z, batch, covariates)`` as a ``scvi.distributions`` object under ``"px"``.

        ``transform_batch`` decodes every cell as if from that batch (code), and
        ``transform_categorical_covariates`` (one code per covariate) fixes the extra
        categorical covariates likewise. ``library_n1`` is the log library size the expected
        counts are scaled to (``size_factor_n1`` replaces it with ``use_size_factor_key``).
        """
        if transform_batch is not None:
            batch_index_n1 = torch.full_like(batch_index_n1, int(transform_batch))
        if transform_categorical_covariates is not None:
            codes = torch.as_tensor(
                list(transform_categorical_covariates), dtype=torch.long, device=z_nk.device
            )
            if codes.numel() != len(self.n_cats_per_cov):
                raise ValueError(
                    f"transform_categorical_covariates has {codes.numel()} code(s) but the model "
                    f"has {len(self.n_cats_per_cov)} categorical covariate(s)."
                )
            cat_covs_nd = codes.expand(batch_index_n1.shape[0], -1)
        parts = [z_nk]
        if cont_covs_nc is not None:
            parts.append(cont_covs_nc)
        if self.batch_embedding is not None:
            parts.append(self.batch_embedding(batch_index_n1))
        parts = [
            p if p.dim() == z_nk.dim() else p.expand(z_nk.shape[:-1] + p.shape[-1:]) for p in parts
        ]
        decoder_in = torch.cat(parts, dim=-1) if len(parts) > 1 else z_nk
        log_scale_n1 = library_n1
        if self.use_size_factor_key:
            if size_factor_n1 is None:
                raise ValueError("use_size_factor_key=True but the batch has no size factors.")
            log_scale_n1 = torch.log(size_factor_n1)
        # DecoderSCVI's layers, evaluating only the heads this likelihood uses (its forward
        # always computes the zero-inflation and per-cell dispersion heads)
        dec = self.decoder
        h_nh = dec.px_decoder(decoder_in, *self._categoricals(batch_index_n1, cat_covs_nd))
        px_scale = dec.px_scale_decoder(h_nh)
        px_rate = torch.exp(log_scale_n1) * px_scale
        if self.gene_likelihood == "poisson":
            out = {"px": Poisson(rate=px_rate, scale=px_scale, validate_args=False)}
            return out
        if self.dispersion == "gene-cell":
            px_r = dec.px_r_decoder(h_nh)
        elif self.dispersion == "gene":
            px_r = self.px_r
        elif self.dispersion == "gene-batch":
            px_r = self.px_r.T[batch_index_n1.reshape(-1)]
        else:
            if labels_n1 is None:
                raise ValueError("dispersion='gene-label' needs the labels of the cells.")
            px_r = self.px_r.T[labels_n1.reshape(-1)]
        theta = torch.exp(px_r)
        out = {"theta": theta}
        if self.gene_likelihood == "zinb":
            out["zi_logits"] = dec.px_dropout_decoder(h_nh)
            px = ZeroInflatedNegativeBinomial(
                mu=px_rate, theta=theta, zi_logits=out["zi_logits"], scale=px_scale
            )
        else:
            px = NegativeBinomial(mu=px_rate, theta=theta, scale=px_scale)
        out["px"] = px
        return out

    # ------------------------------------------------------------------ loss
    def log_likelihood_n(self, x_ng: torch.Tensor, generative_outputs: dict) -> torch.Tensor:
        """``log p(x|z)`` summed over genes, per cell.

        Equal to ``generative_outputs["px"].log_prob(x_ng).sum(-1)``; for one sample of ``z``
        it uses :mod:`cellsight.nn.likelihoods`, which skips the zero counts' gamma terms.
        """
        px = generative_outputs["px"]
        if px.mean.dim() != 2:
            return px.log_prob(x_ng).sum(-1)
        if self.gene_likelihood == "poisson":
            return poisson_log_likelihood_n(x_ng, px.rate)
        theta = generative_outputs["theta"]
        if self.gene_likelihood == "nb":
            return nb_log_likelihood_n(x_ng, px.mu, theta)
        return zinb_log_likelihood_n(x_ng, px.mu, theta, generative_outputs["zi_logits"])

    def kl_z(self, inference_outputs: dict) -> torch.Tensor:
        """KL divergence of ``q(z|x)`` from the prior, per cell (MC estimate under a flow)."""
        qz = inference_outputs["qz"]
        if self.flow_prior is None:
            prior = Normal(torch.zeros_like(qz.loc), torch.ones_like(qz.scale))
            return kl_divergence(qz, prior).sum(-1)
        u = inference_outputs["u_nk"]
        return qz.log_prob(u).sum(-1) - self.flow_prior.log_prob(u)

    def loss(
        self,
        tensors: dict,
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float | torch.Tensor = 1.0,
    ) -> LossOutput:
        """Negative ELBO: ``mean(rec + kl_weight * (z_max * kl_z + batch_max * kl_batch))``.

        ``reconstruction_loss`` is ``-log p(x|z)`` summed over genes and ``kl_local`` holds the
        unweighted per-cell KL terms, so ``rec + sum(kl_local)`` is each cell's negative ELBO.
        """
        x_ng = tensors[K.X_KEY]
        rec_n = -self.log_likelihood_n(x_ng, generative_outputs)
        kl_z_n = self.kl_z(inference_outputs)
        kl_local = {"kl_divergence_z": kl_z_n}
        weighted_n = self.z_kl_weight_max * kl_z_n
        if self.batch_representation_sampled and self.batch_kl_weight_max > 0:
            kl_b_n = self.batch_embedding.kl_n(tensors[K.BATCH_KEY])
            kl_local["kl_divergence_batch"] = kl_b_n
            weighted_n = weighted_n + self.batch_kl_weight_max * kl_b_n
        loss = torch.mean(rec_n + kl_weight * weighted_n)
        return LossOutput(loss=loss, reconstruction_loss=rec_n, kl_local=kl_local)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, tensors: dict, n_samples: int = 1) -> torch.Tensor:
        """Counts drawn from the posterior predictive, ``(n, g)`` or ``(s, n, g)``."""
        _, gen = self.forward(
            tensors, inference_kwargs={"n_samples": n_samples}, compute_loss=False
        )
        return gen["px"].sample()

    @torch.no_grad()
    def reconstruct(
        self,
        x_ng: torch.Tensor,
        var_names_g: Sequence[str] | None = None,
        gene_inds: Sequence[int] | None = None,
        batch_index_n: torch.Tensor | None = None,
        continuous_covariates_nc: torch.Tensor | None = None,
        categorical_covariate_index_nd: torch.Tensor | None = None,
        label_index_n: torch.Tensor | None = None,
        transform_batch: int | str | None = None,
        transform_categorical_covariates: Sequence[int] | None = None,
        use_latent_mean: bool = False,
        n_latent_samples: int = 1000,
        use_importance_sampling: bool = False,
        reconstructed_library_size: float = 10000,
        samples_per_pass: int = 32,
    ) -> torch.Tensor:
        """Expected counts at a common library size, optionally in another batch.

        Encodes the cells once (their own batch and covariates), draws ``n_latent_samples``
        latents (or takes the posterior mean), decodes each in every batch of
        ``transform_batch`` (``None``: the cell's own; an int: that batch; ``"mean"``: every
        batch, averaged) with library ``reconstructed_library_size`` and averages the expected
        counts (the mean of ``p(x|z)``) over batches and samples. With
        ``use_importance_sampling`` the samples are weighted by ``p(x, z) / q(z|x)`` (computed
        in the cell's own batch and observed library), as in scvi-tools' importance weights.

        ``label_index_n`` (label codes) is needed only with ``dispersion="gene-label"``.

        Returns
        -------
        ``(n, len(gene_inds))`` tensor (all genes when ``gene_inds`` is ``None``).
        """
        if var_names_g is not None and not np.array_equal(
            np.asarray(var_names_g).astype(str), self.var_names_g
        ):
            raise ValueError("var_names_g differs from the genes this module was built with.")
        n = x_ng.shape[0]
        if batch_index_n is None:
            batch_index_n = torch.zeros(n, dtype=torch.long, device=x_ng.device)
        batch_n1 = batch_index_n.reshape(n, 1).long()
        cat_nd = None
        if categorical_covariate_index_nd is not None:
            cat_nd = categorical_covariate_index_nd.long()
        labels_n1 = None if label_index_n is None else label_index_n.reshape(n, 1).long()
        if transform_batch is None:
            batches: list = [None]
        elif transform_batch == "mean":
            batches = list(range(max(self.n_batch, 1)))
        elif isinstance(transform_batch, int | np.integer) and 0 <= transform_batch < max(
            self.n_batch, 1
        ):
            batches = [int(transform_batch)]
        else:
            raise ValueError(
                f"transform_batch={transform_batch!r} must be None, 'mean' or a batch code in "
                f"[0, {max(self.n_batch, 1) - 1}]."
            )
        return reconstruct_counts(
            self,
            x_ng,
            batch_n1,
            continuous_covariates_nc,
            cat_nd,
            labels_n1,
            gene_inds=gene_inds,
            batches=batches,
            transform_categorical_covariates=transform_categorical_covariates,
            n_latent_samples=1 if use_latent_mean else int(n_latent_samples),
            use_latent_mean=use_latent_mean,
            use_importance_sampling=use_importance_sampling and not use_latent_mean,
            library_size=float(reconstructed_library_size),
            samples_per_pass=samples_per_pass,
        )
