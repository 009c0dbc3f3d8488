"""The user-facing CauTrigger models: one-layer (upstream -> state) and two-layer
(upstream -> downstream -> state) causal decomposition."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib.figure import Figure

from cellsight.models.cautrigger import explain
from cellsight.models.cautrigger.attention import fit_attention_prior
from cellsight.models.cautrigger.core import CauTriggerBase
from cellsight.models.cautrigger.flow import latent_information_flow

__all__ = ["CauTrigger1L", "CauTrigger2L"]


class CauTrigger1L(CauTriggerBase):
    """One-layer causal decomposition: which features of ``adata.X`` trigger the state.

    A gate ``w`` per feature (or per cell, ``feature_mapper="attention"``) splits the input
    into a causal stream ``x * w`` encoded into ``z_c`` (``n_causal`` dims) and a spurious
    stream ``x * (1 - w)`` encoded into ``z_s`` (``n_latent - n_causal`` dims). A state
    classifier (DPD) reads the decoded representation; the *causal path* holds ``z_s`` at its
    mean, and training (reconstruction, KL, gate L1, classification of both paths, fidelity
    and information flow ``I(z_c; Y)`` up, ``I(z_s; Y)`` down) pushes the state information
    into ``z_c`` and so onto the gated features. See
    :mod:`cellsight.models.cautrigger.module` for the maths.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata` (features in ``X``, states in
        ``obs["labels"]`` by default).
    n_latent
        Latent dimensions in total.
    n_causal
        Causal latent dimensions (the rest are spurious).
    n_state
        Number of states (must match the labels).
    **model_kwargs
        ``n_hidden`` (64), ``n_layers`` (1), ``dropout_rate`` (0.1), ``feature_mapper``
        (``"gate"`` or ``"attention"``), ``gate_threshold`` (``False``), ``gate_init``
        (0.5), ``log1p`` (``True``), ``input_noise`` (1.0, denoising during training),
        ``seed`` (0).

    Notes
    -----
    :meth:`train` first sets the gates to a prior of its training cells (``prior="auto"``,
    the default: for 1L ``"pcr"``, principal-component logistic regression of the state on
    the features averaged over the number of components,
    :func:`~cellsight.models.cautrigger.priors.pcr_prior`; the seed's separate
    ``pretrain_attention`` step made automatic), and
    ``get_up_feature_weights(method="Ensemble")`` is the recommended ranking. On the
    planted-truth grid of ``benchmarks/cautrigger_grid.py`` (2 strengths x 2 dropout rates x
    5 seeds) the mean AUROC / AUPR of the 1L Ensemble is 0.959 / 0.820 with it (held-out
    data-set seeds 5-9: 0.916 / 0.767, random forest 0.853 / 0.738), 0.919 / 0.735
    with the DE prior (``prior="de"``) and 0.889 (SHAP) without a prior (``prior=None``); the
    random forest baseline reaches 0.925 / 0.793, a DE t-test 0.900 / 0.713.

    Feature scores (:meth:`get_up_feature_weights`) explain the causal-path probability of
    each cell's state through the engine :mod:`cellsight.interpret`; significance
    (:meth:`get_up_significance`) is its calibrated per-feature permutation test on held-out
    cells.
    """

    _two_layer = False

    # ------------------------------------------------------------------ attention prior
    def pretrain_attention(
        self,
        prior_probs: np.ndarray | None = None,
        max_epochs: int = 50,
        pretrain_lr: float = 1e-3,
        batch_size: int = 128,
        use_gpu: str | int | bool | None = None,
        train_size: float = 1.0,
        validation_size: float | None = None,
    ) -> pd.DataFrame:
        """Fit the feature gates (or the attention network) to prior probabilities.

        :meth:`train` does this itself with a prior of its training cells (``prior="auto"``,
        the default, or ``"de"``; with one gate per feature it sets the gates to the prior
        exactly, the minimum of this fit's loss); call this method for the seed's
        gradient fit, e.g. of the attention network, or another prior. Its default prior uses
        the states of all cells, held-out ones included, so the held-out cells that
        :meth:`get_up_significance` explains are no longer unseen (its permutation test may
        then be anti-conservative); prefer ``train(prior=...)``.

        Parameters
        ----------
        prior_probs
            Prior probability that each feature is causal: ``(features,)`` or ``(cells,
            features)``, values in [0, 1]. Default: from a differential-expression test of the
            states of all cells (see :func:`~cellsight.models.cautrigger.attention.de_prior`).
        max_epochs, pretrain_lr, batch_size, use_gpu, train_size, validation_size
            The (short) fit, through the shared training path; binary cross-entropy between
            the gates and the prior.

        Returns
        -------
        Per-epoch history of the fit.
        """
        return fit_attention_prior(
            self, prior_probs, max_epochs=max_epochs, lr=pretrain_lr, batch_size=batch_size,
            use_gpu=use_gpu, train_size=train_size, validation_size=validation_size,
        )

    # ------------------------------------------------------------------ scores
    def get_up_feature_weights(
        self,
        adata: AnnData | None = None,
        method: str = "SHAP",
        n_bg_samples: int = 100,
        grad_source: str = "prob",
        normalize: bool = True,
        sort_by_weight: bool = True,
        class_idx: int | None = None,
        background_data: np.ndarray | None = None,
        return_background: bool = False,
    ):
        """Feature weights: how much each (upstream) feature drives the causal-path prediction.

        Parameters
        ----------
        adata
            Cells to explain (default: the model's).
        method
            ``"Model"`` (the gates), ``"SHAP"`` (expected-gradient SHAP values), ``"Grad"``
            (input x gradient) or ``"Ensemble"`` (mean of the three, each normalised); see
            :mod:`cellsight.models.cautrigger.explain`.
        n_bg_samples
            Background cells for SHAP.
        grad_source
            Output explained by SHAP/Grad: ``"prob"`` (probability of the cell's state),
            ``"logit"`` (its log-odds) or ``"loss"`` (minus the cell's loss).
        normalize
            Scale the weights to sum to 1.
        sort_by_weight
            Sort the DataFrame by weight, largest first.
        class_idx
            Explain this state for every cell (default: each cell's observed state).
        background_data
            SHAP background rows (standardised inputs), instead of random cells.
        return_background
            Also return the SHAP background.

        Returns
        -------
        ``(weights_df, weights_full)``: a copy of ``var`` with a ``weight`` column, and the
        cells x features matrix of absolute per-cell weights (plus the background with
        ``return_background``).

        Notes
        -----
        These are the scores of one fit. When the signal is weak they vary from seed to seed;
        :func:`cellsight.models.cautrigger.ensemble_up_feature_weights` averages them over
        independent restarts (3 by default), which is what ``benchmarks/cautrigger_grid.py
        --restarts 3`` reports.
        """
        return explain.up_feature_weights(
            self, adata, method, n_bg_samples, grad_source, normalize, sort_by_weight,
            class_idx, background_data, return_background,
        )

    def get_up_significance(
        self,
        adata: AnnData | None = None,
        method: str = "Grad",
        test_mode: str = "permutation",
        perm_mode: str = "per_feature",
        n_perm: int = 1000,
        n_bg_samples: int = 100,
        grad_source: str = "logit",
        normalize: bool = False,
        class_idx: int | None = None,
        target_genes: Sequence[str] | None = None,
        fdr_correct: bool = True,
        use_signed: bool = True,
        show_progress: bool = True,
        random_state: int = 42,
        indices: Sequence[int] | np.ndarray | str | None = "held_out",
    ) -> tuple[pd.DataFrame, np.ndarray | None]:
        """Significance of each feature's weight, with Benjamini–Hochberg q-values.

        The statistic of feature j is the signed mean over cells of its attribution (input x
        gradient for ``"Grad"``, SHAP for ``"SHAP"``) to the causal-path probability of each
        cell's observed state: how much the feature supports the state the cell is in. The
        per-feature permutation test (:func:`cellsight.interpret.permutation_test`) shuffles
        feature j across the explained cells, recomputes the attributions and compares
        (one-sided, Besag–Clifford sequential p-values). Under "feature j is independent of
        the state and of the other features" it is exact, provided the explained cells were
        not used for fitting: by default the held-out cells of training.

        Why the defaults differ from the seed (``method="SHAP"``, ``perm_mode="global"``,
        ``n_perm=100``, all cells): the global mode pools standardised nulls of all features
        and is exact only under the global null (the engine's calibration test measures it
        conservative and missing true features); on training cells the model's fit to chance
        correlations makes any permutation test anti-conservative; per feature, 100
        permutations cannot reach q < 0.05 after BH over ~100 features (the smallest p-value
        is 1/101, so q >= 100 / (101 k) for k discoveries); SHAP inside a per-feature test
        costs ~50x the gradient; and the probability saturates for confidently classified
        cells, so its gradient has less power than that of the log-odds. The sign test
        (``test_mode="sign_test"``) is kept but is not a test of association (see
        :mod:`cellsight.interpret.significance`).

        Parameters
        ----------
        adata
            Cells to explain (default: the model's AnnData at ``indices``).
        method
            ``"Grad"`` (default) or ``"SHAP"``.
        test_mode
            ``"permutation"`` or ``"sign_test"``.
        perm_mode
            ``"per_feature"`` (calibrated) or ``"global"``.
        n_perm
            Maximum permutations per feature (features far from significance stop early).
        n_bg_samples
            SHAP background cells.
        grad_source
            ``"logit"`` (default: the log-odds of the cell's state), ``"prob"`` or ``"loss"``
            (see :meth:`get_up_feature_weights`). The seed explains the probability; its
            gradient vanishes for confidently classified cells, which costs power, and
            the log-odds does not saturate.
        normalize
            Scale the reported weights to sum to 1.
        class_idx
            Explain this state for every cell (default: each cell's observed state).
        target_genes
            Features to test (default all).
        fdr_correct
            Add BH q-values.
        use_signed
            Signed statistic (default) rather than the mean absolute attribution.
        show_progress
            Progress bar.
        random_state
            Seed of the permutations.
        indices
            ``"held_out"`` (default: the validation cells of training; all cells with a
            warning if there are none), ``None`` (all cells of ``adata``) or positions.

        Returns
        -------
        ``(df_result, perm_matrix)``: DataFrame with ``weight``, ``weight_signed``,
        ``pvalue``, ``qvalue`` (and ``n_perm``), and the null statistics (features x n_perm,
        NaN after a feature stopped; ``None`` for the sign test).
        """
        return explain.up_significance(
            self, adata, method, test_mode, perm_mode, n_perm, n_bg_samples, grad_source,
            normalize, class_idx, target_genes, fdr_correct, use_signed, show_progress,
            random_state, indices,
        )

    def compute_information_flow(
        self,
        adata: AnnData | None = None,
        dims: list[int] | None = None,
        zero_floor: bool = False,
        plot_info_flow: bool = True,
        skip_single_info: bool = True,
        save_fig: bool = False,
        save_dir: str | None = None,
        n_cells: int = 200,
        n_alpha: int = 25,
        n_beta: int = 100,
    ) -> tuple[pd.DataFrame, pd.Series]:
        """Information flow ``I(z_d; Y)`` from each latent dimension to the predicted state.

        Estimated by :func:`cellsight.interpret.information_flow.information_flow` on
        ``n_cells`` cells (dimension ``d`` drawn from the prior, the others from each cell's
        posterior), plus the totals of the causal and the spurious blocks.

        Parameters
        ----------
        adata
            Cells (default: the model's).
        dims
            Dimensions to measure (default all).
        zero_floor
            Subtract the smallest per-dimension flow.
        plot_info_flow
            Draw the bars (:func:`cellsight.plot.causal.information_flow_bars`); the figure
            is kept in ``model.info_flow_figure_``.
        skip_single_info
            Plot only the causal vs spurious totals.
        save_fig, save_dir
            Save the figure as ``information_flow.png`` in ``save_dir``.
        n_cells, n_alpha, n_beta
            Monte Carlo sizes.

        Returns
        -------
        ``(info_flow, info_flow_cat)``: per-dimension flows (``info_flow``, ``type``) and the
        causal / spurious totals, in nats.
        """
        return latent_information_flow(
            self, adata, dims, zero_floor, plot_info_flow, skip_single_info, save_fig,
            save_dir, n_cells, n_alpha, n_beta,
        )

    def get_input2z_ig(
        self, adata: AnnData | None = None, key: str = "prob", baseline=None
    ) -> np.ndarray:
        """Integrated Gradients of the latent posterior means w.r.t. the inputs.

        Parameters
        ----------
        adata
            Cells (default: the model's).
        key
            Kept for the seed's signature: ``"prob"`` or ``"mean"``, both the posterior means.
        baseline
            IG baseline in standardised input space (default zeros: the average cell).

        Returns
        -------
        ``(cells, features, n_latent)`` attributions (latent order ``[z_c, z_s]``).
        """
        return explain.input_to_z_ig(self, adata, key, baseline)

    def plot_train_losses(self, fig_size: tuple[float, float] = (8, 8)) -> Figure:
        """Train (and validation) curves of every loss term; returns the figure."""
        from cellsight.plot.causal import causal_train_losses

        return causal_train_losses(self.history, fig_size=fig_size)


class CauTrigger2L(CauTrigger1L):
    """Two-layer causal decomposition: upstream features (``adata.X``) -> downstream features
    (``adata.obsm["X_down"]``) -> state.

    As :class:`CauTrigger1L`, plus a decoder of the downstream features from ``[z_c, z_s]``;
    the DPD predicts the state from the decoded downstream features, so upstream features
    score high when they move the downstream features that decide the state.

    Parameters
    ----------
    adata
        AnnData set up with :meth:`setup_anndata`; downstream names from
        ``adata.uns["X_down_feature"]``, the columns of a DataFrame in ``obsm``, or
        ``down_feature_names=``.
    n_latent, n_causal, n_state, **model_kwargs
        As in :class:`CauTrigger1L` (plus ``down_feature_names``).

    Notes
    -----
    :meth:`train` first sets the gates to the cascade prior of its training cells
    (``prior="auto"``, the default, is ``"cascade"``:
    :func:`~cellsight.models.cautrigger.priors.cascade_prior`, a two-stage linear fit
    state ~ downstream, downstream ~ upstream, that keeps upstream features reaching the state
    only through the downstream features the state reads), and
    ``get_up_feature_weights(method="Ensemble")`` is the recommended ranking. On the
    planted-truth grid of ``benchmarks/cautrigger_grid.py`` (20 data sets) the mean AUROC /
    AUPR of the 2L Ensemble is 0.965 / 0.861 with it, 0.922 / 0.748 with the DE prior
    (``prior="de"``) and 0.893 / 0.741 with the seed's behaviour (``prior=None``); the random
    forest baseline reaches 0.925 / 0.793 (held-out data-set seeds 5-9: 0.942 / 0.820 against
    0.853 / 0.738). ``prior="pcr"`` (upstream features only) gives 0.958 / 0.819 (seeds 5-9:
    0.919 / 0.772) at a fraction of the cost: the cascade fits one cross-validated lasso per
    downstream feature the state model uses, 2.3 s for 800 cells x 100 upstream x 50
    downstream features (38 used) but 169 s for 3,000 x 500 x 300 (63 used), where pcr takes
    0.3 s; prefer it for large data. The upstream reconstruction weight did not matter
    with the DE prior (``up_weight=0.1`` against 1.0: 0.919 / 0.751 against 0.920 / 0.748),
    so the seed's ``up_weight=1`` is kept.
    """

    _two_layer = True
    _default_prior = "cascade"

    def get_2to1_ig(
        self,
        adata: AnnData | None = None,
        key: str = "prob",
        celltype: str | None = None,
        baseline=None,
    ) -> np.ndarray:
        """Integrated Gradients of each decoded downstream feature w.r.t. each upstream one.

        Parameters
        ----------
        adata
            Cells (default: the model's).
        key
            ``"prob"``: through the causal path (``z_s`` at its mean); ``"full"``: the full
            model.
        celltype
            Only cells with this ``obs["celltype"]`` (``None``/``"all"``: all).
        baseline
            IG baseline in standardised input space (default zeros: the average cell).

        Returns
        -------
        ``(cells, n_up, n_down)`` attributions.
        """
        return explain.two_to_one_ig(self, adata, key, celltype, baseline)
