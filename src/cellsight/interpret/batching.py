"""Batching for attributions: cells x targets x integration steps in as few forwards as fit.

Attribution methods evaluate the explained function many times per cell (``n_steps`` points on
the integration path for Integrated Gradients, ``n_samples`` baselines for GradientShap, the
input and its baseline for DeepLIFT). The seeds call captum once per small minibatch of cells
(cell2net: 4 cells); here the cells are cut into *chunks* as large as a memory budget allows,
several targets are explained in the same call by repeating the chunk once per target (captum
accepts one target per example), and captum then evaluates ``cells x targets x steps`` rows in
one forward pass (or in pieces of ``internal_batch_size`` rows).

These helpers are public so that model code and the significance tests (which explain many
permuted copies of the data) batch the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cellsight.checks import is_real

__all__ = [
    "DEFAULT_MAX_BATCH_ELEMENTS",
    "as_tensor",
    "cells_per_chunk",
    "rows_per_cell",
    "n_elements",
    "chunk_slices",
    "format_forward_args",
    "take_forward_args",
    "repeat_rows",
    "resolve_baselines",
    "progress",
]

# numbers of the scaled input held at once: 2**22 float32 = 16 MB (measured faster than
# larger chunks on CPU: the chunk stays closer to cache)
DEFAULT_MAX_BATCH_ELEMENTS = 2**22

_BASELINE_NAMES = ("zeros", "mean", "background")


def rows_per_cell(method: str, n_steps: int, n_samples: int) -> int:
    """Forward rows one cell costs with ``method`` (IG: steps, GradientShap: samples ...)."""
    return {"ig": n_steps, "gs": n_samples, "deeplift": 2}.get(method, 1)


def as_tensor(x: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """``x`` as a tensor; numpy floating arrays become torch's default float dtype."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.asarray(x)
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if t.is_floating_point():
            t = t.to(torch.get_default_dtype())
    return t if device is None else t.to(device)


