"""What CauTrigger1L and CauTrigger2L share: registration, construction, training, outputs."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS as K
from scvi.data import fields as scvi_fields

from cellsight.data import registry as R
from cellsight.data import validate as V
from cellsight.data.shards import is_sharded
from cellsight.interpret.mixin import InterpretMixin
from cellsight.models.base import BaseModel
from cellsight.models.cautrigger.attention import de_prior, fit_attention_prior
from cellsight.models.cautrigger.module import DOWN_KEY, LOSS_TERMS, CauTriggerModule
from cellsight.models.cautrigger.plan import CauTriggerTrainingPlan
from cellsight.models.cautrigger.priors import cascade_prior, pcr_prior
from cellsight.models.cautrigger.targets import CAUTRIGGER_TARGETS, DOWNSTREAM_TARGETS
from cellsight.models.cautrigger.weights import resolve_scheme
from cellsight.train import check_fit_args, check_lr

__all__ = ["CauTriggerBase", "PRIORS"]

PRIORS = ("de", "de_rank", "cascade", "pcr")  # named gate priors of train(prior=...), or "auto"


def _accelerator(use_gpu: Any) -> tuple[str, Any]:
    if use_gpu in (None, False):
        return "cpu", 1
    if use_gpu is True:
        return "gpu", 1
    if isinstance(use_gpu, int):
        return "gpu", [use_gpu]
    if isinstance(use_gpu, str) and ":" in use_gpu:
        return "gpu", [int(use_gpu.split(":")[1])]
    return "gpu", 1


class CauTriggerBase(InterpretMixin, BaseModel):
    """Shared implementation; use :class:`~cellsight.models.CauTrigger1L` or
    :class:`~cellsight.models.CauTrigger2L`.

    Besides CauTrigger's own scores, the shared engine's ``get_feature_attributions``,
    ``rank_features`` and ``get_feature_significance`` explain the targets
    ``"state_probability"``, ``"state_logit"``, ``"latent"`` (and ``"downstream"`` for 2L)
    of the raw upstream counts with every engine method
    (:mod:`cellsight.models.cautrigger.targets`)."""

    _plan_cls = CauTriggerTrainingPlan
    _requires_counts = False
    _two_layer = False
    _default_prior = "pcr"  # what train(prior="auto") uses (CauTrigger2L: "cascade")

    # ------------------------------------------------------------------ set-up
    @classmethod
    def setup_anndata(  # type: ignore[override]
        cls,
        adata: AnnData,
        labels_key: str = "labels",
        layer: str | None = None,
        down_key: str = DOWN_KEY,
    ) -> None:
        """Register ``adata``: upstream features in ``X`` (or ``layer``), the state in
        ``obs[labels_key]`` and, for the two-layer model, downstream features in
        ``obsm[down_key]``.

        Values must be finite and, with the default ``log1p=True`` of the model,
        non-negative (counts or normalised expression).
        """
        if labels_key is None or labels_key not in adata.obs:
            raise ValueError(
                f"adata.obs has no column {labels_key!r} with the cell states; CauTrigger needs "
                "the state of every cell: pass labels_key= an obs column."
            )
        extra: dict[str, Any] = {}
        if cls._two_layer:
            _check_down(adata, down_key)
            extra["down_key"] = down_key
        R.setup_anndata(adata, cls.__name__, layer=layer, labels_key=labels_key, **extra)

    def _extra_fields(self) -> list:
        if not self._two_layer:
            return []
        return [scvi_fields.ObsmField(DOWN_KEY, self.setup_args_["down_key"])]

    def _check_counts_with(self, adata: AnnData, args: dict) -> None:
        """Query checks: the base class's, plus (2L) the downstream matrix: present, finite,
        as many columns as the model's downstream features and, where the query names its
        columns (DataFrame columns or ``uns[down_key + "_feature"]``), the same names in the
        same order."""
        super()._check_counts_with(adata, args)
        if not self._two_layer:
            return
        key = args.get("down_key", DOWN_KEY)
        _check_down(adata, key)
        model_names = self.down_feature_names
        d = adata.obsm[key]
        if d.shape[1] != len(model_names):
            raise ValueError(
                f"adata.obsm[{key!r}] has {d.shape[1]} columns but the model was set up with "
                f"{len(model_names)} downstream features; pass the same downstream features, in "
                f"the same order ({model_names[:3]} ...)."
            )
        names = _stored_down_names(adata, key)
        if names is not None and names != model_names:
            diff = V.describe_gene_difference(model_names, names)
            raise ValueError(
                f"The downstream features of adata.obsm[{key!r}] differ from the model's: {diff}. "
                "Reorder or subset the columns to the model's down_feature_names."
            )

    def __init__(
        self,
        adata: AnnData | None,
        n_latent: int = 10,
        n_causal: int = 2,
        n_state: int = 2,
        seed: int = 0,
        **model_kwargs: Any,
    ) -> None:
        params = {"n_latent": n_latent, "n_causal": n_causal, "n_state": n_state, **model_kwargs}
        if adata is not None and self._two_layer:
            names = model_kwargs.get("down_feature_names")
            setup = R.read_setup_args(adata, type(self).__name__)
            key = setup.get("down_key", DOWN_KEY)
            _check_down(adata, key)
            n_down = np.asarray(adata.obsm[key]).shape[1] if not hasattr(
                adata.obsm[key], "columns") else adata.obsm[key].shape[1]
            params["down_feature_names"] = _down_names(adata, key, names, n_down)
        super().__init__(adata, seed=seed, **params)
        if adata is None:
            return
        s = self.summary
        if s.n_labels != n_state:
            raise ValueError(
                f"n_state={n_state} but obs[{self.setup_args_['labels_key']!r}] has {s.n_labels} "
                f"states ({list(s.label_categories)[:10]}); pass n_state={s.n_labels}."
            )
        self._set_input_statistics()

    # ------------------------------------------------------------------ construction
    def _build_module(self) -> CauTriggerModule:
        p = dict(self.init_params_)
        n_down = len(p.pop("down_feature_names", None) or []) if self._two_layer else 0
        allowed = ("n_latent", "n_causal", "n_state", "n_hidden", "n_layers", "dropout_rate",
                   "feature_mapper", "gate_threshold", "gate_init", "log1p", "input_noise")
        unknown = set(p) - set(allowed)
        if unknown:
            raise ValueError(
                f"Unknown model argument(s) {sorted(unknown)} for {type(self).__name__}; known: "
                f"{list(allowed)}."
            )
        return CauTriggerModule(n_input=self.summary.n_vars, n_down=n_down, **p)

    def _arrays(self, adata: AnnData | None = None, indices=None) -> dict[str, torch.Tensor]:
        batches = list(self._loader(adata, indices, batch_size=4096))
        return {k: torch.cat([b[k] for b in batches]).cpu() for k in batches[0]}

    def _set_input_statistics(self) -> None:
        """Per-feature mean and sd of the (log1p) inputs, from all registered cells."""
        arr = self._arrays()
        m = self.module
        x = arr[K.X_KEY]
        self._check_nonnegative(x, "adata.X" if self.setup_args_["layer"] is None else
                                f"adata.layers[{self.setup_args_['layer']!r}]")
        with torch.no_grad():
            xl = torch.log1p(x) if m.log1p else x
            m.mean_g.copy_(xl.mean(0))
            m.std_g.copy_(xl.std(0).clamp_min(1e-4))
            if self._two_layer:
                d = arr[DOWN_KEY]
                self._check_nonnegative(d, f"adata.obsm[{self.setup_args_['down_key']!r}]")
                dl = torch.log1p(d) if m.log1p else d
                m.down_mean_d.copy_(dl.mean(0))
                m.down_std_d.copy_(dl.std(0).clamp_min(1e-4))

    def _check_nonnegative(self, x: torch.Tensor, where: str) -> None:
        if self.module.log1p and (x < 0).any():
            raise ValueError(
                f"{where} has {int((x < 0).sum())} negative values; CauTrigger log1p-transforms "
                "its inputs. Pass counts or normalised (non-negative) expression, or build the "
                "model with log1p=False for data already on a log scale."
            )

    # ------------------------------------------------------------------ engine targets
    def _attribution_targets(self) -> dict:
        return {**CAUTRIGGER_TARGETS, **(DOWNSTREAM_TARGETS if self._two_layer else {})}

    def _attribution_output_names(self, target: str, n_outputs: int) -> list[str]:
        if target.startswith("state_") and n_outputs == len(self.label_categories):
            return self.label_categories
        if target == "latent" and n_outputs == self.module.n_latent:
            n_c = self.module.n_causal
            return [f"z_c{i}" for i in range(n_c)] + [
                f"z_s{i}" for i in range(n_outputs - n_c)]
        if target == "downstream" and n_outputs == len(self.down_feature_names):
            return self.down_feature_names
        return super()._attribution_output_names(target, n_outputs)

    @property
    def label_categories(self) -> list[str]:
        """State names, in the order of the model's outputs."""
        return [str(c) for c in self.summary.label_categories]

    @property
    def down_feature_names(self) -> list[str]:
        """Downstream feature names (two-layer model)."""
        return list(self.init_params_.get("down_feature_names") or [])

    # ------------------------------------------------------------------ training
    def train(  # type: ignore[override]
        self,
        max_epochs: int = 400,
        lr: float = 5e-4,
        use_gpu: str | int | bool | None = None,
        train_size: float = 0.8,
        validation_size: float | None = None,
        batch_size: int = 128,
        early_stopping: bool = False,
        weight_decay: float = 1e-6,
        n_x: int = 5,
        n_alpha: int = 25,
        n_beta: int = 100,
        recons_weight: float = 1.0,
        kl_weight: float = 0.02,
        up_weight: float = 1.0,
        down_weight: float = 1.0,
        feat_l1_weight: float = 0.05,
        dpd_weight: float = 3.0,
        fide_kl_weight: float = 0.05,
        causal_weight: float = 1.0,
        down_fold: float = 1.0,
        causal_fold: float = 1.0,
        spurious_fold: float = 1.0,
        stage_training: bool = True,
        weight_scheme: str | dict | None = None,
        im_factor: float | None = None,
        drop_last: int = 10,
        prior: str | np.ndarray | None = "auto",
        **kwargs: Any,
    ) -> pd.DataFrame:
        """Train the model (the seed's arguments; see Notes for the few changed defaults).

        Parameters
        ----------
        max_epochs, lr, batch_size, weight_decay, early_stopping
            Optimisation (Adam). ``early_stopping`` monitors the validation loss.
        use_gpu
            ``None``/``False``: CPU; ``True``, a device index or ``"cuda:i"``: GPU.
        train_size, validation_size
            Fractions of cells for training and validation (the rest of the cells by default).
        n_x, n_alpha, n_beta
            Cells per step for the causal loss, and Monte Carlo draws of the measured latent
            block and, for each, of the other block (all ``n_x * n_alpha * n_beta`` latent
            vectors go through the networks in one batched pass).
        recons_weight, kl_weight, feat_l1_weight, dpd_weight, fide_kl_weight, causal_weight
            Weights of reconstruction, KL, gate L1, state classification, fidelity KL and
            causal (information-flow) losses.
        up_weight, down_weight, down_fold
            Scale the upstream and downstream reconstruction (the latter by
            ``down_weight * down_fold``).
        causal_fold, spurious_fold
            The causal loss is ``-causal_fold * I(z_c; Y) + spurious_fold * I(z_s; Y)``.
        stage_training
            Multiply the weights by the stage multipliers of ``weight_scheme`` at each epoch
            (see :mod:`cellsight.models.cautrigger.weights`); ``False``: constant weights.
        weight_scheme
            A preset name (``"default"``, ``"linear"``, ``"two_stage"``, ``"causal"``) or a
            dict of per-stage multipliers overriding a preset.
        im_factor
            Imbalanced states: class weights ``(n / (n_state * n_c)) ** im_factor`` in the
            classification loss (``1``: fully balanced; ``None``/``0``: unweighted).
        drop_last
            Drop the last training minibatch when it has fewer than this many cells (the
            causal path uses a minibatch mean).
        prior
            Prior for the feature gates, fitted before the first training (the seed's
            ``pretrain_attention`` step, made the default), always from the *training* cells
            only: ``"auto"`` (default) is ``"cascade"`` for :class:`CauTrigger2L` and
            ``"pcr"`` for :class:`CauTrigger1L`; ``"cascade"`` (2L only) the
            two-stage linear score through the downstream layer
            (:func:`~cellsight.models.cautrigger.priors.cascade_prior`; one cross-validated
            lasso per downstream feature the state uses: minutes with thousands of cells and
            hundreds of features, where ``"pcr"`` takes a second, see :class:`CauTrigger2L`);
            ``"pcr"``
            principal-component logistic regression on the upstream features
            (:func:`~cellsight.models.cautrigger.priors.pcr_prior`); ``"de"`` the
            differential-expression prior ``0.05 + 0.9 (1 - q)``
            (:func:`~cellsight.models.cautrigger.attention.de_prior`), ``"de_rank"`` its
            rank version; an array a user prior (as ``prior_probs`` of
            :meth:`pretrain_attention`); ``None`` none. Per-feature gates are set to the prior
            exactly; the attention network gets :meth:`pretrain_attention`'s 50-epoch fit.
            Nothing is fitted when :meth:`pretrain_attention` was called or the model was
            trained before (``train`` again continues).
        kwargs
            :meth:`cellsight.models.base.BaseModel.train` arguments (``seed``,
            ``enable_progress_bar``, ``devices``, ``plan_kwargs``, ...).

        Notes
        -----
        ``train_size`` defaults to 0.8 (the seed: 1.0) so that the held-out cells can be
        explained by :meth:`get_up_significance`, whose permutation test is calibrated only on
        cells the model was not fitted on (every named prior uses the training cells only,
        for the same reason).

        The default priors are the ones that ranked the planted causal features best on the
        grid of ``benchmarks/cautrigger_grid.py`` (see the class Notes for the numbers);
        ``prior=None`` restores the seed's behaviour.
        """
        if self.adata is None:
            raise ValueError("This model has no AnnData to train on; load it with adata=.")
        check_fit_args(max_epochs, kwargs.get("devices", 1))
        check_lr(lr)
        for name, value in (("n_x", n_x), ("n_alpha", n_alpha), ("n_beta", n_beta)):
            if value < 1:
                raise ValueError(f"{name}={value} must be at least 1.")
        scheme = resolve_scheme(weight_scheme) if stage_training else None
        base = dict(zip(LOSS_TERMS, (recons_weight, kl_weight, feat_l1_weight, dpd_weight,
                                     fide_kl_weight, causal_weight)))
        for term, value in base.items():
            if value < 0:
                raise ValueError(f"{term}_weight={value} must be >= 0.")
        named = prior if isinstance(prior, str) else None  # None: an array or no prior
        if named == "auto":
            prior = named = self._default_prior
        if named is not None and named not in PRIORS:
            raise ValueError(f"prior={prior!r}: pass one of {list(PRIORS)}, None or prior "
                             "probabilities.")
        if named == "cascade" and not self._two_layer:
            raise ValueError(
                "prior='cascade' needs the downstream layer (obsm X_down) of CauTrigger2L; "
                f"{type(self).__name__} has none. Use prior='auto' ({self._default_prior!r}, "
                "the 1L default), another named prior or None."
            )
        self._set_class_weights(im_factor)
        seed = int(kwargs.pop("seed", self.seed))
        # streams the files of a read_shards stub (an in-memory module would read its zero X)
        dm = self._datamodule(train_size, validation_size, batch_size, seed)
        tail = dm.n_train % batch_size
        dm.drop_last = bool(0 < tail < drop_last and dm.n_train > batch_size)
        if early_stopping and dm.n_validation == 0:
            raise ValueError("early_stopping needs validation cells; pass train_size < 1.")
        self.train_indices_, self.validation_indices_ = dm.train_indices, dm.validation_indices
        if prior is not None and not (self.is_trained_ or getattr(self, "prior_fitted_", False)):
            # named priors: from the training cells only
            probs = prior if named is None else self._named_prior(named, dm.train_indices)
            fit_attention_prior(  # exact for per-feature gates; attention: pretrain's defaults
                self, probs, max_epochs=50, lr=1e-3,
                batch_size=128, use_gpu=use_gpu, train_size=1.0, validation_size=None,
                exact=True)
        accelerator, devices = _accelerator(use_gpu)
        accelerator = kwargs.pop("accelerator", accelerator)
        devices = kwargs.pop("devices", devices)
        plan_kwargs = {
            # Adam's usual eps: scvi-tools' plan default (0.01) damps the small gradients of
            # these per-feature losses so much that the causal path stays untrained
            "eps": 1e-8,
            "weight_decay": weight_decay, "base_weights": base, "scheme": scheme,
            "up_weight": up_weight, "down_weight": down_weight, "down_fold": down_fold,
            "causal_fold": causal_fold, "spurious_fold": spurious_fold,
            "n_x": n_x, "n_alpha": n_alpha, "n_beta": n_beta,
            **(kwargs.pop("plan_kwargs", None) or {}),
        }
        kwargs.setdefault("early_stopping_monitor", "validation_loss")
        history = super().train(
            max_epochs=max_epochs, batch_size=batch_size, lr=lr, seed=seed,
            datamodule=dm, plan_kwargs=plan_kwargs, early_stopping=early_stopping,
            accelerator=accelerator, devices=devices, **kwargs,
        )
        self._set_spurious_mean()
        return history

    def _named_prior(self, prior: str, cells: np.ndarray) -> np.ndarray:
        """The named prior (one of ``PRIORS``) of ``cells``: :mod:`.priors` or
        :func:`.attention.de_prior`."""
        arr = self._arrays(indices=cells)  # reads only these cells (a stub: from the files)
        x, y = arr[K.X_KEY].numpy(), arr[K.LABELS_KEY].reshape(-1).numpy()
        if prior == "pcr":
            return pcr_prior(x, y)
        if prior == "cascade":
            return cascade_prior(x, arr[DOWN_KEY].numpy(), y, seed=self.seed)
        return de_prior(x, y, mapping="rank" if prior == "de_rank" else "fdr")

    def _set_class_weights(self, im_factor: float | None) -> None:
        y = self._arrays()[K.LABELS_KEY].reshape(-1).long()
        counts = torch.bincount(y, minlength=self.module.n_state).double()
        if (counts == 0).any():
            missing = [self.label_categories[i] for i in torch.flatnonzero(counts == 0).tolist()]
            raise ValueError(f"States {missing} have no cells; remove unused categories.")
        w = torch.ones_like(counts)
        if im_factor:
            w = (counts.sum() / (len(counts) * counts)) ** float(im_factor)
        self.module.class_weight_c.copy_(w.float())

    @torch.no_grad()
    def _set_spurious_mean(self) -> None:
        """Mean posterior ``z_s`` over the training cells: where the explained causal path
        holds ``z_s``."""
        idx = self.train_indices_
        xt = self._inputs(None, idx)[0]
        self.module.eval()
        qs, _ = self.module.encoder_s(xt * (1 - self.module.gates(xt)))
        self.module.z_s_mean_k.copy_(qs.loc.mean(0))

    # ------------------------------------------------------------------ inputs
    def _inputs(
        self, adata: AnnData | None, indices=None
    ) -> tuple[torch.Tensor, torch.Tensor | None, pd.Index, dict]:
        """Standardised inputs, state codes (``None`` if unknown), cell names, raw arrays."""
        arr = self._arrays(adata, indices)
        with torch.no_grad():
            xt = self.module.transform(arr[K.X_KEY].to(self.device))
        y = arr.get(K.LABELS_KEY)
        y = None if y is None else y.reshape(-1).long()
        names = (self.adata if adata is None else adata).obs_names
        if indices is not None:
            names = names[V.cell_positions(indices, len(names))]
        return xt, y, pd.Index(names), arr

    def _check_trained(self) -> None:
        if not self.is_trained_:
            warnings.warn(f"{type(self).__name__} has not been trained; results are from "
                          "random weights.", stacklevel=3)

    # ------------------------------------------------------------------ outputs
    @torch.no_grad()
    def get_model_output(
        self, adata: AnnData | None = None, batch_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """Latents, logits, probabilities and predictions of every cell.

        Parameters
        ----------
        adata
            Cells (default: the model's AnnData), validated against the registry.
        batch_size
            Cells per forward pass.

        Returns
        -------
        dict with ``"latent"`` (cells x n_latent, posterior means ``[z_c, z_s]``),
        ``"logits"`` and ``"probs"`` (cells x n_state, full model), ``"causal_probs"`` (the
        causal path), ``"preds"`` (most likely state code; for two states the same as
        ``probs[:, 1] > 0.5``), ``"pred_labels"`` (state names) and ``"weights"`` (the gates,
        cells x features).
        """
        m = self.module
        m.eval()
        out: dict[str, list] = {k: [] for k in ("latent", "logits", "causal_logits", "weights")}
        for t in self._loader(adata, None, batch_size or 1024):
            inf = m.inference(t[K.X_KEY], use_latent_mean=True)
            dec = m.decode(inf["z_c"], inf["z_s"])
            out["latent"].append(inf["z"])
            out["logits"].append(dec["logits_nc"])
            out["causal_logits"].append(m.causal_logits(inf["xt_ng"]))
            out["weights"].append(inf["w_ng"])
        res = {k: torch.cat(v).cpu().numpy() for k, v in out.items()}
        res["probs"] = _softmax(res["logits"])
        res["causal_probs"] = _softmax(res.pop("causal_logits"))
        res["preds"] = res["probs"].argmax(1)
        res["pred_labels"] = np.asarray(self.label_categories, dtype=object)[res["preds"]]
        return res

    def _extra_state(self) -> dict:
        return {}


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _check_down(adata: AnnData, key: str) -> None:
    if is_sharded(adata) and key not in adata.obsm:
        raise ValueError(
            f"This read_shards stub has no obsm[{key!r}] (a stub loads obs and var only, even "
            f"when the shard files hold {key!r}); read it with "
            f"cellsight.data.read_shards(paths, obsm_keys=[{key!r}])."
        )
    if key not in adata.obsm:
        raise ValueError(
            f"adata.obsm has no {key!r}: CauTrigger2L needs the downstream features of every "
            f"cell there (cells x downstream). Set adata.obsm[{key!r}] or pass down_key=."
        )
    d = adata.obsm[key]
    arr = d.to_numpy() if hasattr(d, "to_numpy") else d
    if hasattr(arr, "toarray"):
        arr = arr.toarray()
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"adata.obsm[{key!r}] must be cells x downstream features (>= 1).")
    if not np.isfinite(arr).all():
        raise ValueError(f"adata.obsm[{key!r}] has NaN or infinite values; fill or remove them.")


def _stored_down_names(adata: AnnData, key: str) -> list[str] | None:
    """The names ``adata`` gives the columns of ``obsm[key]``: a DataFrame's columns, else
    ``uns[key + "_feature"]`` (CauTrigger's key), else ``None``."""
    d = adata.obsm[key]
    if hasattr(d, "columns"):
        return [str(n) for n in d.columns]
    if f"{key}_feature" in adata.uns:
        return [str(n) for n in adata.uns[f"{key}_feature"]]
    return None


def _down_names(adata: AnnData, key: str, names, n_down: int) -> list[str]:
    if names is None:
        names = _stored_down_names(adata, key)
    if names is None:
        names = [f"down_{i}" for i in range(n_down)]
    names = [str(n) for n in names]
    if len(names) != n_down:
        raise ValueError(
            f"{len(names)} downstream feature names for {n_down} columns of adata.obsm[{key!r}]; "
            f"give one name per column (adata.uns['{key}_feature'] or down_feature_names=)."
        )
    V.check_unique_var_names(pd.Index(names))
    return names
