"""The entry point of the interpretation engine: :func:`attribute`.

Every model's interpretation methods end here: any torch callable, any input tensor (the other
inputs held fixed), any of captum's Integrated Gradients, GradientShap, saliency, input x
gradient and DeepLIFT, or shap's Deep/Gradient explainers, batched over cells x targets x steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cellsight.interpret.batching import (
    DEFAULT_MAX_BATCH_ELEMENTS,
    as_tensor,
    cells_per_chunk,
    chunk_slices,
    format_forward_args,
    n_elements,
    progress,
    repeat_rows,
    resolve_baselines,
    rows_per_cell,
    take_forward_args,
)
from cellsight.interpret.methods import (
    CONVERGENCE_METHODS,
    METHODS,
    ExplainedFunction,
    captum_call,
    shap_attributions,
)

__all__ = ["attribute", "TargetPlan", "plan_targets"]

TargetType = int | Sequence[int] | str | np.ndarray | torch.Tensor | None


@dataclass
class TargetPlan:
    """What is explained: output ``columns`` (a trailing axis when ``trailing``), or one column
    per cell (``per_cell``)."""

    columns: list[int]
    trailing: bool
    per_cell: torch.Tensor | None = None

    @property
    def n_targets(self) -> int:
        return 1 if self.per_cell is not None else len(self.columns)


def plan_targets(target: TargetType, n_outputs: int, n_cells: int) -> TargetPlan:
    """Turn the user's ``target`` into a :class:`TargetPlan`.

    Parameters
    ----------
    target
        ``None`` (the function has one output per cell), an output index, ``"all"`` (every
        output, trailing axis), a list/tuple of indices (trailing axis, in that order), or a
        1-D integer array/tensor with one output index per cell (e.g. each cell's class).
    n_outputs
        Outputs per cell of the explained function (1 for a ``(cells,)`` output).
    n_cells
        Cells explained.
    """

    def check(idx: int) -> int:
        if not -n_outputs <= idx < n_outputs:
            raise ValueError(
                f"target={idx} is out of range: the explained function returns {n_outputs} "
                f"output(s) per cell (valid: 0..{n_outputs - 1})."
            )
        return idx % n_outputs

    if target is None:
        if n_outputs != 1:
            raise ValueError(
                f"The explained function returns {n_outputs} outputs per cell; pass target= "
                "an output index, a list of them, 'all', or one index per cell."
            )
        return TargetPlan([0], trailing=False)
    if isinstance(target, str):
        if target != "all":
            raise ValueError(f"target={target!r} is not known; the only name accepted is 'all'.")
        return TargetPlan(list(range(n_outputs)), trailing=True)
    if isinstance(target, bool):
        raise ValueError("target must be an integer index, not a bool.")
    if isinstance(target, int | np.integer):
        return TargetPlan([check(int(target))], trailing=False)
    if isinstance(target, list | tuple):
        if len(target) == 0:
            raise ValueError("target is an empty list; give at least one output index.")
        return TargetPlan([check(int(t)) for t in target], trailing=True)
    t = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target)
    if t.dim() == 0:
        return TargetPlan([check(int(t))], trailing=False)
    if t.dim() != 1 or t.shape[0] != n_cells or t.is_floating_point():
        raise ValueError(
            f"A target array must hold one integer output index per cell ({n_cells}); got "
            f"shape {tuple(t.shape)} and dtype {t.dtype}. Use a list for several outputs."
        )
    t = t.long().cpu()
    if (t < -n_outputs).any() or (t >= n_outputs).any():
        raise ValueError(
            f"target holds indices outside 0..{n_outputs - 1} (the function's outputs per cell)."
        )
    return TargetPlan(sorted(set((t % n_outputs).tolist())), trailing=False, per_cell=t % n_outputs)


def _check_inputs(x: torch.Tensor) -> None:
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(
            f"inputs must be cells x features with at least one cell; got shape {tuple(x.shape)}."
        )
    if not x.is_floating_point():
        raise ValueError(
            f"inputs have dtype {x.dtype}; attributions need floating inputs (convert counts "
            "with .float())."
        )
    bad = ~torch.isfinite(x)
    if bad.any():
        cell = int(bad.reshape(x.shape[0], -1).any(1).nonzero()[0, 0])
        raise ValueError(
            f"inputs contain {int(bad.sum())} NaN or infinite values (first in cell {cell}); "
            "attributions need finite inputs."
        )


def _n_outputs(fn: ExplainedFunction, x: torch.Tensor, args: tuple, per_cell: tuple) -> int:
    """Outputs per cell, from one forward on the first cell."""
    with torch.no_grad():
        out = fn(x[:1], *take_forward_args(args, per_cell, slice(0, 1)))
    if out.dim() != 2 or out.shape[0] != 1:
        raise ValueError(
            "forward must return (cells,) or (cells, outputs) with one row per input cell; "
            f"for 1 cell it returned shape {tuple(out.shape)}."
        )
    return int(out.shape[1])


def attribute(
    forward: Callable[..., torch.Tensor],
    inputs: torch.Tensor | np.ndarray,
    *,
    method: str = "ig",
    baselines: str | float | torch.Tensor | np.ndarray | None = None,
    target: TargetType = None,
    n_steps: int = 50,
    additional_forward_args: Any = None,
    internal_batch_size: int | None = None,
    batch_size: int | None = None,
    max_batch_elements: int = DEFAULT_MAX_BATCH_ELEMENTS,
    multiply_by_inputs: bool = True,
    n_samples: int | None = None,
    stdevs: float = 0.0,
    n_background: int = 100,
    shap_explainer: str = "gradient",
    method_kwargs: dict | None = None,
    return_convergence_delta: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    show_progress: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Attributions of a differentiable output of ``forward`` to its first input.

    Parameters
    ----------
    forward
        Any torch callable ``forward(inputs, *additional_forward_args)`` returning ``(cells,)``
        or ``(cells, outputs)``. For count models it takes raw counts and contains the model's
        own preprocessing (log1p, library size), so attributions are per input count.
    inputs
        Cells x features (any trailing shape) explained; numpy arrays become torch's default
        float dtype.
    method
        ``"ig"`` Integrated Gradients, ``"gs"`` GradientShap, ``"grad"`` the signed gradient
        (saliency), ``"ixg"`` input x gradient, ``"deeplift"`` DeepLIFT (captum; its rules
        apply to ``nn.Module`` nonlinearities, and its ``nn.Softmax`` rule couples the cells of
        a batch, so explain logits); ``"shap"`` SHAP values (shap's ``GradientExplainer`` or
        ``DeepExplainer``).
    baselines
        Reference of the explanation: ``"zeros"``, ``"mean"`` (per-feature mean of
        ``inputs``), ``"background"`` (``n_background`` random cells), a number, or an array
        (one row, one row per cell, or for ``"gs"``/``"shap"`` any reference rows). Default:
        zeros for ``"ig"``/``"deeplift"``, a background of cells for ``"gs"``/``"shap"``;
        ``"grad"``/``"ixg"`` take none.
    target
        The output explained: ``None`` (one output per cell), an index, a list of indices or
        ``"all"`` (a trailing output axis, e.g. gene-to-gene attributions), or a 1-D integer
        array with one index per cell (e.g. each cell's predicted or observed class).
    n_steps
        Integration steps of ``"ig"``.
    additional_forward_args
        Other inputs of ``forward``, held fixed (a value or a tuple). Tensors/arrays whose first
        axis has one entry per cell travel with their cells; everything else is passed as is.
    internal_batch_size
        At most this many rows (cells x targets x steps) per forward pass.
    batch_size
        Cells per attribution call (default: as many as ``max_batch_elements`` allows).
    max_batch_elements
        Memory budget of one call: numbers in its scaled inputs (cells x targets x steps x
        features); the default (2**22) is 16 MB of float32.
    multiply_by_inputs
        Multiply by ``inputs - baselines`` (global attributions) for ig/gs/deeplift.
    n_samples
        Random baseline draws per cell for ``"gs"`` (default 20) and ``"shap"`` with the
        gradient explainer (default 200).
    stdevs
        Gaussian noise added to the inputs by ``"gs"``.
    n_background
        Cells drawn for a ``"background"`` baseline.
    shap_explainer
        ``"gradient"`` (expected gradients; any differentiable function) or ``"deep"``
        (DeepSHAP; exact rules only for ``nn.Module`` nonlinearities).
    method_kwargs
        Extra arguments of the captum/shap call (e.g. ``{"method": "riemann_trapezoid"}`` for
        IG, ``{"check_additivity": True}`` for DeepSHAP).
    return_convergence_delta
        Also return the completeness error per cell (and per output): sum of attributions minus
        ``f(inputs) - f(baselines)`` (``"ig"``, ``"deeplift"``; for ``"gs"`` the mean over its
        draws, zero only in expectation).
    seed
        Seeds every random draw (background cells, GradientShap, shap); same seed, same result.
    device
        Where to compute (default: where ``inputs`` are); ``forward`` must live there.
    show_progress
        Show a progress bar over cells.

    Returns
    -------
    Attributions shaped like ``inputs`` (with a trailing output axis for several targets) and,
    with ``return_convergence_delta``, the deltas shaped ``(cells,)`` or ``(cells, outputs)``.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; use one of {list(METHODS)}.")
    if n_steps < 1:
        raise ValueError(f"n_steps={n_steps} must be at least 1.")
    if return_convergence_delta and method not in CONVERGENCE_METHODS:
        raise ValueError(
            f"method={method!r} has no convergence delta; it exists for "
            f"{list(CONVERGENCE_METHODS)}."
        )
    method_kwargs = dict(method_kwargs or {})
    if n_samples is None:
        n_samples = 200 if method == "shap" else 20
    x = as_tensor(inputs, device).detach()
    _check_inputs(x)
    n = x.shape[0]
    args, per_cell = format_forward_args(additional_forward_args, n)
    if device is not None:
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    fn = ExplainedFunction(forward)
    plan = plan_targets(target, _n_outputs(fn, x, args, per_cell), n)
    base = resolve_baselines(x, baselines, method, n_background=n_background, seed=seed)
    feat = tuple(x.shape[1:])

    if method == "shap":
        vals = shap_attributions(
            forward, x, base, plan.columns, args, per_cell,
            explainer=shap_explainer, n_samples=n_samples, seed=seed,
            cells_per_call=batch_size or 64, method_kwargs=method_kwargs,
            show_progress=show_progress,
        )
        vals = vals.astype(_np_dtype(x), copy=False)
        if plan.per_cell is not None:
            pos = np.searchsorted(plan.columns, plan.per_cell.numpy())
            return np.take_along_axis(vals, pos.reshape(n, *([1] * (len(feat) + 1))), -1)[..., 0]
        return vals if plan.trailing else vals[..., 0]

    k = plan.n_targets
    size = cells_per_chunk(
        n, n_elements(feat), rows_per_cell(method, n_steps, n_samples), k,
        batch_size=batch_size, internal_batch_size=internal_batch_size,
        max_batch_elements=max_batch_elements,
    )
    attrs = np.empty((n, *feat, k), dtype=_np_dtype(x))
    deltas = np.empty((n, k), dtype=np.float64) if return_convergence_delta else None
    bar = progress(n, f"{method} attributions", show_progress)
    try:
        for ci, sl in enumerate(chunk_slices(n, size)):
            m = sl.stop - sl.start
            x_rep = repeat_rows(x[sl], k)
            if plan.per_cell is not None:
                t_rep = plan.per_cell[sl].to(x.device)
            else:
                t_rep = torch.as_tensor(plan.columns, device=x.device).repeat_interleave(m)
            b_rep = _chunk_baselines(base, method, sl, n, k, x_rep)
            with _seeded(seed, ci, x.device):
                a, d = captum_call(
                    method, fn, x_rep, b_rep, t_rep, take_forward_args(args, per_cell, sl, k),
                    n_steps=n_steps, n_samples=n_samples, stdevs=stdevs,
                    multiply_by_inputs=multiply_by_inputs,
                    internal_batch_size=internal_batch_size,
                    return_convergence_delta=return_convergence_delta,
                    method_kwargs=method_kwargs,
                )
            attrs[sl] = np.moveaxis(a.reshape(k, m, *feat).cpu().numpy(), 0, -1)
            if deltas is not None:
                deltas[sl] = d.reshape(k, m).T.cpu().numpy()
            bar.update(m)
    finally:
        bar.close()
    if not plan.trailing:
        attrs = attrs[..., 0]
        deltas = None if deltas is None else deltas[:, 0]
    return attrs if deltas is None else (attrs, deltas)


@contextmanager
def _seeded(seed: int, chunk: int, device: torch.device) -> Iterator[None]:
    """Seed torch and numpy's global generator for one chunk (captum draws from both: the
    GradientShap noise from torch, its baseline rows from numpy); both states are restored."""
    state = np.random.get_state()  # noqa: NPY002
    s = int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])
    try:
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(s)
            np.random.seed(s)  # noqa: NPY002
            yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


def _np_dtype(x: torch.Tensor) -> np.dtype:
    return np.float64 if x.dtype == torch.float64 else np.float32


def _chunk_baselines(
    base: torch.Tensor | None, method: str, sl: slice, n: int, k: int, x_rep: torch.Tensor
) -> torch.Tensor | None:
    """Baselines of one chunk: a distribution as is (gs), else one row per repeated input."""
    if base is None or method == "gs":
        return base
    if base.shape[0] == n and n > 1:
        return repeat_rows(base[sl], k)
    return base.expand(x_rep.shape[0], *base.shape[1:]).contiguous()
