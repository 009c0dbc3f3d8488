"""Targets: the model outputs an attribution explains, as torch callables of the input.

A *target* names what is explained: a class probability or logit, a latent dimension, a
reconstructed (normalised) gene, a loss. For plain torch models the helpers wrap a logits
function; for modules with the scvi-tools contract (``_get_inference_input``, ``inference``,
``_get_generative_input``, ``generative``, ``loss``) :class:`ModuleFunction` builds
``f(x, *other_inputs)`` that runs the module's own preprocessing (log1p, library size) inside,
so inputs are raw counts.

Stochastic nodes are replaced by their means (``z = E[q(z|x)]``, ``library = E[q(l|x)]``) so
the explained function is deterministic, which path-integral methods need.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from scvi import REGISTRY_KEYS

__all__ = [
    "class_probability",
    "class_logit",
    "output_columns",
    "deterministic_inference",
    "latent_mean",
    "normalized_expression",
    "per_cell_loss",
    "MODULE_TARGETS",
    "ModuleFunction",
]

# inference outputs whose sampled value is replaced by the mean of its posterior:
# value key -> (posterior key, apply the encoder's z_transformation); scvi-tools' names and
# cellsight's shape-suffixed ones
_POSTERIOR_OF = {
    "z": ("qz", True),
    "z_nk": ("qz", True),
    "u_nk": ("qz", False),
    "library": ("ql", False),
    "library_n1": ("ql", False),
}


def class_probability(logits_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Class probabilities from a logits function (softmax; sigmoid for a single logit).

    Parameters
    ----------
    logits_fn
        ``logits_fn(x, *args)`` returning ``(cells, classes)`` logits (or ``(cells,)`` /
        ``(cells, 1)`` for a binary classifier).

    Returns
    -------
    ``f(x, *args)`` returning ``(cells, classes)`` probabilities (``(cells,)`` for one logit).
    """

    def prob(x: torch.Tensor, *args) -> torch.Tensor:
        logits = logits_fn(x, *args)
        if logits.dim() == 1 or logits.shape[-1] == 1:
            return torch.sigmoid(logits.reshape(logits.shape[0]))
        return torch.softmax(logits, dim=-1)

    return prob


def class_logit(logits_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The logits themselves (a named target, for symmetry with :func:`class_probability`)."""
    return logits_fn


def output_columns(
    fn: Callable[..., torch.Tensor], columns: Sequence[int]
) -> Callable[..., torch.Tensor]:
    """``fn`` restricted to some output columns."""
    cols = list(columns)

    def sel(x: torch.Tensor, *args) -> torch.Tensor:
        return fn(x, *args)[:, cols]

    return sel


def deterministic_inference(module: torch.nn.Module, tensors: dict) -> dict:
    """``module.inference`` on ``tensors`` with sampled latents replaced by posterior means.

    A module whose ``inference`` takes ``use_latent_mean`` (cellsight's modules) is asked for
    it. Otherwise sampled values are replaced after the call: ``z``/``z_nk`` by ``qz.loc``
    (through the encoder's ``z_transformation`` when it has one, e.g. the softmax of a
    logistic-normal latent), ``u_nk`` by ``qz.loc``, ``library``/``library_n1`` by ``ql.loc``
    when the library is inferred.
    """
    kwargs = dict(module._get_inference_input(tensors))
    if "use_latent_mean" in inspect.signature(module.inference).parameters:
        return dict(module.inference(**kwargs, use_latent_mean=True))
    inf = dict(module.inference(**kwargs))
    for value_key, (post_key, transformed) in _POSTERIOR_OF.items():
        post = inf.get(post_key)
        if post is not None and hasattr(post, "loc") and value_key in inf:
            mean = post.loc
            if transformed:
                transform = getattr(getattr(module, "z_encoder", None), "z_transformation", None)
                if callable(transform):
                    mean = transform(mean)
            inf[value_key] = mean
    return inf


def latent_mean(module: torch.nn.Module, tensors: dict) -> torch.Tensor:
    """Posterior mean of the latent (``qz.loc``; else the deterministic ``z``/``z_nk``)."""
    inf = deterministic_inference(module, tensors)
    qz = inf.get("qz")
    if qz is not None and hasattr(qz, "loc"):
        return qz.loc
    for key in ("z", "z_nk"):
        if key in inf:
            return inf[key]
    raise ValueError(
        f"{type(module).__name__}.inference returns neither 'qz' nor 'z' "
        f"(keys: {sorted(inf)}); pass target= a callable(module, tensors) instead."
    )


def normalized_expression(module: torch.nn.Module, tensors: dict) -> torch.Tensor:
    """Normalised expression: ``px.scale`` of the generative distribution (mean if no scale)."""
    inf = deterministic_inference(module, tensors)
    gen = module.generative(**module._get_generative_input(tensors, inf))
    px = gen.get("px")
    for attr in ("scale", "mean"):
        if px is not None and getattr(px, attr, None) is not None:
            return getattr(px, attr)
    raise ValueError(
        f"{type(module).__name__}.generative returns no 'px' distribution with a scale or mean "
        f"(keys: {sorted(gen)}); pass target= a callable(module, tensors) instead."
    )


def per_cell_loss(module: torch.nn.Module, tensors: dict, kl_weight: float = 1.0) -> torch.Tensor:
    """Per-cell loss: reconstruction plus local KL terms of ``module.loss`` at posterior means."""
    inf = deterministic_inference(module, tensors)
    gen = module.generative(**module._get_generative_input(tensors, inf))
    out = module.loss(tensors, inf, gen, kl_weight=kl_weight)
    rec = out.reconstruction_loss
    kl = out.kl_local
    total = sum(rec.values()) if isinstance(rec, dict) else rec
    if kl is not None:
        total = total + (sum(kl.values()) if isinstance(kl, dict) else kl)
    return total


MODULE_TARGETS: dict[str, Callable[[torch.nn.Module, dict], torch.Tensor]] = {
    "latent": latent_mean,
    "expression": normalized_expression,
    "loss": per_cell_loss,
}


class ModuleFunction(torch.nn.Module):
    """``f(x, *fixed)`` of a scvi-tools-contract module: ``output_fn(module, tensors)``.

    Parameters
    ----------
    module
        The model's module (registered as a child, so DeepLIFT/DeepSHAP hooks reach its layers).
    output_fn
        ``output_fn(module, tensors) -> (cells,) or (cells, outputs)``, e.g. a
        :data:`MODULE_TARGETS` entry.
    fixed_keys
        Registry keys of the other inputs, in the order they follow ``x``.
    x_key
        Registry key of the explained input.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        output_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
        fixed_keys: Sequence[str],
        x_key: str = REGISTRY_KEYS.X_KEY,
    ) -> None:
        super().__init__()
        self.module = module
        self.output_fn = output_fn
        self.fixed_keys = list(fixed_keys)
        self.x_key = x_key

    def forward(self, x: torch.Tensor, *fixed: torch.Tensor) -> torch.Tensor:
        tensors = {self.x_key: x, **dict(zip(self.fixed_keys, fixed))}
        return self.output_fn(self.module, tensors)