def cells_per_chunk(
    n_cells: int,
    n_elements_per_cell: int,
    rows_per_cell: int,
    n_targets: int = 1,
    *,
    batch_size: int | None = None,
    internal_batch_size: int | None = None,
    max_batch_elements: int = DEFAULT_MAX_BATCH_ELEMENTS,
) -> int:
    """Cells per attribution call.

    Parameters
    ----------
    n_cells
        Cells to explain.
    n_elements_per_cell
        Numbers in one cell's input (genes, or the product of the non-cell axes).
    rows_per_cell
        Forward rows one cell costs (see :func:`rows_per_cell`).
    n_targets
        Outputs explained together (each repeats the chunk once).
    batch_size
        Cells per call given by the user; wins over the budget.
    internal_batch_size
        Rows per forward pass given by the user: a call never holds more examples than this.
    max_batch_elements
        Budget for the scaled inputs of one call, in numbers.

    Returns
    -------
    Cells per call, at least 1 and at most ``n_cells``.
    """
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be a positive number of cells.")
        size = batch_size
    else:
        per_cell = max(1, n_elements_per_cell) * max(1, rows_per_cell) * max(1, n_targets)
        size = max(1, max_batch_elements // per_cell)
    if internal_batch_size is not None:
        if internal_batch_size < 1:
            raise ValueError(
                f"internal_batch_size={internal_batch_size} must be a positive number of rows."
            )
        # captum needs every example of a call in each internal batch
        size = min(size, max(1, internal_batch_size // max(1, n_targets)))
    return int(max(1, min(size, n_cells)))


def chunk_slices(n: int, size: int) -> list[slice]:
    """Consecutive slices of ``range(n)`` of at most ``size`` items."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def format_forward_args(args: Any, n_cells: int) -> tuple[tuple, tuple[bool, ...]]:
    """Additional forward arguments as a tuple, and which of them are per-cell tensors.

    A tensor (or numpy array, converted) whose first axis has ``n_cells`` entries is per-cell:
    it is sliced and repeated with the cells. Anything else is passed to every call unchanged.
    """
    if args is None:
        return (), ()
    if not isinstance(args, tuple):
        args = (args,)
    out = []
    for a in args:
        if isinstance(a, np.ndarray):
            a = as_tensor(a)
        out.append(a)
    per_cell = tuple(
        isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n_cells for a in out
    )
    return tuple(out), per_cell


def repeat_rows(t: torch.Tensor, times: int) -> torch.Tensor:
    """``t`` stacked ``times`` times along the first axis (``[t; t; ...]``)."""
    if times == 1:
        return t
    return t.repeat(times, *([1] * (t.dim() - 1)))


def take_forward_args(
    args: tuple, per_cell: Sequence[bool], rows: slice | torch.Tensor, times: int = 1
) -> tuple:
    """The per-cell arguments restricted to ``rows`` and repeated ``times``; others as they are."""
    return tuple(repeat_rows(a[rows], times) if pc else a for a, pc in zip(args, per_cell))


def resolve_baselines(
    inputs: torch.Tensor,
    baselines: Any,
    method: str,
    *,
    n_background: int = 100,
    seed: int = 0,
) -> torch.Tensor | None:
    """Baselines of ``method`` as a tensor on the inputs' device and dtype.

    Parameters
    ----------
    inputs
        Cells x features (any trailing shape).
    baselines
        ``None`` (zeros for ``"ig"``/``"deeplift"``, a background of cells for ``"gs"``/
        ``"shap"``), ``"zeros"``, ``"mean"`` (per-feature mean over ``inputs``),
        ``"background"`` (``n_background`` cells drawn from ``inputs`` with ``seed``), a number,
        or an array: one row (the feature shape, or ``(1, ...)``), one row per cell (``"ig"``,
        ``"deeplift"``), or any number of reference rows (``"gs"``, ``"shap"``).
    method
        Attribution method name.
    n_background
        Background size for ``"background"``.
    seed
        Seeds the background draw.

    Returns
    -------
    ``None`` for methods without baselines (``"grad"``, ``"ixg"``), else a tensor with 1,
    ``n_cells`` or (``gs``/``shap``) any number of rows.
    """
    n = inputs.shape[0]
    feat_shape = tuple(inputs.shape[1:])
    uses_distribution = method in ("gs", "shap")
    if method in ("grad", "ixg"):
        if baselines is not None and not (isinstance(baselines, str) and baselines == "zeros"):
            raise ValueError(
                f"method={method!r} takes no baselines (it explains the gradient at the input); "
                "use method='ig' or 'deeplift' to explain relative to a baseline."
            )
        return None
    if baselines is None:
        baselines = "background" if uses_distribution else "zeros"
    if isinstance(baselines, str):
        if baselines not in _BASELINE_NAMES:
            raise ValueError(
                f"baselines={baselines!r} is not known; use one of {list(_BASELINE_NAMES)}, a "
                "number, or an array of baseline rows."
            )
        if baselines == "zeros":
            return torch.zeros((1, *feat_shape), dtype=inputs.dtype, device=inputs.device)
        if baselines == "mean":
            return inputs.mean(0, keepdim=True)
        if n_background < 1:
            raise ValueError(f"n_background={n_background} must be at least 1.")
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(n, size=min(n_background, n), replace=False))
        return inputs[torch.as_tensor(idx, device=inputs.device)]
    if isinstance(baselines, (bool, np.bool_)):
        raise TypeError(
            f"baselines={baselines!r} is a bool; pass a number (e.g. 0.0), a name such as "
            "'zeros', or an array of baseline rows."
        )
    if is_real(baselines):
        if not math.isfinite(baselines):
            raise ValueError(
                f"baselines={baselines!r} is not finite, so every attribution would be NaN; "
                "pass a finite number (e.g. 0.0), 'zeros', 'mean', or an array of finite rows."
            )
        return torch.full((1, *feat_shape), float(baselines), dtype=inputs.dtype,
                          device=inputs.device)
    b = as_tensor(baselines, inputs.device).to(inputs.dtype)
    if tuple(b.shape) == feat_shape:
        b = b.unsqueeze(0)
    if tuple(b.shape[1:]) != feat_shape:
        raise ValueError(
            f"baselines have shape {tuple(b.shape)} but the inputs are {tuple(inputs.shape)}; "
            f"give one row {feat_shape}, one row per cell, or (for gs/shap) reference rows."
        )
    if not torch.isfinite(b).all():
        raise ValueError(
            f"baselines contain {int((~torch.isfinite(b)).sum())} NaN or infinite value(s), so "
            "the attributions would be NaN; pass finite baselines (e.g. 'zeros' or 'mean')."
        )
    if not uses_distribution and b.shape[0] not in (1, n):
        raise ValueError(
            f"method={method!r} takes one baseline row or one per cell ({n}), got "
            f"{b.shape[0]} rows; to average over reference cells use method='gs' or 'shap'."
        )
    return b


def progress(total: int, desc: str, show: bool) -> Iterator | tqdm:
    """A tqdm bar over ``total`` cells (silent when ``show`` is false)."""
    return tqdm(total=total, desc=desc, unit="cell", disable=not show, leave=False)


def n_elements(shape: Sequence[int]) -> int:
    """Product of ``shape`` (1 for an empty shape)."""
    return int(math.prod(shape)) if len(shape) else 1
