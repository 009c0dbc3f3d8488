"""Significance of feature attributions: sign test, permutation tests, Benjamini–Hochberg.

Which test answers which question
---------------------------------
*Sign test* (:func:`sign_test`): "is feature j's attribution consistently positive (or
negative) across cells?" Null: each cell's attribution is positive or negative with
probability 1/2, independently across cells. It is cheap and exact for that null, but the null
is about the *model's* behaviour, not about the data: a noise feature that the trained model
uses with a small, fixed-sign weight (every fitted model has some) gets tiny p-values once
there are enough cells, and with a zero baseline and non-negative counts every used feature
has the sign of its weight in every cell. Use it to ask whether a direction of effect is
consistent across cells, not whether a feature is linked to the outcome.

*Permutation test* (:func:`permutation_test`): "is feature j's importance larger than it
would be if feature j were unrelated to everything else the explained function sees?" Each
permutation shuffles feature j's values across cells, which breaks its link with the other
features, with the fixed inputs (labels, batch, covariates given as additional forward args)
and with per-cell targets, and the attributions are recomputed with the same model, baseline
and target. ``perm_mode="per_feature"`` does this one feature at a time: under the null that
feature j is independent of the other inputs and of the fixed inputs/targets, the observed and
permuted data are exchangeable and the p-value is exact, *provided the model was not fitted on
the explained cells* (explain held-out cells: a model fitted on them has aligned its weights
with their chance correlations, which the permuted copies do not share, and the test becomes
anti-conservative). ``perm_mode="global"`` shuffles all features at once per permutation (one
attribution pass per permutation instead of one per feature and permutation) and pools the
standardised null statistics of all features; it is exact only for the global null (no
feature linked to anything) and approximate per feature.

For the test to measure the feature–target link, the explained quantity must involve the
target: explain each cell's probability of its *observed* class (``target=`` the label codes)
or the loss, and use the signed statistic (``use_signed=True``). Attributions of a fixed class
or of an unsupervised output (a latent dimension) have the same distribution after the
shuffle unless the feature's effect depends on the other features, so such a test mostly
finds interactions. Genes are correlated: a feature that is only a proxy of a causal one is
linked to the outcome and will be significant; the test is marginal, not conditional.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import binom, false_discovery_control

from cellsight.interpret.attribute import attribute
from cellsight.interpret.batching import (
    DEFAULT_MAX_BATCH_ELEMENTS,
    as_tensor,
    format_forward_args,
    progress,
    repeat_rows,
    resolve_baselines,
    take_forward_args,
)
from cellsight.interpret.rank import as_attribution_array

__all__ = ["fdr_bh", "feature_weights", "sign_test", "permutation_test", "SequentialPValue"]

_ALTERNATIVES = ("two-sided", "greater", "less")


def fdr_bh(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg q-values (``scipy.stats.false_discovery_control``); NaN stays NaN."""
    p = np.asarray(pvalues, dtype=np.float64)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q


