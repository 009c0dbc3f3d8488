"""FADVI's label set-up check: the unlabelled category must be spelt as in the data."""

from __future__ import annotations

import warnings

import pandas as pd

__all__ = ["check_unlabeled_spelling"]

# label values that usually mean "no label"
_PLACEHOLDERS = {"unknown", "unlabeled", "unlabelled", "unassigned", "none", "nan", "na", "n/a",
                 "?", "-", ""}


def check_unlabeled_spelling(col: pd.Series, labels_key: str, unlabeled: str) -> None:
    """Reject an ``unlabeled_category`` that is absent while a label spells it differently
    (``"unknown"`` for ``"Unknown"``), and warn when it is absent while a label looks like a
    placeholder for "no label" (``"unlabeled"``, ``"NA"``, ...), which is trained as a class."""
    values = pd.unique(col.astype(str))
    if unlabeled in values:
        return
    key = str(unlabeled).strip().casefold()
    near = [v for v in values if v.strip().casefold() == key]
    placeholders = [v for v in values if v.strip().casefold() in _PLACEHOLDERS]
    if placeholders and not near:
        warnings.warn(
            f"unlabeled_category={unlabeled!r} does not occur in adata.obs[{labels_key!r}], "
            f"which has {placeholders[0]!r}: it is trained as a class. If it marks cells "
            f"without a label, pass unlabeled_category={placeholders[0]!r}.",
            UserWarning, stacklevel=3,
        )
    if near:
        raise ValueError(
            f"unlabeled_category={unlabeled!r} does not occur in adata.obs[{labels_key!r}], "
            f"but {near[0]!r} does: those cells would be trained as a class of their own. "
            f"Pass unlabeled_category={near[0]!r}, or unlabeled_category=None to keep "
            f"{near[0]!r} as a class."
        )
