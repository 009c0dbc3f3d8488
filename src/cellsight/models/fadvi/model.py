"""The user-facing FADVI model: ``fadvi.FADVI``'s API on cellsight's core."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch.distributions import Normal

from cellsight.data import registry as R
from cellsight.data import validate as V
from cellsight.data.shards import is_sharded
from cellsight.interpret.mixin import InterpretMixin
from cellsight.models.base import BaseModel
from cellsight.models.expression import ExpressionMixin
from cellsight.models.fadvi.labels import check_unlabeled_spelling
from cellsight.models.fadvi.module import FactorDisentanglementVAE
from cellsight.models.fadvi.plan import FADVITrainingPlan
from cellsight.models.fadvi.prediction import PredictionMixin
from cellsight.models.fadvi.targets import FADVI_TARGETS
from cellsight.train import EpochWeightAveraging

__all__ = ["FADVI"]

_REPRESENTATIONS = {
    "full": ("b", "l", "r"), "b": ("b",), "batch": ("b",), "l": ("l",), "label": ("l",),
    "r": ("r",), "residual": ("r",), "lr": ("l", "r"), "label_residual": ("l", "r"),
}
_MODEL_KWARGS = ("encode_covariates", "use_batch_norm", "use_layer_norm", "log_variational",
                 "n_hidden_head", "kl_warmup_epochs", "kl_warmup_fraction",
                 "adversary_lr_factor", "adversarial_training")


class FADVI(PredictionMixin, ExpressionMixin, InterpretMixin, BaseModel):
    """Factor disentanglement variational inference: batch, label and residual latents.

    Three encoders give ``z_b`` (batch), ``z_l`` (label / biology) and ``z_r`` (the rest); scVI's
    decoder reconstructs the counts from ``[z_b, z_l, z_r]`` and the batch. Supervised heads
    read the batch from ``z_b`` and the label from ``z_l``; four adversaries behind gradient
    reversal try to read the label from ``z_b``, the batch from ``z_l`` and ``z_r``, and the
    label from ``z_r``; a penalty decorrelates the three latents. Cells whose label is
    ``unlabeled_category`` are used for everything except the label terms.

    Differences from the ``fadvi`` package, each deliberate:

    * **No dead parameters.** scVI's single encoder (which ``fadvi`` builds and never uses) and
      every head whose weight is 0 or whose target has one class are not built; every
      constructor argument changes the model (``registry`` builds it without data,
      ``use_observed_lib_size=False`` adds a library encoder with a per-batch prior).
    * **All minibatches used.** One loader over all cells; labelled cells inside each minibatch
      carry the label terms (``fadvi`` also draws a second, labelled minibatch per step that
      its loss never reads).
    * **Scale-free decorrelation.** ``gamma`` weighs the squared *correlations* between the
      posterior means of the latents (sum over pairs of dimensions), which shrinking a latent
      cannot lower; ``fadvi`` penalises raw covariances of samples.
    * **KL warm-up suited to the epochs trained.** The KL weight rises over the first
      ``kl_warmup_fraction`` (default 1/2) of ``max_epochs`` (or ``kl_warmup_epochs`` if
      given); ``fadvi`` inherits scvi-tools' 400 epochs, so a 30-epoch run trains at a KL
      weight below 0.08 throughout.
    * **Weight averaging.** The trained weights are the mean of the epoch-end weights of the
      second half of training (``train(weight_averaging=0.5)``, stochastic weight averaging at
      a constant learning rate, :mod:`cellsight.models.fadvi.averaging`); ``fadvi`` keeps the
      last iterate. The label head fits the labelled cells perfectly within ~30 epochs and
      each later epoch's accuracy on unseen cells jumps by up to 0.06; over six seeds of the
      hidden-label protocol of ``benchmarks/fadvi_vs_fadvi.py`` (100 epochs) averaging gave
      ``predict`` accuracy on hidden cells 0.795 against 0.784 for the last iterate (``fadvi``
      0.768), and batch predictability from ``z_l`` / ``z_r`` 0.46 / 0.52 against 0.50 / 0.58
      (chance 0.50).
    * **Deterministic results.** ``predict`` and ``get_latent_representation`` use posterior
      means by default (``give_mean=False`` samples, seeded); ``fadvi``'s ``predict`` samples.
      The heads are trained on the posterior means too, the input ``predict`` gives them.
    * **LayerNorm, not BatchNorm, in the encoders and heads.** The adversaries see the latents
      under training-mode normalisation; BatchNorm then switches to running statistics for
      inference, and batch information the adversaries could not see reappears. On the bundled
      PBMC data with a planted batch effect (two model seeds, logistic regression, chance
      0.50) the batch is predicted from ``z_l`` with accuracy 0.59-0.60 with BatchNorm
      (``fadvi``'s choice) and 0.51-0.52 with LayerNorm, which has no running statistics;
      from ``z_r`` 0.53-0.55 either way.
    * **Less work per step, same losses.** In the default layout a training step is
      written out (:mod:`cellsight.models.fadvi.fast_step`): the loss and every parameter's
      gradient are computed without autograd, the encoders, the Gaussian heads with the
      posterior sample and KL, the decoder with the ZINB likelihood, and each group of
      classifier heads as one C pass forward and one backward (:mod:`cellsight.nn.native`;
      the matrix products by the sgemm torch uses, or on AMD CPUs with AVX-512, where MKL
      runs its AVX2 code, by cellsight's own kernel,
      :func:`~cellsight.nn.native.native_gemm_wanted`). For the same seed it gives autograd's loss
      and gradients to float32 rounding (tests, parameter by parameter, over eight layouts);
      other layouts, ``plan_kwargs={"fast_step": False}`` and machines without a C compiler
      train through autograd, where the three encoders run as one batched pass, the six heads
      as two (:class:`~cellsight.models.fadvi.heads.ParallelClassifiers`), dropout draws a
      cheaper mask (:func:`cellsight.nn.dropout.fast_dropout`) and the ZINB likelihood and the
      hidden layers' LayerNorm/ReLU/dropout are fused kernels. Either way the metrics are
      published once per epoch, Adam is one C call
      (:class:`~cellsight.train.native_adam.NativeAdam`) and the validation cells are scored
      after the last epoch (see :meth:`train`). A step on the bundled PBMC data (one thread,
      batch 128) fell from 21 ms (autograd, session 6) to 12-14 ms (session 8) and to 7.3-9 ms
      in session 9, when the C passes' matrix products moved to cellsight's own AVX-512 kernel
      on AMD CPUs (:func:`~cellsight.nn.native.native_gemm_wanted`: torch's MKL runs its AVX2
      code there, 88-94 GFLOPS on a Zen 5 core against 143-191 for the kernel on FADVI's
      shapes; the C time of a step 7.9 -> 4.6 ms). ``benchmarks/fadvi_vs_fadvi.py`` then
      measures 0.21-0.23 of ``fadvi``'s CPU time per epoch with gradient reversal (seeds 0-2)
      and 0.22-0.27 alternating (seeds 0-4; medians of three adjacent 30-epoch pairs each,
      single pairs 0.16-0.28; whole 100-epoch runs 0.22-0.31). What remains is about 3 ms of
      matrix products, 1 ms of ZINB transcendentals, 0.7-1 ms Adam and 2-3 ms of Python and
      small torch operations around the C passes (with Lightning's loop and the dropout draws,
      since session 8 from a counter-based generator in C: 11 against 59 µs per 49k units).
      Measured and not adopted:
      ``torch.compile`` (95-120 s to compile, then slower: 21.8-22.5 against 17.8 ms a
      step), a sparse first layer (at the data's 23% non-zeros the sparse product and its
      transposes cost as much as the dense product), one six-head pass instead of two groups,
      finite products for the ZINB kernel's gamma-function terms of counts up to 8 (1.17
      against 0.90 ms: the extra compaction pass costs more than the logarithms saved).
    * **Adversaries by alternating optimisation** (``adversarial_training="alternating"``,
      the default: each step updates the adversaries on the detached latents, then
      everything else against the updated, frozen adversaries; see
      :mod:`cellsight.models.fadvi.plan`), or by gradient reversal as ``fadvi`` does
      (``"reversal"``; Ganin & Lempitsky 2015; one backward pass, heads and encoders updated
      together), optionally on a faster time scale (``adversary_lr_factor``). Both train
      with ``devices > 1`` (alternating averages its two backward passes' gradients over the
      ranks itself) and with ``reduce_lr_on_plateau``. Measured on the benchmark
      (``benchmarks/fadvi_vs_fadvi.py --adversarial both``, 100 epochs, seeds 0-4, 142
      hidden-label cells): hidden-label kNN accuracy from ``z_l`` 0.792 (reversal) against
      0.811 (alternating) on average, ``predict`` 0.776 against 0.797, batch predictability
      from ``z_l`` 0.505 against 0.506 and from ``z_r`` 0.586 against 0.577 (chance 0.5),
      CPU seconds per epoch 0.094-0.109 against 0.102-0.125 (alternating 9-29% longer: a
      second backward and optimiser step per minibatch). With epoch weight averaging (seeds
      0/1/2, 100 epochs, idle machine) ``predict`` on hidden cells was .810 / .817 / .782
      (mean 0.803) alternating, .775 / .796 / .761 (0.777) with reversal and .775 / .754 /
      .754 (0.761) for ``fadvi``; kNN from ``z_l`` 0.817 against 0.784 (``fadvi`` 0.794,
      our scVI 0.775). Alternating is the default because it is above ``fadvi`` on every
      seed (by 0.028-0.063) and reversal is not; pass ``adversarial_training="reversal"``
      for the ~10% shorter epochs.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata` (raw counts); ``None`` with ``registry``.
    registry
        A trained model's registry (``model.registry_``): builds the model without data (to
        train from a ``datamodule`` or load weights into).
    n_hidden, n_layers, dropout_rate
        Width, depth and dropout of the encoders, decoder and classifier heads.
    n_latent_b, n_latent_l, n_latent_r
        Dimensions of the batch, label and residual latents.
    dispersion, gene_likelihood
        As in scVI (``"gene"``, ``"gene-batch"``, ``"gene-label"``, ``"gene-cell"``; ``"zinb"``,
        ``"nb"``, ``"poisson"``).
    use_observed_lib_size
        Scale by the observed library size (``False``: infer it, scVI's library encoder).
    beta
        Weight of the KL divergence.
    lambda_b, lambda_l
        Weights of the batch and label classification losses.
    alpha_bl, alpha_lb, alpha_rb, alpha_rl
        Adversary strengths (the gradient-reversal factor, or in alternating optimisation the
        weight of the adversaries' cross-entropy in the encoders' loss): label from ``z_b``,
        batch from ``z_l``, batch from ``z_r``, label from ``z_r``.
    gamma
        Weight of the cross-correlation penalty.
    seed
        Seeds the weights, the training split and shuffles and any sampling of the ``get_*``
        methods: the same seed gives the same results on CPU.
    model_kwargs
        ``encode_covariates`` (batch and covariates into the label and residual encoders,
        default ``False``), ``use_batch_norm`` (default ``"none"``; ``"both"`` is scVI's and
        ``fadvi``'s), ``use_layer_norm`` (``"encoder"``: encoders and heads),
        ``log_variational`` (``True``), ``n_hidden_head`` (width of the heads, default
        ``n_hidden``), ``adversarial_training`` (``"alternating"``, default, or
        ``"reversal"``; see above), ``adversary_lr_factor`` (``1.0``; learning-rate
        multiplier of the adversaries), ``kl_warmup_epochs`` (``None``), ``kl_warmup_fraction``
        (``0.5``; on the bundled PBMC data, with BatchNorm encoders, 0.5 gave hidden-label kNN
        0.803 / 0.796 against 0.789 / 0.789 for 0.25 on two seeds).

    Notes
    -----
    Attributions go through :mod:`cellsight.interpret` (targets ``"label_probability"``,
    ``"label_logit"``, ``"batch_probability"``, ``"batch_logit"`` besides ``"latent"``,
    ``"expression"``, ``"loss"``); ``predict(interpretability=...)``, ``get_ranked_features``,
    ``get_feature_attributions`` and ``get_feature_significance`` all use them.
    """

    _plan_cls = FADVITrainingPlan

    def __init__(
        self,
        adata: AnnData | None,
        registry: dict | None = None,
        n_hidden: int = 128,
        n_latent_b: int = 30,
        n_latent_l: int = 30,
        n_latent_r: int = 10,
        n_layers: int = 2,
        dropout_rate: float = 0.1,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
        use_observed_lib_size: bool = True,
        beta: float = 1.0,
        lambda_b: float = 50,
        lambda_l: float = 50,
        alpha_bl: float = 1.0,
        alpha_lb: float = 1.0,
        alpha_rb: float = 1.0,
        alpha_rl: float = 1.0,
        gamma: float = 1.0,
        seed: int = 0,
        **model_kwargs: Any,
    ) -> None:
        unknown = sorted(set(model_kwargs) - set(_MODEL_KWARGS))
        if unknown:
            raise ValueError(
                f"FADVI got unknown argument(s) {unknown}; the extra keyword arguments it takes "
                f"are {list(_MODEL_KWARGS)}."
            )
        frac = model_kwargs.get("kl_warmup_fraction", 0.5)
        if not 0.0 <= float(frac) <= 1.0:
            raise ValueError(f"kl_warmup_fraction={frac} must be in [0, 1].")
        mode = model_kwargs.setdefault("adversarial_training", "alternating")
        if mode not in ("reversal", "alternating"):
            raise ValueError(
                f"adversarial_training={mode!r} must be 'alternating' (alternating "
                "optimisation, the default) or 'reversal' (gradient reversal)."
            )
        params = dict(locals())
        for key in ("self", "adata", "registry", "seed", "__class__", "model_kwargs", "unknown",
                    "frac", "mode"):
            params.pop(key, None)
        params.update(model_kwargs)
        if adata is None and registry is not None:
            self._init_from_registry(registry, seed, params)
            return
        super().__init__(adata, seed=seed, **params)

    def _init_from_registry(self, registry: dict, seed: int, params: dict) -> None:
        BaseModel.__init__(self, None, seed=seed, **params)
        self.registry_ = registry
        self.setup_args_ = dict(registry["setup_args"])
        self.summary = R.summarize_registry(registry)
        self.adata_manager = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.module = self._build_module()

    # ------------------------------------------------------------------ set-up
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        unlabeled_category: str = "Unknown",
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
    ) -> None:
        """Register ``adata`` for FADVI (only ``adata.uns["_cellsight_setup"]`` is written).

        Parameters
        ----------
        adata
            Cells x genes with raw counts.
        layer
            Layer with the counts (``None``: ``adata.X``).
        batch_key
            ``obs`` column of batches (``None``: one batch, no batch heads).
        labels_key
            ``obs`` column of cell labels (``None``: no label heads; use ``"lr"`` latents).
        unlabeled_category
            Value of ``labels_key`` marking cells without a label; they skip the label losses.
            When it does not occur but a label differs from it only in case or surrounding
            spaces (``"unknown"`` for the default ``"Unknown"``) that is a ``ValueError``: the
            label head would learn the unlabelled cells as a class. Pass the exact spelling,
            or ``None`` to train on every label as a class. A label such as ``"unlabeled"`` or
            ``"NA"`` next to an absent ``unlabeled_category`` gets a warning.
        size_factor_key
            ``obs`` column of size factors used instead of the library size.
        categorical_covariate_keys, continuous_covariate_keys
            Nuisance covariates (into the decoder; also the label/residual encoders with
            ``encode_covariates=True``).
        """
        if labels_key is not None and unlabeled_category is not None:
            col = adata.obs[labels_key] if labels_key in adata.obs else None
            if col is not None and pd.api.types.is_numeric_dtype(col):
                raise ValueError(
                    f"adata.obs[{labels_key!r}] is numeric; labels must be categories (strings), "
                    f"e.g. adata.obs[{labels_key!r}] = adata.obs[{labels_key!r}].astype(str)."
                )
            if col is not None:
                check_unlabeled_spelling(col, labels_key, unlabeled_category)
        super().setup_anndata(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            unlabeled_category=unlabeled_category if labels_key is not None else None,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            size_factor_key=size_factor_key,
        )

    # ------------------------------------------------------------------ core hooks
    @property
    def class_names(self) -> list[str]:
        """Label classes the label head predicts (registry order, no unlabelled category)."""
        s = self.summary
        if self.setup_args_.get("labels_key") is None:
            return []
        cats = [str(c) for c in s.label_categories]
        if s.unlabeled_category is not None:
            cats = [c for c in cats if c != str(s.unlabeled_category)]
        return cats

    @property
    def batch_names(self) -> list[str]:
        """Batches, in code order."""
        return [str(c) for c in self.summary.batch_categories]

    def _build_module(self) -> FactorDisentanglementVAE:
        s, p = self.summary, dict(self.init_params_)
        for key in ("kl_warmup_epochs", "kl_warmup_fraction", "adversary_lr_factor",
                    "adversarial_training"):
            p.pop(key, None)
        n_classes = len(self.class_names)
        if self.setup_args_.get("labels_key") is not None and p["lambda_l"] > 0:
            if n_classes < 2:
                raise ValueError(
                    f"labels_key={self.setup_args_['labels_key']!r} has {n_classes} label "
                    "class(es) besides the unlabelled category; the label head needs at least 2. "
                    "Pass labels_key=None (unsupervised) or lambda_l=0."
                )
        means = variances = None
        if not p["use_observed_lib_size"]:
            means, variances = self._library_prior()
        return FactorDisentanglementVAE(
            var_names_g=list(s.var_names),
            n_batch=s.n_batch,
            n_labels=s.n_labels,
            n_classes=n_classes,
            n_continuous_cov=s.n_continuous_cov,
            n_cats_per_cov=s.n_cats_per_cov,
            library_log_means_b=means,
            library_log_vars_b=variances,
            use_size_factor_key=s.has_size_factor,
            **p,
        )

    def _library_prior(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-batch mean and variance of the log library size (zeros without data: load fills
        them from the saved weights)."""
        n_batch = self.summary.n_batch
        if self.adata is None or is_sharded(self.adata):
            if self.adata is not None:
                raise ValueError(
                    "use_observed_lib_size=False needs the library sizes in memory; sharded data "
                    "is not supported with it."
                )
            return np.zeros(n_batch), np.ones(n_batch)
        x = V.get_matrix(self.adata, self.setup_args_["layer"])
        log_lib_n = np.log(np.asarray(x.sum(axis=1)).reshape(-1))
        key = self.setup_args_.get("batch_key")
        codes = (
            np.zeros(self.adata.n_obs, dtype=int) if key is None
            else pd.Categorical(self.adata.obs[key], categories=self.summary.batch_categories).codes
        )
        means = np.array([log_lib_n[codes == b].mean() for b in range(n_batch)])
        variances = np.array([log_lib_n[codes == b].var() for b in range(n_batch)])
        return means, np.maximum(variances, 1e-4)

    _needs_library_size = True
    _size_factor_hint = "register size factors with size_factor_key="

    def _uses_size_factors(self) -> bool:
        return self.setup_args_.get("size_factor_key") is not None

    def _attribution_targets(self) -> dict:
        return {**super()._attribution_targets(), **FADVI_TARGETS}

    def _attribution_output_names(self, target: str, n_outputs: int) -> list[str]:
        if target.startswith("label_") and n_outputs == len(self.class_names):
            return self.class_names
        if target.startswith("batch_") and n_outputs == len(self.batch_names):
            return self.batch_names
        return super()._attribution_output_names(target, n_outputs)

    # ------------------------------------------------------------------ training
    def kl_warmup_epochs_for(self, max_epochs: int) -> int:
        """Epochs of the KL warm-up for a run of ``max_epochs`` (see the class notes)."""
        given = self.init_params_.get("kl_warmup_epochs")
        if given is not None:
            return int(given)
        frac = float(self.init_params_.get("kl_warmup_fraction", 0.5))
        return max(1, math.ceil(frac * max_epochs)) if frac > 0 else 0

    def train(
        self,
        max_epochs: int | None = None,
        weight_averaging: float | None = 0.5,
        **kwargs: Any,
    ) -> pd.DataFrame:
        """Train (other arguments as :meth:`cellsight.models.base.BaseModel.train`).

        ``weight_averaging``: after training, the model's weights are the mean of its
        epoch-end weights over the epochs after the first ``weight_averaging`` fraction of
        ``max_epochs`` (default: the second half; ``None``: the last epoch's weights), see
        :class:`~cellsight.models.fadvi.averaging.EpochWeightAveraging` and the class notes.

        The KL warm-up covers the first ``kl_warmup_fraction`` of ``max_epochs`` unless
        ``kl_warmup_epochs`` was given (or ``plan_kwargs={"n_epochs_kl_warmup": ...}``).

        The validation cells are scored after the last epoch only (``elbo_validation`` and
        the other ``*_validation`` columns of the history are filled in its last row), unless
        ``early_stopping=True`` (every epoch, as it needs) or ``check_val_every_n_epoch`` is
        passed. Scoring them every epoch cost about a tenth of a training epoch on the bundled
        PBMC data and changes no weight; scvi-tools (and ``fadvi``) never validate by default.

        With ``plan_kwargs={"reduce_lr_on_plateau": True}`` and a validation metric as
        ``lr_scheduler_metric`` (scvi-tools' default ``"elbo_validation"``) the validation
        cells are scored every epoch, as the scheduler needs.

        The adversaries are trained as the constructor's ``adversarial_training`` says
        (``plan_kwargs={"adversarial_training": "reversal"}`` overrides it for one run).
        """
        if max_epochs is None:
            max_epochs = self._default_max_epochs()
        if int(max_epochs) < 1:
            raise ValueError(f"max_epochs={max_epochs} must be >= 1.")
        batch_size = kwargs.get("batch_size", 128)
        if int(batch_size) < 2:
            raise ValueError(f"batch_size={batch_size} must be >= 2 (BatchNorm, correlations).")
        plan_kwargs = kwargs.get("plan_kwargs") or {}
        plateau_on_validation = plan_kwargs.get("reduce_lr_on_plateau", False) and (
            "validation" in plan_kwargs.get("lr_scheduler_metric", "elbo_validation"))
        self._warmup_epochs = self.kl_warmup_epochs_for(int(max_epochs))
        if weight_averaging is not None:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []),
                                   EpochWeightAveraging(weight_averaging)]
        if not (kwargs.get("early_stopping", False) or plateau_on_validation):
            kwargs.setdefault("check_val_every_n_epoch", int(max_epochs))
        return super().train(max_epochs=int(max_epochs), **kwargs)

    def _plan_kwargs(self) -> dict[str, Any]:
        warmup = getattr(self, "_warmup_epochs", None)
        return {
            **self.module.kl_schedule(n_epochs_kl_warmup=warmup or None),
            "adversary_lr_factor": float(self.init_params_.get("adversary_lr_factor", 1.0)),
            # models saved before alternating became the default have no entry: reversal
            "adversarial_training": self.init_params_.get("adversarial_training", "reversal"),
        }

    # ------------------------------------------------------------------ helpers
    def _inference(self, tensors: dict, give_mean: bool = True, n_samples: int = 1) -> dict:
        return self.module.inference(
            **self.module._get_inference_input(tensors), n_samples=n_samples,
            use_latent_mean=give_mean,
        )

    # ------------------------------------------------------------------ latents
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
        representation: Literal[
            "full", "b", "batch", "l", "label", "r", "residual", "lr", "label_residual"
        ] = "label",
    ) -> np.ndarray | dict:
        """Latent representation of each cell.

        Parameters
        ----------
        adata, indices, batch_size
            Cells to embed (default: all cells of the model's AnnData), minibatch size.
        give_mean
            Posterior mean (default, deterministic); ``False``: one posterior sample (seeded).
        mc_samples
            Accepted for compatibility: the latents are Gaussian, their mean is exact.
        return_dist
            Return ``{"mean", "variance", "dist"}``: posterior means and variances as arrays,
            and the ``torch.distributions.Normal`` of all cells.
        representation
            ``"full"`` ``[z_b, z_l, z_r]``, ``"b"``/``"batch"``, ``"l"``/``"label"``,
            ``"r"``/``"residual"``, ``"lr"``/``"label_residual"`` ``[z_l, z_r]``.

        Returns
        -------
        ``(cells, dims)`` array (or the dict with ``return_dist``).
        """
        if representation not in _REPRESENTATIONS:
            raise ValueError(
                f"representation={representation!r} is not one of {list(_REPRESENTATIONS)}."
            )
        parts = _REPRESENTATIONS[representation]
        zs, locs, variances = [], [], []
        with self._seeded():
            for tensors in self._loader(adata, indices, batch_size):
                out = self._inference(tensors, give_mean=give_mean)
                zs.append(torch.cat([out[f"z_{p}"] for p in parts], -1))
                locs.append(torch.cat([out[f"qz_{p}"].loc for p in parts], -1))
                variances.append(torch.cat([out[f"qz_{p}"].scale.square() for p in parts], -1))
        if return_dist:
            loc, var = torch.cat(locs), torch.cat(variances)
            return {"mean": loc.numpy(), "variance": var.numpy(), "dist": Normal(loc, var.sqrt())}
        return torch.cat(zs).numpy()

    # ------------------------------------------------------------------ expression
    def _batch_codes(self, transform_batch: str | int | None) -> list[int | None]:
        """``[code]`` of one batch name or code, ``[None]`` for each cell's own batch (the
        :class:`~cellsight.models.expression.ExpressionMixin` hook; no lists, no ``"mean"``)."""
        if transform_batch is None:
            return [None]
        names = self.batch_names
        if isinstance(transform_batch, int | np.integer) and not isinstance(transform_batch, bool):
            if 0 <= int(transform_batch) < len(names):
                return [int(transform_batch)]
        elif str(transform_batch) in names:
            return [names.index(str(transform_batch))]
        raise ValueError(
            f"transform_batch={transform_batch!r} is not a batch of this model; pass a batch name "
            f"({names[:10]}) or a code in [0, {len(names) - 1}]."
        )

    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: str | int | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
    ) -> pd.DataFrame | np.ndarray:
        """Decoded expression frequencies ``rho`` scaled to ``library_size`` (scvi-tools' API).

        Parameters
        ----------
        adata, indices, batch_size
            Cells, as in :meth:`get_latent_representation`.
        transform_batch
            ``None``: each cell's batch; a batch name or code: decode every cell in that batch.
        gene_list
            Only these genes.
        library_size
            Common library size; ``"latent"``: each cell's own (the expected counts).
        n_samples
            Posterior samples of the latents (decoded, then averaged with ``return_mean``).
            With ``n_samples=1`` the latents are sampled once, as in scvi-tools (seeded).
        n_samples_overall
            Return this many rows drawn (seeded) from the decoded samples of all cells.
        return_mean
            Average over samples; ``False`` with ``n_samples > 1`` gives ``(samples, cells,
            genes)``.
        return_numpy
            Array instead of a DataFrame (default: an array when the result is 3-D or drawn
            with ``n_samples_overall``).
        """
        return self._normalized_expression(
            adata, indices, transform_batch, gene_list, library_size, n_samples, return_mean,
            return_numpy, batch_size, n_samples_overall=n_samples_overall,
        )
