"""Registration of AnnData with a model (``setup_anndata``), built on scvi-tools' AnnDataManager.

The user's AnnData is never modified beyond one documented entry,
``adata.uns["_cellsight_setup"]`` (a JSON string with the model name and setup arguments).
scvi-tools' fields write helper columns (``_scvi_batch`` ...) into ``obs``; cellsight registers
a *shadow* AnnData that shares the user's arrays (no copy of X or layers) but owns copies of
``obs``/``var``, so those columns never appear in the user's object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data import fields as scvi_fields

from cellsight.data import validate as V
from cellsight.data.shards import SHARDS_UNS_KEY

__all__ = [
    "REGISTRY_KEYS",
    "SETUP_UNS_KEY",
    "RegistrySummary",
    "setup_anndata",
    "read_setup_args",
    "register",
    "summarize_registry",
]

SETUP_UNS_KEY = "_cellsight_setup"

_SETUP_ARG_NAMES = (
    "layer",
    "batch_key",
    "labels_key",
    "unlabeled_category",
    "categorical_covariate_keys",
    "continuous_covariate_keys",
    "size_factor_key",
)


def _normalise_setup_args(args: dict[str, Any]) -> dict[str, Any]:
    out = {k: args.get(k) for k in _SETUP_ARG_NAMES}
    for k in ("categorical_covariate_keys", "continuous_covariate_keys"):
        if out[k] is not None:
            out[k] = [out[k]] if isinstance(out[k], str) else list(out[k])
            if len(out[k]) == 0:
                out[k] = None
    for k, v in args.items():  # model-specific extras (e.g. obsm keys), kept verbatim
        if k not in out:
            out[k] = v
    return out


def _fields(setup_args: dict[str, Any], is_count_data: bool) -> list:
    k = REGISTRY_KEYS
    fields = [
        scvi_fields.LayerField(k.X_KEY, setup_args["layer"], is_count_data=is_count_data),
        scvi_fields.CategoricalObsField(k.BATCH_KEY, setup_args["batch_key"]),
    ]
    if setup_args["labels_key"] is not None and setup_args["unlabeled_category"] is not None:
        fields.append(
            scvi_fields.LabelsWithUnlabeledObsField(
                k.LABELS_KEY, setup_args["labels_key"], setup_args["unlabeled_category"]
            )
        )
    else:
        fields.append(scvi_fields.CategoricalObsField(k.LABELS_KEY, setup_args["labels_key"]))
    fields += [
        scvi_fields.NumericalObsField(
            k.SIZE_FACTOR_KEY, setup_args["size_factor_key"], required=False
        ),
        scvi_fields.CategoricalJointObsField(
            k.CAT_COVS_KEY, setup_args["categorical_covariate_keys"]
        ),
        scvi_fields.NumericalJointObsField(
            k.CONT_COVS_KEY, setup_args["continuous_covariate_keys"]
        ),
    ]
    return fields


def shadow_anndata(adata: AnnData) -> AnnData:
    """An AnnData sharing ``adata``'s matrices but owning copies of ``obs`` and ``var`` (and the
    record of a ``read_shards`` stub, so that the manager's AnnData is known to be one)."""
    shadow = AnnData(
        X=adata.X,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        layers={k: v for k, v in adata.layers.items()},
        obsm={k: v for k, v in adata.obsm.items()},
    )
    if SHARDS_UNS_KEY in adata.uns:
        shadow.uns[SHARDS_UNS_KEY] = adata.uns[SHARDS_UNS_KEY]
    return shadow


def _label_hint(setup_args: dict[str, Any]) -> dict[str, str]:
    """For models with unlabelled cells: how to give a query without labels."""
    unlabeled = setup_args.get("unlabeled_category")
    key = setup_args.get("labels_key")
    if key is None or unlabeled is None:
        return {}
    return {"labels_key": (
        f"For cells without labels (e.g. a query to predict) fill it with the unlabelled "
        f"category: adata.obs[{key!r}] = {unlabeled!r}."
    )}


def validate_anndata(adata: AnnData, setup_args: dict[str, Any]) -> None:
    """Structural checks shared by every model: emptiness, names, keys, finite values."""
    if not isinstance(adata, AnnData):
        raise ValueError(
            f"Expected an anndata.AnnData, got {type(adata).__name__}; read your data with "
            "anndata.read_h5ad(...) (or cellsight.data.read_shards([...]) for shards)."
        )
    V.check_not_empty(adata)
    V.check_unique_var_names(adata.var_names)
    V.check_layer(adata, setup_args["layer"])
    V.check_obs_keys(
        adata,
        {
            "batch_key": setup_args["batch_key"],
            "labels_key": setup_args["labels_key"],
            "size_factor_key": setup_args["size_factor_key"],
            "categorical_covariate_keys": setup_args["categorical_covariate_keys"],
            "continuous_covariate_keys": setup_args["continuous_covariate_keys"],
        },
        hints=_label_hint(setup_args),
    )
    for key in (setup_args["batch_key"], setup_args["labels_key"]):
        if key is not None and adata.obs[key].isna().any():
            first = adata.obs_names[adata.obs[key].isna().to_numpy()][0]
            raise ValueError(
                f"adata.obs[{key!r}] has {int(adata.obs[key].isna().sum())} missing value(s) "
                f"(first at cell {first!r}); fill them (for unknown labels use a dedicated "
                "category and pass it as unlabeled_category)."
            )
    for key in setup_args["categorical_covariate_keys"] or []:
        if adata.obs[key].isna().any():
            raise ValueError(
                f"adata.obs[{key!r}] has missing values; fill them with a category first."
            )
    cont = list(setup_args["continuous_covariate_keys"] or [])
    if setup_args["size_factor_key"] is not None:
        cont.append(setup_args["size_factor_key"])
        sf = adata.obs[setup_args["size_factor_key"]]
        if pd.api.types.is_numeric_dtype(sf) and (sf.to_numpy(dtype=float) <= 0).any():
            raise ValueError(
                f"adata.obs[{setup_args['size_factor_key']!r}] has non-positive size factors; "
                "size factors must be > 0."
            )
    V.check_continuous_obs(adata, cont)
    V.check_matrix_values(adata, setup_args["layer"], require_counts=False)


