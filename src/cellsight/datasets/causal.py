"""A planted-truth causal cascade: upstream features -> downstream features -> cell state.

:func:`simulate_causal_cascade` draws counts in which a few upstream features (think
transcription factors) drive a few downstream features (their targets) that decide the cell's
state, while other upstream and downstream features are correlated with the state only
through a hidden confounder. The truth is written to ``var`` and nowhere else.

Generative process (all draws from one ``numpy.random.Generator`` seeded with ``seed``)
---------------------------------------------------------------------------------------
1. **Confounder.** ``u_n ~ N(0, 1)`` per cell (not returned).
2. **Programs.** ``n_causal_latent`` causal programs ``c_nk = r u_n + sqrt(1 - r^2) e_nk`` and
   ``n_spurious_latent`` spurious programs ``s_nk = r u_n + sqrt(1 - r^2) e'_nk`` with
   ``r = confounding`` (so ``corr(c_k, s_l) = r^2``), and ``n_noise_latent`` noise programs
   ``m_nk ~ N(0, 1)`` independent of everything.
3. **Upstream activity** (log scale). Each upstream feature belongs to one program (causal,
   spurious or noise; programs assigned round robin) and has activity
   ``a_ng = load_g * program_n + bio_noise * xi_ng`` with ``|load_g| ~ U(0.6, 1.0)``, a random
   sign, and feature-specific biological variation ``xi_ng ~ N(0, 1)``. Every upstream feature
   has the same kind of marginal distribution whatever its role (no variance leak).
4. **Downstream activity.** Each downstream feature has 1-3 upstream parents of its own kind
   (causal downstream features have causal upstream parents, spurious ones spurious parents,
   noise ones noise parents); every causal upstream feature is a parent of at least one causal
   downstream feature. ``d_nd = sum_parents W_dg tanh(a_ng) + bio_noise * xi_nd`` with
   ``|W_dg| ~ U(0.7, 1.2)`` (tanh: a saturating, Hill-like response). Signs are random, but
   drawn so that the paths from one causal upstream feature to the state do not cancel
   (``sign W_dg = sign v_d * s_g`` with a random sign ``s_g`` per upstream feature; for
   ``n_state > 2`` this holds for the first state score): every causal feature has an effect.
5. **State.** From the standardised causal downstream activities ``d~``: for two states
   ``logit_n = causal_strength * sum_d v_d d~_nd / sqrt(n_down_causal)`` (``|v_d| ~
   U(0.5, 1)``, random signs) and ``y ~ Bernoulli(sigmoid(logit + log prior odds))``; for
   ``n_state > 2`` one such score per state (independent ``v_dc``) and
   ``y ~ Categorical(softmax(logits + log state_proportions))``. The state depends on
   nothing else: given the causal features, the spurious ones are independent of it, but they
   correlate with it through ``u``.
6. **Counts.** ``x_ng ~ NB(mean = size_n * exp(base_g + a_ng), inverse dispersion
   dispersion)`` (Gamma-Poisson), with ``base_g ~ N(log(mean_expression), 0.5)`` and cell size
   factors ``size_n ~ LogNormal(0, 0.25)``; the same for downstream features with ``d_nd``.
   With ``dropout > 0`` every count is set to zero independently with that probability.

Features are placed in random order within each layer and named ``up_000``, ...,
``down_000``, ... so neither position nor name says anything about the role.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

__all__ = ["simulate_causal_cascade", "split_cascade"]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"simulate_causal_cascade: {message}")


def _programs(rng, n, k, r, u):
    return r * u[:, None] + np.sqrt(1.0 - r**2) * rng.standard_normal((n, k))


def _signed_uniform(rng, low, high, size):
    return rng.uniform(low, high, size) * rng.choice([-1.0, 1.0], size)


def _nb_counts(rng, mean_ng, theta, dropout):
    rate = rng.gamma(theta, mean_ng / theta) if theta is not None else mean_ng
    x = rng.poisson(rate).astype(np.float32)
    if dropout > 0:
        x[rng.random(x.shape) < dropout] = 0.0
    return x


def _assign_parents(rng, n_child, parent_pool, cover):
    """1-3 parents per child from ``parent_pool``; with ``cover`` every parent has a child."""
    parents = [
        list(rng.choice(parent_pool, size=min(len(parent_pool), rng.integers(1, 4)),
                        replace=False))
        for _ in range(n_child)
    ]
    if cover and n_child > 0:
        for g in parent_pool:
            if not any(g in p for p in parents):
                parents[int(rng.integers(n_child))].append(g)
    return parents


def simulate_causal_cascade(
    n_cells: int = 1000,
    n_up: int = 100,
    n_down: int = 50,
    *,
    n_up_causal: int = 10,
    n_up_spurious: int = 20,
    n_down_causal: int = 10,
    n_down_spurious: int = 10,
    n_causal_latent: int = 2,
    n_spurious_latent: int = 2,
    n_noise_latent: int = 3,
    n_state: int = 2,
    causal_strength: float = 3.0,
    confounding: float = 0.8,
    bio_noise: float = 0.5,
    dropout: float = 0.0,
    mean_expression: float = 8.0,
    dispersion: float | None = 5.0,
    state_proportions: Sequence[float] | None = None,
    labels_key: str = "labels",
    seed: int = 0,
) -> AnnData:
    """Simulate a causal cascade upstream -> downstream -> state with a hidden confounder.

    The generative process is described in :mod:`cellsight.datasets.causal`.

    Parameters
    ----------
    n_cells
        Cells.
    n_up, n_down
        Upstream and downstream features.
    n_up_causal, n_up_spurious
        Upstream features driven by the causal / spurious programs (the rest: noise programs).
    n_down_causal, n_down_spurious
        Downstream features with causal / spurious upstream parents (the rest: noise).
    n_causal_latent, n_spurious_latent, n_noise_latent
        Numbers of causal, spurious and noise programs.
    n_state
        Number of states (``obs[labels_key]``: ``"state_0"``, ``"state_1"``, ...).
    causal_strength
        Scale of the state logits: how strongly the causal downstream features decide the
        state (0: the state is a coin flip).
    confounding
        ``r`` in step 2: correlation of every program with the confounder; spurious features
        correlate with the state more as it grows (``0``: no confounding).
    bio_noise
        Standard deviation of each feature's own biological variation (log scale).
    dropout
        Probability that a count is set to zero (technical dropout), in ``[0, 1)``.
    mean_expression
        Typical mean count of a feature (median of ``exp(base_g)``).
    dispersion
        NB inverse dispersion ``theta`` (``None``: Poisson).
    state_proportions
        Prior state proportions (default equal); e.g. ``(0.8, 0.2)`` for imbalanced states.
    labels_key
        ``obs`` column of the state.
    seed
        Seed of every draw.

    Returns
    -------
    AnnData with integer-valued float32 counts ``X`` (cells x ``n_up + n_down``), the state in
    ``obs[labels_key]`` (categorical) and the truth in ``var``: ``layer`` (``"upstream"`` or
    ``"downstream"``), ``role`` (``"causal"``, ``"spurious"``, ``"noise"``), ``is_causal``
    (``role == "causal"``), ``program`` (the program an upstream feature belongs to) and
    ``parents`` (comma-separated upstream parents of a downstream feature). Use
    :func:`split_cascade` to get the upstream AnnData with ``obsm["X_down"]`` for
    :class:`~cellsight.models.CauTrigger2L`.
    """
    _check(n_cells >= 2, f"n_cells={n_cells} must be at least 2.")
    _check(n_state >= 2, f"n_state={n_state} must be at least 2.")
    _check(0 < n_up_causal and n_up_causal + n_up_spurious <= n_up,
           f"need 0 < n_up_causal and n_up_causal + n_up_spurious <= n_up (got "
           f"{n_up_causal} + {n_up_spurious} > {n_up}).")
    _check(0 < n_down_causal and n_down_causal + n_down_spurious <= n_down,
           f"need 0 < n_down_causal and n_down_causal + n_down_spurious <= n_down (got "
           f"{n_down_causal} + {n_down_spurious} > {n_down}).")
    _check(n_up_spurious == 0 or n_spurious_latent > 0,
           "spurious upstream features need n_spurious_latent >= 1.")
    _check(n_up_causal + n_up_spurious == n_up or n_noise_latent > 0,
           "noise upstream features need n_noise_latent >= 1.")
    _check(n_causal_latent >= 1, f"n_causal_latent={n_causal_latent} must be at least 1.")
    _check(0.0 <= confounding < 1.0, f"confounding={confounding} must be in [0, 1).")
    _check(0.0 <= dropout < 1.0, f"dropout={dropout} must be in [0, 1).")
    _check(causal_strength >= 0, f"causal_strength={causal_strength} must be >= 0.")
    _check(mean_expression > 0, f"mean_expression={mean_expression} must be > 0.")
    _check(dispersion is None or dispersion > 0, f"dispersion={dispersion} must be > 0.")
    if state_proportions is None:
        props = np.full(n_state, 1.0 / n_state)
    else:
        props = np.asarray(state_proportions, dtype=np.float64)
        _check(props.shape == (n_state,) and (props > 0).all(),
               f"state_proportions needs {n_state} positive values; got {list(props)}.")
        props = props / props.sum()
    rng = np.random.default_rng(seed)
    n = n_cells

    # 1-2. confounder and programs
    u = rng.standard_normal(n)
    progs = {
        "causal": _programs(rng, n, n_causal_latent, confounding, u),
        "spurious": _programs(rng, n, max(n_spurious_latent, 1), confounding, u),
        "noise": rng.standard_normal((n, max(n_noise_latent, 1))),
    }

    # 3. upstream activity
    n_up_noise = n_up - n_up_causal - n_up_spurious
    up_role = np.array(["causal"] * n_up_causal + ["spurious"] * n_up_spurious
                       + ["noise"] * n_up_noise)
    up_prog = np.empty(n_up, dtype=object)
    act_up = np.empty((n, n_up))
    for role in ("causal", "spurious", "noise"):
        idx = np.flatnonzero(up_role == role)
        k = progs[role].shape[1]
        for i, g in enumerate(idx):
            load = _signed_uniform(rng, 0.6, 1.0, None)
            act_up[:, g] = load * progs[role][:, i % k] + bio_noise * rng.standard_normal(n)
            up_prog[g] = f"{role}_{i % k}"

    # 4. downstream activity
    n_down_noise = n_down - n_down_causal - n_down_spurious
    down_role = np.array(["causal"] * n_down_causal + ["spurious"] * n_down_spurious
                         + ["noise"] * n_down_noise)
    parents = [None] * n_down
    for role in ("causal", "spurious", "noise"):
        kids = np.flatnonzero(down_role == role)
        pool = np.flatnonzero(up_role == role)
        if len(kids) == 0:
            continue
        _check(len(pool) > 0, f"{len(kids)} {role} downstream features but no {role} "
               "upstream features to be their parents.")
        for d, ps in zip(kids, _assign_parents(rng, len(kids), pool, cover=role == "causal")):
            parents[d] = sorted(int(p) for p in ps)
    # state weights of the causal downstream features (one column per state score)
    n_scores = 1 if n_state == 2 else n_state
    v = _signed_uniform(rng, 0.5, 1.0, (n_down_causal, n_scores))
    v_of = dict(zip(np.flatnonzero(down_role == "causal"), v))
    up_sign = rng.choice([-1.0, 1.0], n_up)
    act_down = np.empty((n, n_down))
    for d in range(n_down):
        w = rng.uniform(0.7, 1.2, len(parents[d]))
        if d in v_of:  # paths from one upstream feature to the (first) state score agree
            w = w * np.sign(v_of[d][0]) * up_sign[parents[d]]
        else:
            w = w * rng.choice([-1.0, 1.0], len(parents[d]))
        act_down[:, d] = np.tanh(act_up[:, parents[d]]) @ w + bio_noise * rng.standard_normal(n)

    # 5. state from the standardised causal downstream activities only
    causal_down = act_down[:, down_role == "causal"]
    z = (causal_down - causal_down.mean(0)) / (causal_down.std(0) + 1e-12)
    scale = causal_strength / np.sqrt(z.shape[1])
    if n_state == 2:
        logits = np.stack([np.zeros(n), scale * (z @ v[:, 0])], axis=1)
    else:
        logits = scale * (z @ v)
    logits = logits + np.log(props)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)
    y = np.minimum(y, n_state - 1)

    # 6. counts
    size = np.exp(0.25 * rng.standard_normal(n))[:, None]
    log_mean = np.log(mean_expression)
    base_up = rng.normal(log_mean, 0.5, n_up)
    base_down = rng.normal(log_mean, 0.5, n_down)
    x_up = _nb_counts(rng, size * np.exp(base_up + act_up), dispersion, dropout)
    x_down = _nb_counts(rng, size * np.exp(base_down + act_down), dispersion, dropout)

    # random order within each layer; names carry no information
    perm_up, perm_down = rng.permutation(n_up), rng.permutation(n_down)
    up_names = np.array([f"up_{i:03d}" for i in range(n_up)])
    down_names = np.array([f"down_{i:03d}" for i in range(n_down)])
    name_of_up = np.empty(n_up, dtype=object)
    name_of_up[perm_up] = up_names  # original upstream index -> its name
    var_up = pd.DataFrame({
        "layer": "upstream",
        "role": up_role[perm_up],
        "program": up_prog[perm_up],
        "parents": "",
    }, index=up_names)
    var_down = pd.DataFrame({
        "layer": "downstream",
        "role": down_role[perm_down],
        "program": "",
        "parents": [",".join(sorted(name_of_up[p] for p in parents[d])) for d in perm_down],
    }, index=down_names)
    var = pd.concat([var_up, var_down])
    var["is_causal"] = var["role"] == "causal"
    for col in ("layer", "role"):
        var[col] = pd.Categorical(var[col])
    x = np.concatenate([x_up[:, perm_up], x_down[:, perm_down]], axis=1)
    states = [f"state_{c}" for c in range(n_state)]
    obs = pd.DataFrame(
        {labels_key: pd.Categorical([states[c] for c in y], categories=states)},
        index=[f"cell_{i:05d}" for i in range(n)],
    )
    adata = AnnData(X=x, obs=obs, var=var)
    adata.uns["simulation"] = {
        "generator": "simulate_causal_cascade",
        "causal_strength": float(causal_strength),
        "confounding": float(confounding),
        "dropout": float(dropout),
        "seed": int(seed),
    }
    return adata


def split_cascade(
    adata: AnnData,
    down_features: Sequence[str] | None = None,
    down_key: str = "X_down",
) -> AnnData:
    """The upstream layer of a cascade with its downstream features in ``obsm``.

    Parameters
    ----------
    adata
        Output of :func:`simulate_causal_cascade` (or any AnnData with ``var["layer"]``
        holding ``"upstream"`` / ``"downstream"``).
    down_features
        Downstream features to keep (default: all of them).
    down_key
        ``obsm`` key of the downstream matrix.

    Returns
    -------
    A new AnnData of the upstream features (``var`` with the truth columns), the same ``obs``,
    the downstream counts in ``obsm[down_key]`` and their names in
    ``uns[down_key + "_feature"]`` (``"X_down_feature"`` by default, CauTrigger's key).
    """
    if "layer" not in adata.var:
        raise ValueError(
            "adata.var has no 'layer' column; pass the output of simulate_causal_cascade or "
            "add var['layer'] with 'upstream' / 'downstream'."
        )
    up = (adata.var["layer"] == "upstream").to_numpy()
    down = (adata.var["layer"] == "downstream").to_numpy()
    if down_features is not None:
        names = pd.Index([str(f) for f in down_features])
        missing = names.difference(adata.var_names[down])
        if len(missing):
            raise ValueError(
                f"down_features has {len(missing)} name(s) that are not downstream features "
                f"({list(missing[:5])})."
            )
        down = np.asarray(adata.var_names.isin(names))
        order = adata.var_names[down]
        names = pd.Index([f for f in names])  # keep the caller's order
        pos = order.get_indexer(names)
    out = adata[:, up].copy()
    x_down = np.asarray(adata[:, down].X, dtype=np.float32)
    down_names = list(adata.var_names[down])
    if down_features is not None:
        x_down = x_down[:, pos]
        down_names = [down_names[i] for i in pos]
    out.obsm[down_key] = x_down
    out.uns[f"{down_key}_feature"] = np.asarray(down_names, dtype=object)
    return out