def feature_weights(
    attributions: np.ndarray, normalize: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature weights: mean |attribution| and signed mean over cells.

    With ``normalize`` both are divided by the sum of the absolute weights (weights sum to 1).
    """
    weight = np.abs(attributions).mean(0)
    signed = attributions.mean(0)
    if normalize:
        total = weight.sum()
        if total > 0:
            weight, signed = weight / total, signed / total
    return weight, signed


def sign_test(
    attributions: np.ndarray | pd.DataFrame,
    var_names: Sequence[str] | None = None,
    *,
    fdr: bool = True,
    normalize: bool = False,
) -> pd.DataFrame:
    """Binomial sign-consistency test of each feature's attributions across cells.

    Null hypothesis: for feature j, each cell's attribution is positive or negative with
    probability 1/2, independently of the other cells (cells with a zero attribution are
    dropped). Two-sided exact binomial test. Valid when cells are independent draws; it tests
    the consistency of the attribution's sign, *not* the feature's link to the outcome, and is
    not calibrated as a test of the latter (see the module notes): prefer
    :func:`permutation_test` to call features associated with a label.

    Parameters
    ----------
    attributions
        Cells x features.
    var_names
        Feature names (default: DataFrame columns or positions).
    fdr
        Add Benjamini–Hochberg q-values.
    normalize
        Scale the weights to sum to 1.

    Returns
    -------
    DataFrame indexed by feature with ``weight`` (mean |attribution|), ``weight_signed``
    (mean attribution), ``pvalue``, ``qvalue`` (with ``fdr``), ``n_positive``, ``n_negative``.
    """
    a, names = as_attribution_array(attributions, var_names)
    if a.ndim != 2:
        raise ValueError("sign_test takes cells x features attributions (one output).")
    pos = (a > 0).sum(0)
    neg = (a < 0).sum(0)
    m = pos + neg
    # for p = 1/2 the two-sided exact p-value is twice the smaller tail
    p = np.minimum(1.0, 2.0 * binom.cdf(np.minimum(pos, neg), np.maximum(m, 1), 0.5))
    p[m == 0] = 1.0
    weight, signed = feature_weights(a, normalize)
    df = pd.DataFrame({"weight": weight, "weight_signed": signed, "pvalue": p}, index=names)
    if fdr:
        df["qvalue"] = fdr_bh(p)
    df["n_positive"] = pos
    df["n_negative"] = neg
    return df


class SequentialPValue:
    """Monte Carlo permutation p-value of one feature, with optional sequential stopping.

    One-sided (``"greater"``/``"less"``): p = (1 + #{null as extreme}) / (1 + K) after K
    permutations; with ``min_exceedances=h`` the feature stops at the L-th permutation that
    makes h null statistics as extreme as the observed one, and p = h / L (Besag & Clifford
    1991, *Biometrika* 78: exact, and features far from significance stop after a few dozen
    permutations). Two-sided: twice the smaller one-sided p-value, capped at 1 (each side
    stops on its own; valid by Bonferroni).
    """

    def __init__(
        self, obs: float, alternative: str, n_perm: int, min_exceedances: int | None, tol: float
    ) -> None:
        self.obs = float(obs)
        self.sides = {"two-sided": ("ge", "le"), "greater": ("ge",), "less": ("le",)}[
            alternative
        ]
        self.n_perm = n_perm
        self.h = min_exceedances
        self.tol = tol
        self.count = dict.fromkeys(self.sides, 0)
        self.stopped_at: dict[str, int | None] = dict.fromkeys(self.sides, None)
        self.seen = 0

    @property
    def done(self) -> bool:
        return self.seen >= self.n_perm or all(v is not None for v in self.stopped_at.values())

    def update(self, values: np.ndarray) -> None:
        """Add null statistics, in permutation order."""
        for v in values:
            if self.done:
                return
            self.seen += 1
            for side in self.sides:
                if self.stopped_at[side] is not None:
                    continue
                hit = v >= self.obs - self.tol if side == "ge" else v <= self.obs + self.tol
                if hit:
                    self.count[side] += 1
                    if self.h is not None and self.count[side] >= self.h:
                        self.stopped_at[side] = self.seen

    def pvalue(self) -> float:
        ps = []
        for side in self.sides:
            stop = self.stopped_at[side]
            if stop is not None:
                ps.append(self.count[side] / stop)
            else:
                ps.append((self.count[side] + 1.0) / (self.seen + 1.0))
        return min(1.0, 2.0 * min(ps)) if len(ps) == 2 else ps[0]


def _pooled_pvalues(obs: np.ndarray, null: np.ndarray, alternative: str) -> np.ndarray:
    """p-values against the pooled null of all features, each standardised by its own null."""
    mu = null.mean(1)
    sd = null.std(1, ddof=1) if null.shape[1] > 1 else np.zeros_like(mu)
    live = sd > 1e-12 * np.maximum(np.abs(null).max(1), 1e-300)
    p = np.ones_like(obs)
    if not live.any():
        return p
    z_null = ((null[live] - mu[live, None]) / sd[live, None]).ravel()
    z_obs = np.zeros_like(obs)
    z_obs[live] = (obs[live] - mu[live]) / sd[live]
    if alternative == "two-sided":
        z_null, z_obs = np.abs(z_null), np.abs(z_obs)
    elif alternative == "less":
        z_null, z_obs = -z_null, -z_obs
    pool = np.sort(z_null)
    n_ge = pool.size - np.searchsorted(pool, z_obs - 1e-12, side="left")
    p[live] = (1.0 + n_ge[live]) / (1.0 + pool.size)
    # a constant null the observation departs from is as extreme as the pool allows
    dead_off = ~live & (np.abs(obs - mu) > 1e-12 * np.maximum(np.abs(mu), 1e-300))
    p[dead_off] = 1.0 / (1.0 + pool.size)
    return p


def _feature_positions(features, var_names: pd.Index, g: int) -> np.ndarray:
    if features is None:
        return np.arange(g)
    pos = []
    for f in features:
        if isinstance(f, int | np.integer):
            if not 0 <= f < g:
                raise ValueError(f"feature index {f} is outside 0..{g - 1}.")
            pos.append(int(f))
        else:
            hits = np.flatnonzero(var_names == str(f))
            if hits.size == 0:
                raise ValueError(f"feature {f!r} is not among the var_names; check the spelling.")
            pos.append(int(hits[0]))
    return np.asarray(pos, dtype=np.int64)


def permutation_test(
    forward: Callable[..., torch.Tensor],
    inputs: torch.Tensor | np.ndarray,
    *,
    method: str = "ig",
    target: Any = None,
    baselines: Any = None,
    additional_forward_args: Any = None,
    attributions: np.ndarray | None = None,
    perm_mode: str = "per_feature",
    n_perm: int = 1000,
    min_exceedances: int | None = 10,
    features: Sequence[int | str] | None = None,
    var_names: Sequence[str] | None = None,
    use_signed: bool = True,
    alternative: str = "two-sided",
    normalize: bool = False,
    fdr: bool = True,
    n_background: int = 100,
    seed: int = 0,
    max_batch_elements: int = DEFAULT_MAX_BATCH_ELEMENTS,
    show_progress: bool = False,
    return_null: bool = False,
    **attribute_kwargs: Any,
) -> pd.DataFrame | tuple[pd.DataFrame, np.ndarray]:
    """Permutation test of feature importance that recomputes attributions under the null.

    The importance of feature j is the mean over cells of its attributions (signed, or
    absolute with ``use_signed=False``). Each permutation shuffles feature j's values across
    cells, keeps everything else (other features in ``per_feature`` mode, the additional
    forward args, per-cell targets, the baselines) and recomputes the attributions with the
    same model and settings. See the module notes for the null hypotheses: ``per_feature`` is
    exact under "feature j is independent of the other inputs and the fixed inputs/targets"
    when the explained cells were not used to fit the model; ``global`` (all features shuffled
    per permutation, standardised nulls pooled across features) is cheaper and approximate.

    Parameters
    ----------
    forward, inputs, method, target, baselines, additional_forward_args
        As in :func:`cellsight.interpret.attribute`. ``target`` must select one output per
        cell (an index or one index per cell, e.g. each cell's observed class).
        ``baselines`` are resolved once on the unpermuted inputs.
    attributions
        Observed attributions computed with exactly these settings (recomputed if ``None``).
    perm_mode
        ``"per_feature"`` (one shuffled feature per recomputation) or ``"global"``.
    n_perm
        Permutations (at most, per feature, with ``min_exceedances``). One-sided p-values are
        at least ``1 / (n_perm + 1)`` (two-sided: twice that), so with Benjamini–Hochberg over
        m features a discovery needs ``n_perm`` well above ``m / 0.05``.
    min_exceedances
        ``per_feature`` only: stop permuting a feature once this many null statistics are as
        extreme as the observed one (Besag–Clifford sequential p-value, exact; see
        :class:`SequentialPValue`). ``None`` always runs ``n_perm``.
    features
        Features to test (indices or names; default all). In ``per_feature`` mode the cost is
        ``len(features) x n_perm`` attribution passes.
    var_names
        Feature names for the output index.
    use_signed
        Test the signed mean attribution (default) rather than the mean absolute one.
    alternative
        ``"greater"``: the importance is larger than under the null (for the signed
        attribution of each cell's observed class: the feature helps predict it), ``"less"``,
        or ``"two-sided"`` (twice the smaller one-sided p-value in ``per_feature`` mode).
    normalize
        Scale the reported weights to sum to 1.
    fdr
        Add Benjamini–Hochberg q-values over the tested features.
    n_background
        Background size when ``baselines`` is ``"background"`` (or the gs/shap default).
    seed
        Seeds the permutations and every random draw.
    max_batch_elements
        Memory budget of one stacked block of permuted copies (numbers).
    show_progress
        Progress bar over features (``per_feature``) or permutations (``global``).
    return_null
        Also return the null statistics, ``(features, n_perm)``.
    attribute_kwargs
        Other :func:`~cellsight.interpret.attribute` arguments (``n_steps``, ...).

    Returns
    -------
    DataFrame indexed by feature with ``weight`` (mean |attribution|), ``weight_signed``
    (mean attribution), ``pvalue``, ``qvalue`` and ``n_perm`` (permutations used); with
    ``return_null`` also the null statistics ``(features, n_perm)`` (NaN after a feature
    stopped).
    """
    if perm_mode not in ("per_feature", "global"):
        raise ValueError(f"perm_mode={perm_mode!r} must be 'per_feature' or 'global'.")
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r} must be one of {list(_ALTERNATIVES)}.")
    if n_perm < 1:
        raise ValueError(f"n_perm={n_perm} must be at least 1.")
    if min_exceedances is not None and min_exceedances < 1:
        raise ValueError(f"min_exceedances={min_exceedances} must be at least 1 (or None).")
    if isinstance(target, list | tuple | str):
        raise ValueError(
            "permutation_test explains one output per cell: pass target= an index or one index "
            "per cell, not a list or 'all'."
        )
    x = as_tensor(inputs, attribute_kwargs.get("device")).detach()
    if x.dim() != 2:
        raise ValueError(f"permutation_test takes cells x features inputs; got {tuple(x.shape)}.")
    n, g = x.shape
    names = pd.Index([str(v) for v in var_names]) if var_names is not None else pd.Index(
        [str(i) for i in range(g)]
    )
    if len(names) != g:
        raise ValueError(f"{len(names)} var_names for {g} features; pass one name per feature.")
    feats = _feature_positions(features, names, g)
    base = resolve_baselines(x, baselines, method, n_background=n_background, seed=seed)
    args, per_cell = format_forward_args(additional_forward_args, n)
    per_cell_target = target is not None and np.ndim(
        target.cpu().numpy() if isinstance(target, torch.Tensor) else target
    ) == 1
    kw = dict(method=method, seed=seed, max_batch_elements=max_batch_elements, **attribute_kwargs)

    def explain(x_rep: torch.Tensor, r: int) -> np.ndarray:
        b = repeat_rows(base, r) if base is not None and base.shape[0] == n and method != "gs" \
            and method != "shap" and n > 1 else base
        t = target
        if per_cell_target:
            t = np.tile(np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target), r)
        fargs = take_forward_args(args, per_cell, slice(None), r) if args else None
        return attribute(forward, x_rep, baselines=b, target=t, additional_forward_args=fargs,
                         **kw)

    if attributions is None:
        attributions = explain(x, 1)
    obs_a, _ = as_attribution_array(attributions, names)
    if obs_a.shape != (n, g):
        raise ValueError(
            f"attributions have shape {obs_a.shape}, expected {(n, g)} (cells x features)."
        )

    def stat(a_rn: np.ndarray) -> np.ndarray:
        return (a_rn if use_signed else np.abs(a_rn)).mean(1)

    obs_stat = (obs_a if use_signed else np.abs(obs_a)).mean(0)
    block = int(max(1, min(n_perm, max_batch_elements // max(1, n * g))))
    null = np.empty((len(feats), n_perm), dtype=np.float64)
    if perm_mode == "per_feature":
        tol = 1e-6 * (float(np.abs(obs_a).mean()) + 1e-30)
        first = max(16, 2 * (min_exceedances or 8))
        pvals = np.empty(len(feats))
        used = np.zeros(len(feats), dtype=np.int64)
        null[:] = np.nan
        bar = progress(len(feats), "permutation test (per feature)", show_progress)
        for fi, j in enumerate(feats):
            rng = np.random.default_rng([seed, int(j)])
            seq = SequentialPValue(obs_stat[j], alternative, n_perm, min_exceedances, tol)
            r = min(first, block)
            while not seq.done:
                r = min(r, n_perm - seq.seen)
                perms = np.argsort(rng.random((r, n)), axis=1)
                x_rep = repeat_rows(x, r).clone()
                x_rep[:, j] = x[torch.as_tensor(perms.ravel(), device=x.device), j]
                values = stat(explain(x_rep, r)[:, j].reshape(r, n))
                null[fi, seq.seen : seq.seen + r] = values
                seq.update(values)
                r = min(2 * r, block)
            pvals[fi], used[fi] = seq.pvalue(), seq.seen
            bar.update(1)
        bar.close()
    else:
        rng = np.random.default_rng(seed)
        bar = progress(n_perm, "permutation test (global)", show_progress)
        for start in range(0, n_perm, block):
            r = min(block, n_perm - start)
            idx = torch.as_tensor(np.argsort(rng.random((r, n, g)), axis=1))
            x_rep = torch.gather(x.unsqueeze(0).expand(r, n, g), 1, idx.to(x.device))
            a = explain(x_rep.reshape(r * n, g), r).reshape(r, n, g)
            null[:, start : start + r] = (a if use_signed else np.abs(a)).mean(1)[:, feats].T
            bar.update(r)
        bar.close()
        pvals = _pooled_pvalues(obs_stat[feats], null, alternative)
        used = np.full(len(feats), n_perm)
    weight, signed = feature_weights(obs_a, normalize)
    df = pd.DataFrame(
        {"weight": weight[feats], "weight_signed": signed[feats], "pvalue": pvals},
        index=names[feats],
    )
    if fdr:
        df["qvalue"] = fdr_bh(pvals)
    df["n_perm"] = used
    return (df, null) if return_null else df