def setup_anndata(adata: AnnData, model_name: str, **setup_args: Any) -> dict[str, Any]:
    """Validate ``adata`` for ``model_name`` and record the setup in ``adata.uns``.

    Returns the normalised setup arguments. The only change to ``adata`` is
    ``adata.uns["_cellsight_setup"]``.
    """
    args = _normalise_setup_args(setup_args)
    validate_anndata(adata, args)
    if args["labels_key"] is None and args["unlabeled_category"] is not None:
        raise ValueError("unlabeled_category was given without labels_key; pass labels_key too.")
    adata.uns[SETUP_UNS_KEY] = json.dumps({"model_name": model_name, "setup_args": args})
    return args


def read_setup_args(adata: AnnData, model_name: str) -> dict[str, Any]:
    """The setup arguments recorded by ``setup_anndata`` (clear error when missing)."""
    raw = adata.uns.get(SETUP_UNS_KEY) if isinstance(adata, AnnData) else None
    if raw is None:
        raise ValueError(
            f"This AnnData has not been set up; call cellsight.models.{model_name}"
            ".setup_anndata(adata, ...) first."
        )
    rec = json.loads(raw)
    if rec["model_name"] != model_name:
        raise ValueError(
            f"This AnnData was set up for {rec['model_name']}, not {model_name}; call "
            f"{model_name}.setup_anndata(adata, ...) again."
        )
    return rec["setup_args"]


def register(
    adata: AnnData,
    setup_args: dict[str, Any],
    model_name: str,
    *,
    is_count_data: bool = True,
    source_registry: dict | None = None,
    extra_fields: list | None = None,
) -> AnnDataManager:
    """Register a shadow of ``adata`` with an AnnDataManager.

    With ``source_registry`` (a trained model's registry) the query is validated against it
    first: same genes in the same order, only known categories.
    """
    validate_anndata(adata, setup_args)
    if source_registry is not None:
        summary = summarize_registry(source_registry)
        V.check_query_genes(summary.var_names, adata.var_names)
        for key, cats in summary.obs_categories.items():
            allow = ()
            if key == setup_args["labels_key"] and setup_args["unlabeled_category"] is not None:
                allow = (setup_args["unlabeled_category"],)
            V.check_known_categories(adata.obs[key], cats, key, allow=allow)
    manager = AnnDataManager(
        fields=_fields(setup_args, is_count_data) + list(extra_fields or []),
        setup_method_args={"model_name": model_name, "setup_args": dict(setup_args)},
    )
    shadow = shadow_anndata(adata)
    if source_registry is None:
        manager.register_fields(shadow)
    else:
        manager.register_fields(shadow, source_registry=source_registry, extend_categories=False)
    return manager


@dataclass
class RegistrySummary:
    """What a model needs to know about its registered data, readable without the data."""

    var_names: pd.Index
    n_vars: int
    n_batch: int
    n_labels: int
    batch_categories: list
    label_categories: list
    unlabeled_category: Any
    n_cats_per_cov: list[int]
    cat_cov_categories: dict[str, list]
    n_continuous_cov: int
    continuous_cov_keys: list[str]
    has_size_factor: bool
    obs_categories: dict[str, list] = field(default_factory=dict)


def summarize_registry(registry: dict) -> RegistrySummary:
    """Summarise an AnnDataManager registry (a plain dict, as saved with a model)."""
    fr = registry["field_registries"]
    k = REGISTRY_KEYS
    setup_args = registry["setup_args"]

    def state(key):
        return fr.get(key, {}).get("state_registry", {}) or {}

    x_state = state(k.X_KEY)
    var_names = pd.Index(np.asarray(x_state["column_names"]).astype(str))
    b_state = state(k.BATCH_KEY)
    batch_cats = list(b_state.get("categorical_mapping", ["_all_"]))
    l_state = state(k.LABELS_KEY)
    label_cats = list(l_state.get("categorical_mapping", ["_all_"]))
    unl = l_state.get("unlabeled_category")
    cat_state = state(k.CAT_COVS_KEY)
    mappings = cat_state.get("mappings", {}) or {}
    cat_cov_categories = {key: list(v) for key, v in mappings.items()}
    cont_state = state(k.CONT_COVS_KEY)
    cont_keys = list(cont_state.get("columns", []) or [])
    obs_categories = {}
    if setup_args.get("batch_key") is not None:
        obs_categories[setup_args["batch_key"]] = batch_cats
    if setup_args.get("labels_key") is not None:
        obs_categories[setup_args["labels_key"]] = [c for c in label_cats if c != unl]
    obs_categories.update(cat_cov_categories)
    return RegistrySummary(
        var_names=var_names,
        n_vars=len(var_names),
        n_batch=len(batch_cats),
        n_labels=len(label_cats),
        batch_categories=batch_cats,
        label_categories=label_cats,
        unlabeled_category=unl,
        n_cats_per_cov=[len(v) for v in cat_cov_categories.values()],
        cat_cov_categories=cat_cov_categories,
        n_continuous_cov=len(cont_keys),
        continuous_cov_keys=cont_keys,
        has_size_factor=setup_args.get("size_factor_key") is not None,
        obs_categories=obs_categories,
    )
