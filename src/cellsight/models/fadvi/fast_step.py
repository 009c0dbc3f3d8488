"""FADVI's training step with a hand-written backward pass (CPU, float32, default layout).

A FADVI step on CPU with the seed's sizes (128 cells x 765 genes, three 2-layer encoders of
width 128, six 2-layer heads) spent about as long in Python, autograd's graph and Lightning as
in its matrix products: about 550 torch operations, each with its own dispatch, allocation and
graph node. This module computes the same loss and the same parameter gradients with a dozen
C calls (:mod:`cellsight.models.fadvi.fast_kernels`, compiled by :mod:`cellsight.nn.native`)
and a few torch operations, and records nothing for autograd: the encoders' hidden layers,
their Gaussian heads with the posterior sample and KL, the decoder with the ZINB likelihood,
and each group of classifier heads with its masked cross-entropy are one C pass forward and
one backward each (their matrix products by the BLAS sgemm torch uses, or by
``csrc/gemm.c`` where that is faster, :func:`cellsight.nn.native.native_gemm_wanted`); the
correlation penalty's gradient is written out in torch
(:func:`~cellsight.models.fadvi.correlation.correlation_penalty_and_grad`).

It draws its random numbers in the order of the autograd path (the encoders' dropout, the
posterior sample, then, for alternating optimisation, the adversaries' dropout of their update,
then the supervised heads' and the adversaries' dropout of the main loss), with the same calls,
so for the same seed both paths give the same losses and gradients up to float32 rounding
(tests compare them parameter by parameter).

It covers FADVI's default configuration: the encoders without covariates and with LayerNorm
(no affine parameters) or no normalisation, no BatchNorm in the heads, a decoder of Linear and
ReLU layers, the observed library size, ``dispersion="gene"``, ``gene_likelihood="zinb"``, no
extra covariates, float32 CPU tensors and the native kernels built. Everything else trains
through autograd (:func:`fast_step_reason` says why a module is not covered).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from scvi import REGISTRY_KEYS as K
from scvi.module.base import LossOutput
from torch import nn

from cellsight.models.fadvi.correlation import correlation_penalty_and_grad
from cellsight.models.fadvi.encoders import layer_parts
from cellsight.models.fadvi.fast_kernels import (
    MLP,
    Decoder,
    Heads,
    Site,
    accumulate_grad,
    mlp_kernels,
    ptrs,
    slices,
)
from cellsight.nn import native

__all__ = ["FastTrainingStep", "fast_step_reason"]


def fast_step_reason(module) -> str | None:
    """Why :class:`FastTrainingStep` cannot train ``module`` (``None``: it can)."""
    checks = [
        (module.gene_likelihood == "zinb", "gene_likelihood is not 'zinb'"),
        (module.dispersion == "gene", "dispersion is not 'gene'"),
        (module.l_encoder is None, "the library size is inferred"),
        (not module.use_size_factor_key, "size factors are registered"),
        (module.n_continuous_cov == 0 and not module.n_cats_per_cov, "extra covariates"),
        (not getattr(module, "batch_embedded", False), "a batch embedding"),
        (not module.encode_covariates, "encode_covariates=True"),
        (getattr(module, "flow_prior", None) is None, "a flow prior"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    for enc in (module.encoder_b, module.encoder_l, module.encoder_r):
        if enc.var_activation is not torch.exp or enc.distribution != "normal":
            return "a custom encoder variance or distribution"
        if any(layer_parts(layer) is None for layer in enc.encoder.fc_layers):
            return "an encoder layer other than Linear/LayerNorm/ReLU/dropout"
    widths = set()
    for layer in module.decoder.px_decoder.fc_layers:
        parts = layer_parts(layer)
        if parts is None or parts[1] is not None or parts[2] > 0:
            return "a decoder layer other than Linear/ReLU"
        widths.add(parts[0].out_features)
    if len(widths) != 1:
        return "decoder layers of different widths"
    for heads in (module.heads, module.adversaries):
        if heads is not None and any(isinstance(nm, nn.BatchNorm1d) for nm in heads.norms):
            return "BatchNorm in the classifier heads"
    params = list(module.parameters())
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        return "parameters are not float32 on the CPU"
    if not native.enabled() or mlp_kernels() is None:
        return "the native kernels (or torch's BLAS sgemm) are not available"
    return None


class FastTrainingStep:
    """The loss and parameter gradients of one FADVI training step, without autograd (see the
    module docstring). ``module`` must pass :func:`fast_step_reason`."""

    def __init__(self, module) -> None:
        reason = fast_step_reason(module)
        if reason is not None:
            raise ValueError(f"FastTrainingStep does not cover this module: {reason}.")
        self.m = module
        self.widths = [module.n_latent_b, module.n_latent_l, module.n_latent_r]
        self.offsets = {"b": 0, "l": self.widths[0], "r": self.widths[0] + self.widths[1]}
        self.encs = (module.encoder_b, module.encoder_l, module.encoder_r)
        self._k_c = (ctypes.c_int64 * 3)(*self.widths)
        self._params = list(module.parameters())
        self._enc_tail = layer_parts(self.encs[0].encoder.fc_layers[0])
        self._storage: tuple = ()
        self._sites: dict[str, Site] = {}

    # ------------------------------------------------------------------ encoders
    def _encode(self, x_in: torch.Tensor) -> dict:
        """The three encoders' forward (their hidden layers, then the Gaussian heads, the
        posterior sample and the KL terms, one C call each): a dict of the saved tensors, with
        ``loc``, ``scale``, ``z`` and ``kl`` ``(n, k)``."""
        site = self._site("encoders")
        _, eps, p = self._enc_tail
        mlp = MLP([x_in] * 3, site, eps, p, True)
        n, h = x_in.shape[0], mlp.widths[-1]
        k = sum(self.widths)
        loc, v, ev, scale, z, kl = (x_in.new_empty(n, k) for _ in range(6))
        noise = torch.empty_like(loc).normal_()  # the autograd path's rsample draw
        means = [enc.mean_encoder for enc in self.encs]
        variances = [enc.var_encoder for enc in self.encs]
        mlp.lib.gauss_forward(
            3, n, h, self._k_c, mlp.out.data_ptr(), *site.gauss, self.encs[0].var_eps,
            noise.data_ptr(),
            loc.data_ptr(), v.data_ptr(), ev.data_ptr(), scale.data_ptr(), z.data_ptr(),
            kl.data_ptr())
        return {"mlp": mlp, "lins": site.lins, "loc": loc, "ev": ev, "scale": scale, "z": z,
                "kl": kl, "noise": noise, "means": means, "variances": variances}

    def _encoders_backward(self, enc: dict, d_loc: torch.Tensor, d_z: torch.Tensor,
                           klc: float) -> None:
        """Accumulate the encoders' gradients from ``d loss / d loc`` (all but the sample's
        and the KL's part; overwritten), ``d loss / d z`` and ``klc = d loss / d kl``."""
        mlp = enc["mlp"]
        means, variances = enc["means"], enc["variances"]
        grads = [[torch.empty_like(lin.weight), torch.empty_like(lin.bias)]
                 for lin in means + variances]
        d_act = torch.empty_like(mlp.out)
        d_v = torch.empty_like(d_loc)
        d_z = d_z.contiguous()
        mlp.lib.gauss_backward(
            3, d_loc.shape[0], mlp.widths[-1], self._k_c, mlp.out.data_ptr(),
            mlp.site.gauss[0], mlp.site.gauss[2],
            self.encs[0].var_eps, enc["noise"].data_ptr(), enc["loc"].data_ptr(),
            enc["ev"].data_ptr(), enc["scale"].data_ptr(), d_loc.data_ptr(), d_z.data_ptr(),
            klc, ptrs([g[0] for g in grads[:3]]), ptrs([g[1] for g in grads[:3]]),
            ptrs([g[0] for g in grads[3:]]), ptrs([g[1] for g in grads[3:]]),
            d_act.data_ptr(), d_v.data_ptr())
        for lin, (gw, gb) in zip(means + variances, grads):
            accumulate_grad(lin.weight, gw)
            accumulate_grad(lin.bias, gb)
        layer_grads, _ = mlp.backward(d_act, params=True, inputs=False)
        for i, lay in enumerate(layer_grads):
            for e, (gw, gb) in enumerate(lay):
                accumulate_grad(enc["lins"][e][i].weight, gw)
                accumulate_grad(enc["lins"][e][i].bias, gb)

    # ------------------------------------------------------------------ step
    def adversary_update(self, loc_nk: torch.Tensor, targets: dict) -> torch.Tensor:
        """The adversaries' own loss on the (detached) posterior means, with its parameter
        gradients accumulated (alternating optimisation's first pass); the summed
        cross-entropy."""
        m = self.m
        heads = self._heads(m.adversaries, m.adv_names, loc_nk, targets)
        heads.backward(torch.ones_like(heads.ce_g), params=True, inputs=False)
        return heads.ce_g.sum()

    def _heads(self, heads, names, loc_nk, targets) -> Heads:
        from cellsight.models.fadvi.module import _HEAD_SOURCE, _HEAD_TARGET

        inputs = []
        for name in names:
            src = _HEAD_SOURCE[name]
            lo = self.offsets[src]
            inputs.append(loc_nk[:, lo:lo + self.widths["blr".index(src)]])
        kinds = [_HEAD_TARGET[name] for name in names]
        target_gn = torch.stack([targets[k][0] for k in kinds]).contiguous()
        weight_gn = torch.stack([targets[k][1] for k in kinds]).contiguous()
        key = "heads" if heads is self.m.heads else "adversaries"
        return Heads(heads, self._site(key), inputs, target_gn, weight_gn, heads.n_classes_g)

    def _check_storage(self) -> None:
        """Drop the cached C arguments when a parameter's storage changed (``.to()``, a new
        ``.data``; optimisers and ``load_state_dict`` update in place)."""
        storage = tuple(p.data_ptr() for p in self._params)
        if storage != self._storage:
            self._sites.clear()
            self._storage = storage

    def _site(self, key: str) -> Site:
        """The cached :class:`Site` of ``"encoders"``, ``"decoder"``, ``"heads"`` or
        ``"adversaries"``, rebuilt when a parameter's storage changed (checked once a step by
        :meth:`_check_storage`)."""
        site = self._sites.get(key)
        if site is None:
            if key == "decoder":
                site = Decoder.site(self.m)
            elif key == "encoders":
                lins = [[layer_parts(layer)[0] for layer in enc.encoder.fc_layers]
                        for enc in self.encs]
                layers = [[(lins[e][i].weight, lins[e][i].bias) for e in range(3)]
                          for i in range(len(lins[0]))]
                site = Site(layers, self.m.n_input, True)
                site.lins = lins
                means = [enc.mean_encoder for enc in self.encs]
                variances = [enc.var_encoder for enc in self.encs]
                site.gauss = (ptrs([lin.weight for lin in means]),
                              ptrs([lin.bias for lin in means]),
                              ptrs([lin.weight for lin in variances]),
                              ptrs([lin.bias for lin in variances]))
            else:
                heads = getattr(self.m, key)
                layers = [list(zip(slices(heads.weights[i]), slices(heads.biases[i])))
                          for i in range(len(heads.layer_norms))]
                site = Site(layers, heads.weights[0].shape[1], False)
            self._sites[key] = site
        return site

    def __call__(
        self, tensors: dict, kl_weight: float | torch.Tensor = 1.0,
        adversarial: str = "reversal",
        adversary_step: Callable[[Callable[[], torch.Tensor]], None] | None = None,
    ) -> tuple[LossOutput, Callable[[], None]]:
        """Forward pass of one step: the :class:`LossOutput` of :meth:`FactorDisentanglementVAE.
        loss` and a function that accumulates every trained parameter's gradient.

        ``adversarial`` is ``"reversal"`` (adversaries trained in the same backward, their
        inputs' gradients multiplied by ``-alpha``) or ``"frozen"`` (``-alpha`` times their
        cross-entropies, no gradient for the adversaries). ``adversary_step``, for alternating
        optimisation, is called after the encoders with a function that computes the
        adversaries' loss and accumulates their gradients (the caller zeroes, averages and
        steps around it), before the adversaries are used for the main loss.
        """
        with torch.no_grad():
            return self._step(tensors, kl_weight, adversarial, adversary_step)

    def _step(self, tensors, kl_weight, adversarial, adversary_step):
        m = self.m
        self._check_storage()
        x = tensors[K.X_KEY]
        n = x.shape[0]
        x = x.contiguous()
        x_in = torch.log1p(x) if m.log_variational else x
        enc = self._encode(x_in)
        loc, z, kl_nk = enc["loc"], enc["z"], enc["kl"]
        targets = m._targets(tensors)
        if adversary_step is not None and m.adversaries is not None:
            adversary_step(lambda: self.adversary_update(loc, targets))
        # decoder and likelihood (one C pass)
        dec = Decoder(m, z, tensors[K.BATCH_KEY], x, self._site("decoder"))
        ll_n = dec.ll
        rec_n = -ll_n
        kl_parts = torch.split(kl_nk, self.widths, dim=-1)
        kl_local = {f"kl_divergence_z_{name}": part.sum(-1)
                    for name, part in zip("blr", kl_parts)}
        kl_w = float(kl_weight) * m.beta
        loss = (rec_n + kl_w * kl_nk.sum(-1)).mean()
        extra: dict[str, torch.Tensor] = {}
        sup = adv = None
        if m.heads is not None:
            sup = self._heads(m.heads, m.sup_names, loc, targets)
            for i, name in enumerate(m.sup_names):
                key = "batch" if name == "head_batch" else "label"
                extra[f"classification_loss_{key}"] = sup.ce_g[i]
            loss = loss + (sup.ce_g * m.sup_lambda_g).sum()
        reversal = adversarial == "reversal"
        if m.adversaries is not None:
            if adversarial not in ("reversal", "frozen"):
                raise ValueError(f"adversarial={adversarial!r} must be 'reversal' or 'frozen'.")
            adv = self._heads(m.adversaries, m.adv_names, loc, targets)
            extra["adversarial_loss"] = adv.ce_g.sum()
            loss = loss + (extra["adversarial_loss"] if reversal
                           else -(adv.ce_g * m.adv_alpha_g).sum())
        d_corr = None
        if m.gamma > 0:
            if n > 1:
                extra["cross_correlation"], d_corr = correlation_penalty_and_grad(
                    loc, self.widths)
            else:
                extra["cross_correlation"] = loc.new_zeros(())
            loss = loss + m.gamma * extra["cross_correlation"]
        out = LossOutput(loss=loss, reconstruction_loss=rec_n, kl_local=kl_local,
                         extra_metrics=extra)

        @torch.no_grad()
        def backward() -> None:
            # d loss / d loc from the heads and the correlation penalty (the KL's and the
            # sample's parts are added with the encoders' backward)
            d_loc = torch.zeros_like(loc)
            if d_corr is not None:
                d_loc.add_(d_corr, alpha=m.gamma)
            if sup is not None:
                d_in = sup.backward(m.sup_lambda_g, params=True, inputs=True)
                self._add_inputs(d_loc, m.sup_names, d_in, None)
            if adv is not None:
                if reversal:
                    d_in = adv.backward(torch.ones_like(adv.ce_g), params=True, inputs=True)
                    self._add_inputs(d_loc, m.adv_names, d_in, -m.adv_alpha_g)
                else:
                    d_in = adv.backward(-m.adv_alpha_g, params=False, inputs=True)
                    self._add_inputs(d_loc, m.adv_names, d_in, None)
            # likelihood -> decoder -> z
            d_z = dec.backward(x.new_full((n,), -1.0 / n))
            self._encoders_backward(enc, d_loc, d_z, kl_w / n)

        return out, backward

    def _add_inputs(self, d_loc, names, d_in, factor_g) -> None:
        from cellsight.models.fadvi.module import _HEAD_SOURCE

        for i, name in enumerate(names):
            src = _HEAD_SOURCE[name]
            lo = self.offsets[src]
            part = d_in[i] if factor_g is None else d_in[i] * factor_g[i]
            d_loc[:, lo:lo + part.shape[-1]].add_(part)
