"""Interpretation methods for models whose module has the scvi-tools contract.

:class:`InterpretMixin` gives any :class:`cellsight.models.base.BaseModel` subclass whose module
has ``_get_inference_input``/``inference``/``_get_generative_input``/``generative``/``loss``
the methods :meth:`~InterpretMixin.get_feature_attributions`,
:meth:`~InterpretMixin.rank_features` and :meth:`~InterpretMixin.get_feature_significance`.
They are thin: they build the explained function (raw counts in, the module's own log1p and
library size inside, the other registered inputs held fixed) and call the one engine.

Use it as the first base: ``class SCVI(InterpretMixin, BaseModel)``. A model adds named
targets by overriding :meth:`~InterpretMixin._attribution_targets` (e.g. a classifier's
``"label_prob"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS

from cellsight.data.validate import cell_positions
from cellsight.interpret.attribute import attribute
from cellsight.interpret.rank import check_top_n
from cellsight.interpret.rank import rank_features as _rank_features
from cellsight.interpret.significance import permutation_test, sign_test
from cellsight.interpret.targets import MODULE_TARGETS, ModuleFunction

__all__ = ["InterpretMixin"]

TargetFn = Callable[[torch.nn.Module, dict], torch.Tensor]

# methods that evaluate the model away from the explained cells (paths, references)
_PATH_METHODS = ("ig", "gs", "deeplift", "shap")


class InterpretMixin:
    """Attributions, rankings and significance for a model (see the module docstring)."""

    # ------------------------------------------------------------------ hooks
    def _attribution_targets(self) -> dict[str, TargetFn]:
        """Named targets: name -> ``f(module, tensors) -> (cells,) or (cells, outputs)``."""
        return dict(MODULE_TARGETS)

    def _attribution_output_names(self, target: str, n_outputs: int) -> list[str]:
        """Names of a named target's outputs (genes for ``"expression"``)."""
        if target == "expression" and n_outputs == self.summary.n_vars:
            return [str(v) for v in self.var_names]
        prefix = {"latent": "latent_"}.get(target, f"{target}_")
        return [f"{prefix}{i}" for i in range(n_outputs)]

    # ------------------------------------------------------------------ plumbing
    def _attribution_inputs(
        self, adata: AnnData | None, indices, batch_size: int | None
    ) -> tuple[torch.Tensor, list[str], tuple[torch.Tensor, ...], pd.Index]:
        """Counts of the cells, the other registered inputs (held fixed), and cell names."""
        manager = self._manager_for(adata)
        batches = list(self._loader(adata, indices, batch_size))
        if not batches:
            raise ValueError("No cells to explain: indices selects none.")
        keys = [k for k in batches[0] if k != REGISTRY_KEYS.X_KEY]
        x = torch.cat([b[REGISTRY_KEYS.X_KEY] for b in batches]).float()
        fixed = tuple(torch.cat([b[k] for b in batches]) for k in keys)
        obs = manager.adata.obs_names
        if indices is not None:
            obs = obs[cell_positions(indices, len(obs))]
        return x, keys, fixed, pd.Index(obs)

    def _resolve_target(
        self, target: str | TargetFn, target_index: Any, n_outputs: int
    ) -> tuple[Any, list[str] | None]:
        """Engine target and output names from the model-level ``target_index``."""
        names = (
            self._attribution_output_names(target, n_outputs) if isinstance(target, str) else
            [f"output_{i}" for i in range(n_outputs)]
        )
        if target_index is None:
            if n_outputs == 1:
                return None, None
            if target == "expression":
                raise ValueError(
                    f"target='expression' has {n_outputs} outputs (genes); pass target_index= "
                    "a gene name or position, or a list of them."
                )
            return "all", names
        if isinstance(target_index, np.ndarray | torch.Tensor) and np.ndim(target_index) == 1:
            return target_index, None  # one output per cell

        def pos(t) -> int:
            if isinstance(t, str):
                if t not in names:
                    raise ValueError(
                        f"target_index {t!r} is not an output of target {target!r} (e.g. "
                        f"{names[:3]}); check the gene name."
                    )
                return names.index(t)
            return int(t)

        if isinstance(target_index, list | tuple):
            cols = [pos(t) for t in target_index]
            return cols, [names[c] if 0 <= c < n_outputs else str(c) for c in cols]
        return pos(target_index), None

    # ------------------------------------------------------------------ public API
    def get_feature_attributions(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        target: str | TargetFn = "latent",
        target_index: int | str | Sequence[int | str] | np.ndarray | None = None,
        method: str = "ig",
        baselines: str | float | np.ndarray | torch.Tensor | None = "zeros",
        n_steps: int = 50,
        batch_size: int | None = None,
        internal_batch_size: int | None = None,
        return_numpy: bool = False,
        return_delta: bool = False,
        seed: int | None = None,
        show_progress: bool = True,
        **attribute_kwargs: Any,
    ) -> pd.DataFrame | np.ndarray | tuple:
        """Attributions of a model output to the input genes of each cell.

        The explained function takes raw counts and runs the module's own preprocessing
        (log1p, library size); the cells' batch, labels and covariates are held fixed, and
        sampled latents are replaced by posterior means.

        Parameters
        ----------
        adata
            Cells to explain (default: the model's AnnData); validated against the registry.
        indices
            Cells of ``adata`` to explain (default all).
        target
            ``"latent"`` (posterior mean of each latent dimension), ``"expression"``
            (normalised expression ``px.scale``), ``"loss"`` (per-cell loss), another name
            from :meth:`_attribution_targets`, or ``callable(module, tensors)``.
        target_index
            Output(s) of the target: an index or gene name, a list of them (cells x genes x
            outputs, e.g. gene-to-gene attributions), or one index per cell. ``None``: the
            only output, or every latent dimension.
        method
            ``"ig"``, ``"gs"``, ``"grad"``, ``"ixg"``, ``"deeplift"`` or ``"shap"``.
        baselines
            ``"zeros"``, ``"mean"``, ``"background"``, a number or an array (see
            :func:`cellsight.interpret.attribute`). With ``target="loss"`` use ``"mean"``:
            the log library size is undefined at zero counts. Path methods (``"ig"``,
            ``"gs"``, ``"deeplift"``, ``"shap"``) of the loss of a ZINB model are refused
            with a ``ValueError``: its log-likelihood jumps at zero counts.
        n_steps
            Integrated Gradients steps.
        batch_size, internal_batch_size
            Cells per attribution call and rows per forward pass (default: by memory budget).
        return_numpy
            Return an array instead of a DataFrame for one output.
        return_delta
            Also return the convergence delta per cell (ig, gs, deeplift).
        seed
            Seeds background draws and sampling methods (default: the model's seed).
        show_progress
            Progress bar.
        attribute_kwargs
            Other :func:`~cellsight.interpret.attribute` arguments.

        Returns
        -------
        Cells x genes DataFrame (one output) or array ``(cells, genes, outputs)``; with
        ``return_delta`` a tuple with the deltas.
        """
        self._check_method_target(method, target)
        fn, x, fixed, obs, out_names, eng_target = self._explained(
            adata, indices, target, target_index, batch_size
        )
        was_training = self.module.training
        self.module.eval()
        try:
            res = attribute(
                fn,
                x,
                method=method,
                baselines=baselines,
                target=eng_target,
                n_steps=n_steps,
                additional_forward_args=fixed or None,
                internal_batch_size=internal_batch_size,
                batch_size=batch_size,
                return_convergence_delta=return_delta,
                seed=self.seed if seed is None else int(seed),
                show_progress=show_progress,
                **attribute_kwargs,
            )
        finally:
            self.module.train(was_training)
        attrs, delta = res if return_delta else (res, None)
        if attrs.ndim == 2 and not return_numpy:
            attrs = pd.DataFrame(attrs, index=obs, columns=self.var_names)
        return (attrs, delta) if return_delta else attrs

    def _check_method_target(self, method: str, target) -> None:
        """Reject path methods on the ZINB loss: its log-likelihood jumps where a count
        reaches zero (the zero-inflated branch holds at exactly 0 only), so every path from a
        baseline to cells with zero counts crosses a step that gradients do not see, and the
        attributions do not add up to the loss difference (errors of the size of the loss)."""
        if (target == "loss" and method in _PATH_METHODS
                and getattr(self.module, "gene_likelihood", None) == "zinb"):
            raise ValueError(
                f"method={method!r} with target='loss' is not meaningful for a ZINB model: the "
                "ZINB log-likelihood is discontinuous at zero counts, which every path from a "
                "baseline crosses, so the attributions would not add up to the loss. Use "
                "method='grad' or 'ixg' (local gradients), target='expression' or 'latent', or "
                "a model with gene_likelihood='nb'."
            )

    def _explained(self, adata, indices, target, target_index, batch_size):
        if isinstance(target, str):
            targets = self._attribution_targets()
            if target not in targets:
                raise ValueError(
                    f"target={target!r} is not known for {type(self).__name__}; use one of "
                    f"{sorted(targets)} or a callable(module, tensors)."
                )
            out_fn = targets[target]
        elif callable(target):
            out_fn = target
        else:
            raise ValueError("target must be a target name or a callable(module, tensors).")
        x, keys, fixed, obs = self._attribution_inputs(adata, indices, batch_size)
        fn = ModuleFunction(self.module, out_fn, keys)
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                probe = fn(x[:1], *(f[:1] for f in fixed))
        finally:
            self.module.train(was_training)
        n_outputs = 1 if probe.dim() == 1 else int(probe.shape[-1])
        eng_target, out_names = self._resolve_target(target, target_index, n_outputs)
        return fn, x, fixed, obs, out_names, eng_target

    def rank_features(
        self,
        attributions: np.ndarray | pd.DataFrame | None = None,
        adata: AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        groupby: str | Sequence | None = None,
        top_n: int | None = None,
        **attribution_kwargs: Any,
    ) -> pd.DataFrame:
        """Rank genes by attribution (FADVI's ``get_ranked_features`` columns and more).

        Parameters
        ----------
        attributions
            Cells x genes attributions (computed with :meth:`get_feature_attributions` and
            ``attribution_kwargs`` if ``None``).
        adata, indices
            The explained cells (used for ``groupby`` and to compute attributions).
        groupby
            An ``obs`` column (or one value per cell): rank within each group.
        top_n
            Keep the best ``top_n`` per group.
        attribution_kwargs
            Passed to :meth:`get_feature_attributions`.

        Returns
        -------
        Tidy DataFrame, see :func:`cellsight.interpret.rank_features`.
        """
        check_top_n(top_n)  # before the attributions are computed
        if attributions is None:
            attributions = self.get_feature_attributions(
                adata, indices, **{"show_progress": False, **attribution_kwargs}
            )
        if isinstance(groupby, str):
            obs = self._manager_for(adata).adata.obs
            if groupby not in obs:
                raise ValueError(f"groupby={groupby!r} is not an obs column of the AnnData.")
            col = obs[groupby]
            groupby = col.to_numpy()[cell_positions(indices, len(col))]
        var_names = None if isinstance(attributions, pd.DataFrame) else self.var_names
        return _rank_features(attributions, var_names, groupby, top_n=top_n)

    def get_feature_significance(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        target: str | TargetFn = "latent",
        target_index: int | str | np.ndarray | None = None,
        method: str = "ig",
        test: str = "permutation",
        perm_mode: str = "per_feature",
        n_perm: int = 100,
        genes: Sequence[str] | None = None,
        use_signed: bool = True,
        baselines: str | float | np.ndarray | torch.Tensor | None = "zeros",
        n_steps: int = 50,
        fdr: bool = True,
        seed: int | None = None,
        show_progress: bool = True,
        **attribute_kwargs: Any,
    ) -> pd.DataFrame:
        """Significance of each gene's attribution to one output per cell.

        ``test="permutation"`` shuffles each gene (``perm_mode="per_feature"``) or all genes
        (``"global"``) across cells with the batch/covariates held fixed and recomputes the
        attributions; ``test="sign"`` is the binomial sign-consistency test. Read the notes of
        :mod:`cellsight.interpret.significance` for the null each assumes: explain held-out
        cells (``indices``) and an output tied to an observed outcome (``target_index`` one
        index per cell) to test a gene's link to that outcome.

        Parameters
        ----------
        adata, indices, target, target_index, method, baselines, n_steps, seed
            As in :meth:`get_feature_attributions`; ``target_index`` must pick one output per
            cell.
        test
            ``"permutation"`` or ``"sign"``.
        perm_mode, n_perm, use_signed, fdr
            See :func:`cellsight.interpret.permutation_test`.
        genes
            Genes to test (default all; per-feature cost is genes x ``n_perm`` passes).
        show_progress
            Progress bar.
        attribute_kwargs
            Other :func:`~cellsight.interpret.attribute` arguments.

        Returns
        -------
        DataFrame indexed by gene with ``weight``, ``weight_signed``, ``pvalue``, ``qvalue``.
        """
        if test not in ("permutation", "sign"):
            raise ValueError(f"test={test!r} must be 'permutation' or 'sign'.")
        seed = self.seed if seed is None else int(seed)
        self._check_method_target(method, target)
        fn, x, fixed, _, _, eng_target = self._explained(
            adata, indices, target, target_index, attribute_kwargs.get("batch_size")
        )
        if isinstance(eng_target, list | str):
            raise ValueError(
                "Significance is computed for one output per cell; pass target_index= one index "
                "(or gene name), or one index per cell."
            )
        was_training = self.module.training
        self.module.eval()
        try:
            common = dict(method=method, baselines=baselines, target=eng_target, n_steps=n_steps,
                          additional_forward_args=fixed or None, seed=seed,
                          show_progress=show_progress, **attribute_kwargs)
            if test == "sign":
                attrs = attribute(fn, x, **common)
                df = sign_test(attrs, self.var_names, fdr=fdr)
                return df.loc[list(genes)] if genes is not None else df
            return permutation_test(
                fn, x, perm_mode=perm_mode, n_perm=n_perm, features=genes,
                var_names=self.var_names, use_signed=use_signed, fdr=fdr, **common,
            )
        finally:
            self.module.train(was_training)
