"""The attribution methods: captum's and shap's explainers behind one calling convention.

Nothing here re-implements an attribution method. :class:`ExplainedFunction` turns any torch
callable into the :class:`torch.nn.Module` that captum's DeepLift and shap's explainers need
(registering the callable's own module as a child so their hooks reach its nonlinearities);
:func:`captum_call` runs one chunk through a captum method; :func:`shap_attributions` runs shap's
``DeepExplainer`` / ``GradientExplainer`` with the other inputs held fixed per cell.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from captum.attr import DeepLift, GradientShap, InputXGradient, IntegratedGradients, Saliency

from cellsight.interpret.batching import chunk_slices, progress

__all__ = [
    "METHODS",
    "ExplainedFunction",
    "captum_call",
    "shap_attributions",
    "summed_gradients",
]

METHODS = ("ig", "gs", "grad", "ixg", "deeplift", "shap")
CONVERGENCE_METHODS = ("ig", "gs", "deeplift")


class ExplainedFunction(torch.nn.Module):
    """A torch callable as a module returning ``(rows, outputs)``.

    Parameters
    ----------
    forward
        ``forward(x, *args)`` returning ``(rows,)`` or ``(rows, outputs)``. When it is a module
        or a bound method of one, that module is registered as a child, so DeepLIFT/DeepSHAP
        hooks reach its ``nn.ReLU``/``nn.Sigmoid``/... layers.
    columns
        Output columns to keep (shap explains every output of the module it is given).
    fixed
        Arguments appended to every call; tensors with one row are expanded to the rows of
        ``x`` (the per-cell inputs held fixed while shap varies ``x``).
    dtype
        Cast ``x`` to this dtype first (shap's GradientExplainer builds float32 samples).
    """

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        columns: Sequence[int] | None = None,
        fixed: tuple | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = forward if isinstance(forward, torch.nn.Module) else getattr(
            forward, "__self__", None
        )
        if isinstance(owner, torch.nn.Module):
            self.owner = owner
        object.__setattr__(self, "_fn", forward)  # not registered twice as a child
        self.columns = None if columns is None else list(columns)
        self.fixed = fixed
        self.dtype = dtype

    @property
    def has_modules(self) -> bool:
        """Whether the callable's own module is known (needed for DeepLIFT rules)."""
        return hasattr(self, "owner")

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        if self.dtype is not None and x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.fixed is not None:
            rows = x.shape[0]
            args = tuple(
                a.expand(rows, *a.shape[1:])
                if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 1
                else a
                for a in self.fixed
            ) + tuple(args)
        out = self._fn(x, *args)
        if not isinstance(out, torch.Tensor):
            raise ValueError(
                f"forward returned {type(out).__name__}; it must return a tensor of shape "
                "(cells,) or (cells, outputs)."
            )
        if out.dim() == 1:
            out = out.unsqueeze(-1)
        if self.columns is not None:
            out = out[:, self.columns]
        return out


def _select_rows(out: torch.Tensor, target: Any) -> torch.Tensor:
    """One output per row: column ``target`` (an int) or ``target[i]`` of row i."""
    if target is None:
        return out
    if isinstance(target, list | tuple):
        target = torch.as_tensor(target)
    if isinstance(target, int) or (isinstance(target, torch.Tensor) and target.numel() == 1):
        return out[:, int(target)]  # one index for every row (as captum reads it)
    t = target.to(out.device).long().reshape(-1, 1)
    return out.gather(1, t).squeeze(1)


def summed_gradients(
    forward_fn: Callable,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    target_ind: Any = None,
    additional_forward_args: Any = None,
) -> tuple[torch.Tensor, ...]:
    """Drop-in ``gradient_func`` for captum's gradient methods: one backward of the summed rows.

    captum differentiates ``torch.unbind(outputs)``, one autograd root per row, which costs tens
    of microseconds per row and dominates for cell-sized models. Autograd sums over roots, so
    the gradient of ``outputs.sum()`` is the same tensor; rows (cells x steps) must not interact
    in the forward (eval mode), as per-example attributions require anyway.
    """
    with torch.autograd.set_grad_enabled(True):
        if len(inspect.signature(forward_fn).parameters) == 0:
            out = forward_fn()  # DeepLift's wrapped forward closes over its inputs
        else:
            xs = inputs if isinstance(inputs, tuple) else (inputs,)
            extra = additional_forward_args
            if extra is None:
                extra = ()
            elif not isinstance(extra, tuple):
                extra = (extra,)
            out = forward_fn(*xs, *extra)
        out = _select_rows(out, target_ind)
        if out.dim() > 1 and out[0].numel() != 1:
            raise ValueError("The explained function has several outputs per cell; pass target=.")
        return torch.autograd.grad(out.sum(), inputs)


def _warn_functional(fn: ExplainedFunction, what: str) -> None:
    if not fn.has_modules:
        warnings.warn(
            f"{what} applies its rules to nonlinearities that are nn.Module layers of the "
            "explained model, but forward is a plain function: plain gradients are used for "
            "every nonlinearity. Pass the model (or a bound method of it) as forward.",
            stacklevel=4,
        )


def _relative_gap(attr: torch.Tensor, delta: torch.Tensor) -> float:
    """Median over the rows of |delta| / |f(x) - f(baseline)| (``delta`` = sum of the
    attributions minus that difference)."""
    total = attr.detach().reshape(attr.shape[0], -1).sum(1)
    d = delta.detach().reshape(attr.shape[0], -1).mean(1)
    rel = d.abs() / (total - d).abs().clamp_min(1e-12)
    return float(rel.median()) if rel.numel() else 0.0


def _warn_incomplete(attr: torch.Tensor, delta: torch.Tensor, multiply_by_inputs: bool) -> None:
    """Warn when DeepLIFT's attributions miss its summation-to-delta property by more than 5%
    (median over the rows): captum's rules cover ``nn.Module`` nonlinearities only, and the
    models' functional ones (``log1p`` of the counts, ``exp``, ``softmax``) get plain
    gradients, which do not add up."""
    if multiply_by_inputs and _relative_gap(attr, delta) > 0.05:
        warnings.warn(
            "DeepLIFT's attributions do not add up to f(x) - f(baseline) here (median relative "
            "error above 5%): its rules cover nn.Module nonlinearities only, and this model's "
            "functional ones (log1p of the counts, exp, softmax) get plain gradients. Use "
            "method='ig' for attributions that add up (check with return_delta=True).",
            stacklevel=4,
        )


def _warn_unconverged(attr: torch.Tensor, delta: torch.Tensor, multiply_by_inputs: bool,
                      n_steps: int) -> None:
    """Warn when Integrated Gradients' attributions miss f(x) - f(baseline) by more than 5%
    (median over the rows): the integral is not resolved by ``n_steps`` points. Models whose
    encoders end in LayerNorm are scale-invariant away from the zero baseline, so their output
    changes within the first percent of the path (FADVI's label probability: from 0.004 to 0.99
    between 0.2% and 0.8% of the counts), where 50 points leave gaps of up to 0.9 on a
    probability and 1,000 points of about 0.01."""
    if not multiply_by_inputs:
        return
    if _relative_gap(attr, delta) > 0.05:  # one message per n_steps: shown once, not per call
        warnings.warn(
            f"Integrated Gradients did not converge with n_steps={n_steps}: the attributions "
            "miss f(x) - f(baseline) by more than 5% (median over cells). The explained output "
            "changes sharply along the path (near a zero baseline, LayerNorm layers make a "
            "network scale-invariant). Raise n_steps (e.g. to 1000), or use a baseline nearer "
            "the cells; check with return_delta=True.",
            stacklevel=4,
        )


def _fast(explainer):
    explainer.gradient_func = summed_gradients
    return explainer


def captum_call(
    method: str,
    fn: ExplainedFunction,
    x: torch.Tensor,
    baselines: torch.Tensor | None,
    target: torch.Tensor,
    args: tuple,
    *,
    n_steps: int,
    n_samples: int,
    stdevs: float,
    multiply_by_inputs: bool,
    internal_batch_size: int | None,
    return_convergence_delta: bool,
    method_kwargs: dict,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attributions of one chunk with a captum method (rows already repeated per target).

    Returns
    -------
    Attributions shaped like ``x`` and, when asked, the convergence delta per row (GradientShap:
    averaged over its ``n_samples`` draws).
    """
    fargs = args if args else None
    delta = None
    if method in ("grad", "ixg", "deeplift"):
        x = x.detach().requires_grad_()  # captum would warn and set it itself
    with torch.enable_grad():
        if method == "ig":
            out = _fast(IntegratedGradients(fn, multiply_by_inputs=multiply_by_inputs)).attribute(
                x,
                baselines=baselines,
                target=target,
                additional_forward_args=fargs,
                n_steps=n_steps,
                internal_batch_size=internal_batch_size,
                return_convergence_delta=True,  # checked below
                **method_kwargs,
            )
            _warn_unconverged(out[0], out[1], multiply_by_inputs, n_steps)
            if not return_convergence_delta:
                out = out[0]
        elif method == "gs":
            out = _fast(GradientShap(fn, multiply_by_inputs=multiply_by_inputs)).attribute(
                x,
                baselines=baselines,
                n_samples=n_samples,
                stdevs=stdevs,
                target=target,
                additional_forward_args=fargs,
                return_convergence_delta=return_convergence_delta,
                **method_kwargs,
            )
        elif method == "deeplift":
            _warn_functional(fn, "DeepLIFT")
            used_softmax = []
            hooks = [
                m.register_forward_hook(lambda *_: used_softmax.append(True))
                for m in fn.modules()
                if isinstance(m, torch.nn.Softmax)
            ]
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*Setting forward, backward hooks.*")
                    out = _fast(DeepLift(fn, multiply_by_inputs=multiply_by_inputs)).attribute(
                        x,
                        baselines=baselines,
                        target=target,
                        additional_forward_args=fargs,
                        return_convergence_delta=True,  # checked below
                        **method_kwargs,
                    )
            finally:
                for h in hooks:
                    h.remove()
            _warn_incomplete(out[0], out[1], multiply_by_inputs)
            if not return_convergence_delta:
                out = out[0]
            if used_softmax:
                warnings.warn(
                    "captum's DeepLIFT rule for nn.Softmax normalises over the whole batch (it "
                    "couples cells) and is not exact; explain the logits, or use method='ig'.",
                    stacklevel=3,
                )
        elif method == "grad":
            out = _fast(Saliency(fn)).attribute(
                x, target=target, abs=False, additional_forward_args=fargs, **method_kwargs
            )
        elif method == "ixg":
            out = _fast(InputXGradient(fn)).attribute(
                x, target=target, additional_forward_args=fargs, **method_kwargs
            )
        else:  # pragma: no cover - checked by the caller
            raise ValueError(method)
    if return_convergence_delta:
        out, delta = out
        delta = delta.detach().reshape(x.shape[0], -1).mean(1)
    return out.detach(), delta


def _group_cells(args: tuple, per_cell: Sequence[bool], n: int) -> list[np.ndarray]:
    """Cells grouped by identical values of their per-cell fixed arguments."""
    keys = [
        a.detach().reshape(n, -1).double().cpu().numpy()
        for a, pc in zip(args, per_cell)
        if pc
    ]
    if not keys:
        return [np.arange(n)]
    _, inverse = np.unique(np.concatenate(keys, axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    return [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]


def shap_attributions(
    forward: Callable[..., torch.Tensor],
    x: torch.Tensor,
    background: torch.Tensor,
    columns: Sequence[int],
    args: tuple,
    per_cell: Sequence[bool],
    *,
    explainer: str,
    n_samples: int,
    seed: int,
    cells_per_call: int,
    method_kwargs: dict,
    show_progress: bool,
) -> np.ndarray:
    """SHAP values of ``forward``'s ``columns`` for every cell, with shap's explainers.

    shap varies every input it is given, so the other inputs (batch, covariates) cannot be
    handed to it as inputs without being explained and mixed with the background's. Cells are
    therefore grouped by the values of their per-cell fixed arguments, and each group is
    explained with those values bound into the function (the background evaluated with the
    explained cells' covariates, i.e. interventional SHAP).

    Returns
    -------
    ``(cells, *features, len(columns))`` array.
    """
    import shap

    if explainer not in ("gradient", "deep"):
        raise ValueError(f"shap_explainer={explainer!r} must be 'gradient' or 'deep'.")
    n = x.shape[0]
    out = np.zeros((n, *x.shape[1:], len(columns)), dtype=np.float64)
    groups = _group_cells(args, per_cell, n)
    owner = forward if isinstance(forward, torch.nn.Module) else getattr(forward, "__self__", None)
    # shap switches modes (``eval()`` on what it explains); restore every submodule's own mode
    # afterwards: ``owner.train(mode)`` would set the wrapper's default mode (training) on the
    # explained model too, and every later pass would drop out and use batch statistics
    modes = [(m, m.training) for m in owner.modules()] if isinstance(
        owner, torch.nn.Module) else []
    np_state = np.random.get_state()  # noqa: NPY002 - GradientExplainer reseeds numpy's global generator
    bar = progress(n, f"shap ({explainer})", show_progress)
    try:
        for idx in groups:
            first = torch.as_tensor(idx[:1], device=x.device)
            fixed = tuple(a[first] if pc else a for a, pc in zip(args, per_cell))
            fn = ExplainedFunction(forward, columns=columns, fixed=fixed, dtype=x.dtype)
            if explainer == "deep":
                _warn_functional(fn, "DeepSHAP")
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*unrecognized nn.Module.*")
                    exp = shap.DeepExplainer(fn, background)
            else:
                exp = shap.GradientExplainer(fn, background, batch_size=max(1, n_samples))
            for sl in chunk_slices(len(idx), cells_per_call):
                rows = torch.as_tensor(idx[sl], device=x.device)
                with torch.enable_grad(), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*unrecognized nn.Module.*")
                    if explainer == "deep":
                        kw = {"check_additivity": False, **method_kwargs}
                        vals = exp.shap_values(x[rows], **kw)
                    else:
                        vals = exp.shap_values(
                            x[rows], nsamples=n_samples, rseed=seed, **method_kwargs
                        )
                vals = np.asarray(vals)
                out[idx[sl]] = vals.reshape(len(rows), *x.shape[1:], len(columns))
                bar.update(len(rows))
    finally:
        bar.close()
        np.random.set_state(np_state)  # noqa: NPY002
        for module, mode in modes:
            module.training = mode
    return out
