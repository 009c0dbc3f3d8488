"""Argument checks shared by every layer (data, stats, interpret, models, train): clear
``TypeError`` / ``ValueError`` messages instead of silent coercion (a float such as 2.5 is
never truncated to an integer, a bool is never a number)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["check_choice", "check_fraction", "check_int", "check_number", "is_integer", "is_real"]


def check_choice(value: Any, allowed: tuple, name: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}.")


def is_integer(value: Any) -> bool:
    """Whether ``value`` is a Python or numpy integer (``bool`` is not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number (Python, numpy; ``bool`` is not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_number(value: Any, name: str, *, positive: bool = False, what: str = "") -> float:
    """``value`` as a finite ``float``, ``>= 0`` (``> 0`` with ``positive``): a ``TypeError``
    unless it is a real number, a ``ValueError`` otherwise; ``what`` is added to the message."""
    about = f" ({what})" if what else ""
    if not is_real(value):
        raise TypeError(f"{name}={value!r} must be a number{about}.")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "a positive number" if positive else "a number >= 0"
        raise ValueError(f"{name}={value!r} must be {bound}{about}.")
    return float(value)


def check_int(value: Any, name: str, minimum: int = 1, allow_none: bool = False,
              what: str = "") -> int | None:
    """``value`` as an ``int``: a ``TypeError`` unless it is an integer (``None`` passes with
    ``allow_none``), a ``ValueError`` unless it is ``>= minimum``; ``what`` (e.g. "cells to
    draw") is added to the messages."""
    if value is None and allow_none:
        return None
    about = f" ({what})" if what else ""
    if not is_integer(value):
        raise TypeError(f"{name}={value!r} must be an integer >= {minimum}{about}.")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}{about}.")
    return int(value)


def check_fraction(value: float, name: str, *, upper_open: bool = True) -> None:
    """Raise a ``ValueError`` unless ``0 <= value < 1`` (``<= 1`` with ``upper_open=False``)."""
    if not is_real(value):
        raise TypeError(f"{name}={value!r} must be a number.")
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name}={value} must be in {bound}.")
