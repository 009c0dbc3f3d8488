"""Loss-weight schedules of CauTrigger's staged training.

With ``stage_training=True`` every loss weight given to ``train`` is multiplied, at each
epoch, by a stage multiplier: training starts on reconstruction (and a little state
classification) and moves towards the state, fidelity and causal terms. A scheme is a dict
with the stage boundaries ``"stages"`` (fractions of ``max_epochs``) and, for each loss term
of :data:`~cellsight.models.cautrigger.module.LOSS_TERMS`, one multiplier per stage; with
``"interpolate": True`` multipliers change linearly between stage starts instead of stepwise.

Presets (``weight_scheme=`` a name):

=============  ========  ===================================================================
name           stages    multipliers per stage (recons, kl, feat_l1, dpd, fide_kl, causal)
=============  ========  ===================================================================
``"default"``  0.2, 0.5  (1,1,1) (1,1,1) (0,0.5,1) (0.2,1,1) (0,1,1) (0,0.5,1)
``"linear"``   0.2, 0.5  as ``"default"``, interpolated linearly
``"two_stage"`` 0.3      (1,1) (1,1) (0,1) (0.2,1) (0,1) (0,1)
``"causal"``   0.2, 0.5  (1,1,0.5) (1,1,1) (0,0.5,1) (0.2,1,1) (0,1,2) (0,1,2)
=============  ========  ===================================================================

A dict given as ``weight_scheme`` overrides entries of a preset (``"base"``: its name,
default ``"default"``); e.g. ``{"causal": (0, 0, 1)}`` switches the causal loss on only in
the last stage. ``stage_training=False`` uses the given weights unchanged at every epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cellsight.models.cautrigger.module import LOSS_TERMS

__all__ = ["PRESETS", "resolve_scheme", "stage_multipliers"]

_DEFAULT = {
    "stages": (0.2, 0.5),
    "recons": (1.0, 1.0, 1.0),
    "kl": (1.0, 1.0, 1.0),
    "feat_l1": (0.0, 0.5, 1.0),
    "dpd": (0.2, 1.0, 1.0),
    "fide_kl": (0.0, 1.0, 1.0),
    "causal": (0.0, 0.5, 1.0),
}

PRESETS: dict[str, dict[str, Any]] = {
    "default": _DEFAULT,
    "linear": {**_DEFAULT, "interpolate": True},
    "two_stage": {
        "stages": (0.3,),
        "recons": (1.0, 1.0),
        "kl": (1.0, 1.0),
        "feat_l1": (0.0, 1.0),
        "dpd": (0.2, 1.0),
        "fide_kl": (0.0, 1.0),
        "causal": (0.0, 1.0),
    },
    "causal": {
        **_DEFAULT,
        "recons": (1.0, 1.0, 0.5),
        "fide_kl": (0.0, 1.0, 2.0),
        "causal": (0.0, 1.0, 2.0),
    },
}


def resolve_scheme(weight_scheme: str | dict | None) -> dict[str, Any]:
    """A validated scheme from a preset name, an override dict or ``None`` (``"default"``)."""
    if weight_scheme is None:
        weight_scheme = "default"
    if isinstance(weight_scheme, str):
        if weight_scheme not in PRESETS:
            raise ValueError(
                f"weight_scheme={weight_scheme!r} is not a preset; use one of {sorted(PRESETS)} "
                "or a dict of per-stage multipliers."
            )
        scheme = dict(PRESETS[weight_scheme])
    elif isinstance(weight_scheme, dict):
        base = weight_scheme.get("base", "default")
        if base not in PRESETS:
            raise ValueError(f"weight_scheme['base']={base!r} is not one of {sorted(PRESETS)}.")
        unknown = set(weight_scheme) - set(LOSS_TERMS) - {"stages", "interpolate", "base"}
        if unknown:
            raise ValueError(
                f"weight_scheme has unknown keys {sorted(unknown)}; use loss terms "
                f"{list(LOSS_TERMS)}, 'stages', 'interpolate' or 'base'."
            )
        scheme = {**PRESETS[base], **{k: v for k, v in weight_scheme.items() if k != "base"}}
    else:
        raise ValueError("weight_scheme must be None, a preset name or a dict.")
    stages = tuple(float(s) for s in scheme["stages"])
    if any(not 0 < s < 1 for s in stages) or list(stages) != sorted(stages):
        raise ValueError(f"weight_scheme stages {stages} must be increasing fractions in (0, 1).")
    scheme["stages"] = stages
    for term in LOSS_TERMS:
        mult = scheme.get(term, (1.0,) * (len(stages) + 1))
        mult = (float(mult),) * (len(stages) + 1) if np.isscalar(mult) else tuple(map(float, mult))
        if len(mult) != len(stages) + 1 or any(m < 0 for m in mult):
            raise ValueError(
                f"weight_scheme[{term!r}] needs {len(stages) + 1} non-negative multipliers (one "
                f"per stage); got {mult}."
            )
        scheme[term] = mult
    scheme["interpolate"] = bool(scheme.get("interpolate", False))
    return scheme


def stage_multipliers(scheme: dict[str, Any], epoch: int, max_epochs: int) -> dict[str, float]:
    """Multiplier of each loss term at ``epoch`` (0-based) of ``max_epochs``."""
    frac = epoch / max(1, max_epochs)
    starts = (0.0, *scheme["stages"])
    stage = int(np.searchsorted(scheme["stages"], frac, side="right"))
    out = {}
    for term in LOSS_TERMS:
        m = scheme[term]
        if scheme["interpolate"] and stage < len(starts) - 1:
            t = (frac - starts[stage]) / (starts[stage + 1] - starts[stage])
            out[term] = (1 - t) * m[stage] + t * m[stage + 1]
        else:
            out[term] = m[stage]
    return out
