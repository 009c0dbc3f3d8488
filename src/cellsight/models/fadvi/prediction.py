"""FADVI's predictions and feature rankings (``predict``, ``get_ranked_features``).

A mixin of :class:`cellsight.models.fadvi.FADVI`: thin wrappers around the classifier heads and
the interpretation engine (:meth:`~cellsight.interpret.mixin.InterpretMixin.
get_feature_attributions`, :func:`cellsight.interpret.rank_features`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from cellsight.data.validate import cell_positions
from cellsight.interpret.rank import check_top_n
from cellsight.interpret.rank import rank_features as _rank_features

__all__ = ["PredictionMixin"]

_MODES = {"b": "batch", "batch": "batch", "l": "label", "label": "label"}


class PredictionMixin:
    """``predict`` and ``get_ranked_features`` of FADVI (needs the model's ``_seeded``,
    ``_loader``, ``_inference``, ``_obs_names``, ``class_names``, ``batch_names``)."""

    def predict(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        prediction_mode: Literal["b", "batch", "l", "label"] = "label",
        soft: bool = False,
        batch_size: int | None = None,
        return_numpy: bool = True,
        interpretability: Literal["ig", "gs"] | None = None,
        interpretability_args: dict | None = None,
        return_dict: bool = True,
        give_mean: bool = True,
    ) -> np.ndarray | pd.Series | pd.DataFrame | dict | tuple:
        """Predict the label (from ``z_l``) or the batch (from ``z_b``) of each cell.

        Parameters
        ----------
        adata, indices, batch_size
            Cells, as in :meth:`get_latent_representation`.
        prediction_mode
            ``"label"``/``"l"`` or ``"batch"``/``"b"``.
        soft
            Class probabilities (a DataFrame, cells x class names) instead of class names.
        return_numpy
            Hard predictions as an array of names (default) or a Series indexed by cell.
        interpretability
            ``"ig"`` (Integrated Gradients) or ``"gs"`` (GradientShap): also attribute each
            cell's probability of its predicted class to the input counts, through
            :meth:`get_feature_attributions` (the one engine).
        interpretability_args
            Arguments of :meth:`get_feature_attributions` (``n_steps``, ``baselines``,
            ``n_samples``, ``internal_batch_size``, ``show_progress`` ...). With LayerNorm
            encoders (the default) the probability rises within the first percent of the path
            from the zero baseline, so Integrated Gradients' default 50 steps leave its
            attributions short of ``p(x) - p(0)`` (a warning gives the gap; the rankings of
            marker genes hold); ``{"n_steps": 1000}`` closes it to about 0.01.
        return_dict
            With ``interpretability``: a dict ``{"predictions", "attributions",
            "explained_class"}`` (attributions ``(cells, genes)``); ``False``: the tuple
            ``(predictions, attributions)``.
        give_mean
            Classify the posterior means (default: deterministic); ``False``: one posterior
            sample per cell (seeded with the model's seed).
        """
        if prediction_mode not in _MODES:
            raise ValueError(
                f"prediction_mode={prediction_mode!r} must be 'label', 'l', 'batch' or 'b'."
            )
        which = _MODES[prediction_mode]
        if interpretability not in (None, "ig", "gs"):
            raise ValueError(f"interpretability={interpretability!r} must be None, 'ig' or 'gs'.")
        names = self.class_names if which == "label" else self.batch_names
        probs = []
        with self._seeded():
            for tensors in self._loader(adata, indices, batch_size):
                out = self._inference(tensors, give_mean=give_mean)
                probs.append(torch.softmax(self.module.class_logits(out, which), -1))
        prob_nc = torch.cat(probs).numpy()
        obs = self._obs_names(adata, indices)
        code_n = prob_nc.argmax(1)
        if soft:
            preds: Any = pd.DataFrame(prob_nc, index=obs, columns=names)
        else:
            labels = np.asarray(names, dtype=object)[code_n]
            preds = labels if return_numpy else pd.Series(labels, index=obs, name=which)
        if interpretability is None:
            return preds
        args = {"show_progress": False, **(interpretability_args or {})}
        attrs = self.get_feature_attributions(
            adata, indices, target=f"{which}_probability", target_index=code_n,
            method=interpretability, return_numpy=True, **args,
        )
        if not return_dict:
            return preds, attrs
        explained = np.asarray(names, dtype=object)[code_n]
        return {"predictions": preds, "attributions": attrs, "explained_class": explained}

    def get_ranked_features(
        self,
        adata: AnnData | None = None,
        attributions: np.ndarray | pd.DataFrame | dict | None = None,
        top_n: int | None = None,
        groupby: str | Sequence | None = None,
        indices: Sequence[int] | None = None,
    ) -> pd.DataFrame:
        """Genes ranked by attribution, overall or per class (``rank_features`` of the engine).

        Parameters
        ----------
        adata
            The explained AnnData (default: the model's), for an ``obs`` ``groupby``.
        attributions
            Cells x genes attributions, or the dict returned by ``predict(...,
            interpretability=...)``. ``None``: computed with ``predict(interpretability="ig")``.
        top_n
            Keep the best ``top_n`` genes (per group).
        groupby
            ``None``: over all cells; ``"predicted"``: per explained (predicted) class (needs
            the dict from ``predict``, or ``attributions=None``); an ``obs`` column or one value
            per cell: per group.
        indices
            Cells of ``adata`` the attributions belong to (for an ``obs`` column ``groupby``).

        Returns
        -------
        Columns ``feature``, ``feature_idx``, ``attribution_mean``, ``attribution_std``,
        ``attribution_abs_mean``, ``n_cells``, ``rank`` (and ``group`` with ``groupby``).
        """
        check_top_n(top_n)  # before the attributions are computed
        if attributions is None:
            attributions = self.predict(adata, indices, interpretability="ig")
        explained = None
        if isinstance(attributions, dict):
            explained = attributions.get("explained_class")
            attributions = attributions["attributions"]
        if isinstance(groupby, str) and groupby == "predicted":
            if explained is None:
                raise ValueError(
                    "groupby='predicted' needs the dict returned by predict(..., "
                    "interpretability='ig') as attributions (it holds the explained classes)."
                )
            groupby = explained
        elif isinstance(groupby, str):
            obs = self._manager_for(adata).adata.obs
            if groupby not in obs:
                raise ValueError(f"groupby={groupby!r} is not an obs column of the AnnData.")
            col = obs[groupby].to_numpy()
            groupby = col[cell_positions(indices, len(col))]
        var_names = None if isinstance(attributions, pd.DataFrame) else self.var_names
        return _rank_features(attributions, var_names, groupby, top_n=top_n)
