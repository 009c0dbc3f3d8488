"""Argument checks shared by the models: clear errors instead of silent coercion."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_choice", "check_fraction", "check_int"]


def check_choice(value: Any, allowed: tuple, name: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}.")


def check_int(value: Any, name: str, minimum: int = 1, allow_none: bool = False) -> None:
    """Raise a ``TypeError`` unless ``value`` is an integer (``bool`` is not; ``None`` with
    ``allow_none``) and a ``ValueError`` unless it is ``>= minimum``: a float such as 2.5 is
    never truncated."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}={value!r} must be an integer >= {minimum}.")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}.")


def check_fraction(value: float, name: str, *, upper_open: bool = True) -> None:
    """Raise a ``ValueError`` unless ``0 <= value < 1`` (``<= 1`` with ``upper_open=False``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name}={value!r} must be a number.")
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name}={value} must be in {bound}.")
