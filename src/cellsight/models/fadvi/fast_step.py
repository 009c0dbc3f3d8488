"""FADVI's training step with a hand-written backward pass (CPU, float32, default layout).

A FADVI step on CPU with the seed's sizes (128 cells x 765 genes, three 2-layer encoders of
width 128, six 2-layer heads) spends about as long in Python, autograd's graph and Lightning as
in its matrix products: about 550 torch operations each with its own dispatch, allocation and
graph node. This module computes the same loss and the same parameter gradients in about 150
calls: the matrix products by torch (``addmm``/``baddbmm``/``bmm``, with their gradients written
out), the elementwise chains by the fused C kernels of :mod:`cellsight.nn.native` (the ZINB
log-likelihood and its derivatives; LayerNorm, ReLU and dropout of every hidden layer; the heads'
masked cross-entropy), and nothing recorded by autograd (the correlation penalty's gradient
is written out too, :func:`~cellsight.models.fadvi.correlation.correlation_penalty_and_grad`).

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
import torch.nn.functional as F
from scvi import REGISTRY_KEYS as K
from scvi.module.base import LossOutput
from torch import nn

from cellsight.models.fadvi.correlation import correlation_penalty_and_grad
from cellsight.models.fadvi.encoders import layer_parts
from cellsight.models.fadvi.heads import ParallelClassifiers
from cellsight.nn import native
from cellsight.nn.dropout import LEVELS, dropout_bits, dropout_threshold

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
    if not native.enabled() or _mlp_kernels() is None:
        return "the native kernels (or torch's BLAS sgemm) are not available"
    return None


def _grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """Accumulate ``g`` into ``p.grad`` (as autograd does)."""
    if g.shape != p.shape:
        g = g.reshape(p.shape)
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
_PP = ctypes.POINTER(ctypes.c_void_p)
_SIGNATURES = {
    "mlp_forward": (None, [_I64, _I64, _I64, _P, _PP, _PP, _PP, _I32, _PP, _I32, _F32, _F32,
                           _I32, _PP, _PP, _PP, _P]),
    "mlp_backward": (None, [_I64, _I64, _I64, _P, _PP, _PP, _I32, _PP, _PP, _PP, _F32, _I32,
                            _P, _PP, _PP, _PP, _P]),
    "head_out_forward": (_I64, [_I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                                _P]),
    "head_out_backward": (None, [_I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P,
                                 _P, _P, _P, _P]),
    "gauss_forward": (None, [_I64, _I64, _I64, _P, _P, _PP, _PP, _PP, _PP, _F32] + [_P] * 7),
    "gauss_backward": (None, [_I64, _I64, _I64, _P, _P, _PP, _PP, _F32] + [_P] * 6
                       + [_F32, _PP, _PP, _PP, _PP, _P, _P]),
    "decoder_zinb_forward": (ctypes.c_int, [_I64] * 7 + [_P, _P, _P, _PP, _PP, _P, _PP] + [_P] * 8),
    "decoder_zinb_backward": (None, [_I64] * 7 + [_P, _P, _PP, _PP] + [_P] * 7
                              + [_PP, _PP] + [_P] * 6),
}


def _mlp_kernels() -> ctypes.CDLL | None:
    """``csrc/stacked_mlp.c`` with its signatures set and torch's sgemm bound, or ``None``."""
    lib = native.library("stacked_mlp")
    if lib is None or native.blas_sgemm() is None:
        return None
    if not getattr(lib, "_cellsight_ready", False):
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        lib.set_sgemm(ctypes.c_void_p(native.blas_sgemm()))
        lib._cellsight_ready = True
    return lib


def _ptrs(tensors) -> ctypes.Array:
    """A C array of the data pointers of ``tensors`` (``None`` entries: NULL)."""
    return (ctypes.c_void_p * len(tensors))(*[native.ptr(t) for t in tensors])


def _slices(t: torch.Tensor) -> list[torch.Tensor]:
    """The ``G`` leading slices of a stacked ``(G, ...)`` tensor."""
    return list(t.unbind(0))


class _Site:
    """The fixed C arguments of ``G`` stacked networks' hidden layers: ``layers[l][g]`` is
    ``(weight, bias)`` of layer ``l`` of network ``g`` (with ``wt`` the weights are ``(out,
    in)`` as ``nn.Linear`` stores them, else ``(in, out)``), ``k_in`` the input width; the
    pointer arrays are built once (the parameters are updated in place)."""

    def __init__(self, layers, k_in: int, wt: bool):
        self.layers, self.wt, self.g = layers, int(wt), len(layers[0])
        self.widths = [int(k_in)] + [
            (lay[0][0].shape[0] if wt else lay[0][0].shape[1]) for lay in layers]
        self.widths_c = (ctypes.c_int64 * len(self.widths))(*self.widths)
        self.w = _ptrs([lay[i][0] for lay in layers for i in range(self.g)])
        self.b = _ptrs([lay[i][1] for lay in layers for i in range(self.g)])


class _MLP:
    """Hidden layers Linear -> [LayerNorm] -> ReLU -> [dropout] of the networks of a
    :class:`_Site`, forward now and backward on request, one C call each
    (``csrc/stacked_mlp.c``); ``inputs``: each network's ``(n, k)`` input."""

    def __init__(self, inputs, site: _Site, eps: float | None, p: float, training: bool):
        self.lib = _mlp_kernels()
        self.inputs, self.site = inputs, site
        self.layers, self.wt, self.widths = site.layers, site.wt, site.widths
        g, n = site.g, inputs[0].shape[0]
        self.g, self.n, self.n_layers = g, n, len(site.layers)
        threshold = dropout_threshold(p, training)
        self.scale = LEVELS / (LEVELS - threshold) if threshold > 0 else 1.0
        self.ln = eps is not None
        bits = [dropout_bits(g * n * w) if threshold > 0 else None for w in self.widths[1:]]
        self.act = [inputs[0].new_empty(g, n, w) for w in self.widths[1:]]
        self.xhat = [torch.empty_like(a) for a in self.act] if self.ln else [None] * len(bits)
        self.rstd = [inputs[0].new_empty(g * n) for _ in self.act] if self.ln else [None] * len(
            bits)
        pre = inputs[0].new_empty(g, n, max(self.widths[1:]))
        self._widths_c, self._w, self._b = site.widths_c, site.w, site.b
        self._x = _ptrs(inputs)
        self._act, self._xhat, self._rstd = _ptrs(self.act), _ptrs(self.xhat), _ptrs(self.rstd)
        self.lib.mlp_forward(g, n, self.n_layers, self._widths_c, self._x, self._w, self._b,
                             self.wt, _ptrs(bits), threshold, self.scale,
                             1e-5 if eps is None else eps, int(self.ln), self._act, self._xhat,
                             self._rstd, pre.data_ptr())

    @property
    def out(self) -> torch.Tensor:
        """``(G, n, h)`` output of the last hidden layer."""
        return self.act[-1]

    def backward(self, d_out: torch.Tensor, params: bool, inputs: bool, grads=None):
        """From ``d loss / d out`` (``(G, n, h)``, consumed): the parameter gradients when
        ``params``, written into ``grads`` (``[layer][network] -> (weight, bias)`` tensors, e.g.
        views of stacked gradients) or new tensors, and the inputs' gradients (one ``(n, k)``
        each) when ``inputs``. Returns ``(grads, input gradients)``."""
        g, n = self.g, self.n
        # scratch of the hidden widths (the inputs' gradients go to their own buffers)
        d = d_out.contiguous()
        other = d_out.new_empty(g * n * max(self.widths[1:]))
        gw = gb = None
        if params:
            if grads is None:
                grads = [[(torch.empty_like(w), torch.empty_like(b)) for w, b in lay]
                         for lay in self.layers]
            gw = _ptrs([lay[i][0] for lay in grads for i in range(g)])
            gb = _ptrs([lay[i][1] for lay in grads for i in range(g)])
        gx = [torch.empty_like(x) for x in self.inputs] if inputs else None
        self.lib.mlp_backward(g, n, self.n_layers, self._widths_c, self._x, self._w, self.wt,
                              self._act, self._xhat, self._rstd, self.scale, int(self.ln),
                              d.data_ptr(), gw, gb, None if gx is None else _ptrs(gx),
                              other.data_ptr())
        return grads, gx


class _Heads:
    """Forward of a :class:`ParallelClassifiers` and its masked cross-entropy, with the
    backward on request (parameter gradients and/or the gradient of the inputs)."""

    def __init__(self, heads: ParallelClassifiers, site: _Site, inputs: list[torch.Tensor],
                 target_gn: torch.Tensor, weight_gn: torch.Tensor, n_classes_g: torch.Tensor):
        """``site``: the heads' hidden layers (views of the stacked parameters)."""
        self.heads = heads
        self.widths = [x.shape[-1] for x in inputs]
        k_max = heads.weights[0].shape[1]
        x_gnk = torch.stack([x if x.shape[-1] == k_max else F.pad(x, (0, k_max - x.shape[-1]))
                             for x in inputs])
        norm = heads.layer_norms[0]
        eps = float(norm.eps) if isinstance(norm, nn.LayerNorm) else None
        self.mlp = _MLP(_slices(x_gnk), site, eps, heads.dropout_rate, heads.training)
        g, n, _ = x_gnk.shape
        c = heads.weights[-1].shape[2]
        self.logits = x_gnk.new_empty(g, n, c)
        self.target_gn, self.weight_gn, self.n_classes_g = target_gn, weight_gn, n_classes_g
        self.ce_g = x_gnk.new_empty(g)
        self.lse_gn = x_gnk.new_empty(g, n)
        self.denom_g = x_gnk.new_empty(g)
        bad = self.mlp.lib.head_out_forward(
            g, n, self.mlp.widths[-1], c, self.mlp.out.data_ptr(), heads.weights[-1].data_ptr(),
            heads.biases[-1].data_ptr(), self.logits.data_ptr(), target_gn.data_ptr(),
            weight_gn.data_ptr(), n_classes_g.data_ptr(), self.ce_g.data_ptr(),
            self.lse_gn.data_ptr(), self.denom_g.data_ptr())
        if bad:
            raise ValueError(f"{bad} classifier targets are outside their head's classes.")

    def backward(self, grad_g: torch.Tensor, params: bool, inputs: bool) -> list | None:
        """Gradients for ``d loss / d ce_g = grad_g``: accumulated into the heads' parameters
        when ``params``; returned per input (``(n, width)`` each) when ``inputs``."""
        heads, mlp = self.heads, self.mlp
        grad_g = grad_g.contiguous()  # bound: the C call reads it
        g, n, c = self.logits.shape
        h = mlp.widths[-1]
        d_logits = torch.empty_like(self.logits)
        d_act = self.logits.new_empty(g, n, h)
        g_wo = torch.empty_like(heads.weights[-1]) if params else None
        g_bo = torch.empty_like(heads.biases[-1]) if params else None
        mlp.lib.head_out_backward(
            g, n, h, c, mlp.out.data_ptr(), heads.weights[-1].data_ptr(),
            self.logits.data_ptr(), self.lse_gn.data_ptr(), self.target_gn.data_ptr(),
            self.weight_gn.data_ptr(), self.denom_g.data_ptr(), grad_g.data_ptr(),
            self.n_classes_g.data_ptr(), d_logits.data_ptr(), native.ptr(g_wo),
            native.ptr(g_bo), d_act.data_ptr())
        stacked = None
        if params:  # the per-head gradients are written straight into stacked tensors
            stacked = [(torch.empty_like(heads.weights[i]), torch.empty_like(heads.biases[i]))
                       for i in range(mlp.n_layers)]
        grads, gx = mlp.backward(d_act, params, inputs, grads=None if stacked is None else [
            list(zip(_slices(w), _slices(b))) for w, b in stacked])
        if params:
            _grad(heads.weights[-1], g_wo)
            _grad(heads.biases[-1], g_bo)
            for i, (w, b) in enumerate(stacked):
                _grad(heads.weights[i], w)
                _grad(heads.biases[i], b)
        if not inputs:
            return None
        return [x[:, :w] for x, w in zip(gx, self.widths)]


class _Decoder:
    """scVI's decoder and the ZINB log-likelihood of the counts, forward now and backward on
    request, one C call each (``decoder_zinb_*`` of ``csrc/stacked_mlp.c``)."""

    def __init__(self, m, z: torch.Tensor, batch_n1: torch.Tensor, x: torch.Tensor):
        self.lib = _mlp_kernels()
        px = m.decoder.px_decoder
        lins = [layer[0] for layer in px.fc_layers]
        outs = [m.decoder.px_scale_decoder[0], m.decoder.px_dropout_decoder]
        self.params = lins + outs
        self.px_r = m.px_r
        n, g = x.shape
        h = lins[0].out_features
        nb = m.n_batch if m.n_batch > 1 else 0
        self.dims = (n, g, z.shape[1], h, len(lins), nb, int(bool(px.inject_covariates)))
        self.z, self.x = z.contiguous(), x
        self.batch = batch_n1.reshape(-1).long().contiguous()
        self.hs = [x.new_empty(n, h) for _ in lins]
        self.rho, self.mu, self.zi = (x.new_empty(n, g) for _ in range(3))
        self.dmu, self.dzi, self.dth = (x.new_empty(n, g) for _ in range(3))
        self.theta = x.new_empty(g)
        self.ll = x.new_empty(n)
        self._w = _ptrs([p.weight for p in self.params])
        self._hs = _ptrs(self.hs)
        status = self.lib.decoder_zinb_forward(
            *self.dims, self.z.data_ptr(), self.batch.data_ptr(), x.data_ptr(), self._w,
            _ptrs([p.bias for p in self.params]), m.px_r.data_ptr(), self._hs,
            self.rho.data_ptr(), self.mu.data_ptr(), self.zi.data_ptr(), self.theta.data_ptr(),
            self.ll.data_ptr(), self.dmu.data_ptr(), self.dzi.data_ptr(), self.dth.data_ptr())
        if status != 0:
            raise MemoryError("the ZINB kernel could not allocate its scratch memory.")

    def backward(self, grad_n: torch.Tensor) -> torch.Tensor:
        """Accumulate the decoder's and ``px_r``'s gradients for ``d loss / d ll = grad_n``;
        returns ``d loss / d z``."""
        n, g, k, h = self.dims[:4]
        grad_n = grad_n.contiguous()  # bound: the C call reads it
        g_w = [torch.empty_like(p.weight) for p in self.params]
        g_b = [torch.empty_like(p.bias) for p in self.params]
        g_px_r = torch.empty_like(self.px_r)
        d_z = self.z.new_empty(n, k)
        scratch = [self.x.new_empty(n, g), self.x.new_empty(n, g), self.x.new_empty(n, h),
                   self.x.new_empty(n, h)]  # referenced until the call returns
        self.lib.decoder_zinb_backward(
            *self.dims, self.z.data_ptr(), self.batch.data_ptr(), self._w, self._hs,
            self.rho.data_ptr(), self.mu.data_ptr(), self.theta.data_ptr(), self.dmu.data_ptr(),
            self.dzi.data_ptr(), self.dth.data_ptr(), grad_n.data_ptr(),
            _ptrs(g_w), _ptrs(g_b), g_px_r.data_ptr(), d_z.data_ptr(),
            *[t.data_ptr() for t in scratch])
        for p, gw, gb in zip(self.params, g_w, g_b):
            _grad(p.weight, gw)
            _grad(p.bias, gb)
        _grad(self.px_r, g_px_r)
        return d_z


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
        self._sites: dict[str, _Site] = {}

    # ------------------------------------------------------------------ encoders
    def _encode(self, x_in: torch.Tensor) -> dict:
        """The three encoders' forward (their hidden layers, then the Gaussian heads, the
        posterior sample and the KL terms, one C call each): a dict of the saved tensors, with
        ``loc``, ``scale``, ``z`` and ``kl`` ``(n, k)``."""
        site = self._site("encoders")
        _, eps, p = self._enc_tail
        mlp = _MLP([x_in] * 3, site, eps, p, True)
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
            klc, _ptrs([g[0] for g in grads[:3]]), _ptrs([g[1] for g in grads[:3]]),
            _ptrs([g[0] for g in grads[3:]]), _ptrs([g[1] for g in grads[3:]]),
            d_act.data_ptr(), d_v.data_ptr())
        for lin, (gw, gb) in zip(means + variances, grads):
            _grad(lin.weight, gw)
            _grad(lin.bias, gb)
        layer_grads, _ = mlp.backward(d_act, params=True, inputs=False)
        for i, lay in enumerate(layer_grads):
            for e, (gw, gb) in enumerate(lay):
                _grad(enc["lins"][e][i].weight, gw)
                _grad(enc["lins"][e][i].bias, gb)

    # ------------------------------------------------------------------ step
    def adversary_update(self, loc_nk: torch.Tensor, targets: dict) -> torch.Tensor:
        """The adversaries' own loss on the (detached) posterior means, with its parameter
        gradients accumulated (alternating optimisation's first pass); the summed
        cross-entropy."""
        m = self.m
        heads = self._heads(m.adversaries, m.adv_names, loc_nk, targets)
        heads.backward(torch.ones_like(heads.ce_g), params=True, inputs=False)
        return heads.ce_g.sum()

    def _heads(self, heads, names, loc_nk, targets) -> _Heads:
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
        return _Heads(heads, self._site(key), inputs, target_gn, weight_gn, heads.n_classes_g)

    def _site(self, key: str) -> _Site:
        """The cached :class:`_Site` of ``"encoders"``, ``"heads"`` or ``"adversaries"``,
        rebuilt when a parameter's storage changed (``.to()``, a new ``.data``; optimisers and
        ``load_state_dict`` update in place)."""
        storage = tuple(p.data_ptr() for p in self._params)
        if storage != self._storage:
            self._sites.clear()
            self._storage = storage
        site = self._sites.get(key)
        if site is None:
            if key == "encoders":
                lins = [[layer_parts(layer)[0] for layer in enc.encoder.fc_layers]
                        for enc in self.encs]
                layers = [[(lins[e][i].weight, lins[e][i].bias) for e in range(3)]
                          for i in range(len(lins[0]))]
                site = _Site(layers, self.m.n_input, True)
                site.lins = lins
                means = [enc.mean_encoder for enc in self.encs]
                variances = [enc.var_encoder for enc in self.encs]
                site.gauss = (_ptrs([lin.weight for lin in means]),
                              _ptrs([lin.bias for lin in means]),
                              _ptrs([lin.weight for lin in variances]),
                              _ptrs([lin.bias for lin in variances]))
            else:
                heads = getattr(self.m, key)
                layers = [list(zip(_slices(heads.weights[i]), _slices(heads.biases[i])))
                          for i in range(len(heads.layer_norms))]
                site = _Site(layers, heads.weights[0].shape[1], False)
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
        x = tensors[K.X_KEY]
        n = x.shape[0]
        x = x.contiguous()
        x_in = torch.log1p(x) if m.log_variational else x
        enc = self._encode(x_in)
        loc, z, kl_nk = enc["loc"], enc["z"], enc["kl"]
        targets = m._targets(tensors)
        loc_d = loc.detach()
        if adversary_step is not None and m.adversaries is not None:
            adversary_step(lambda: self.adversary_update(loc_d, targets))
        # decoder and likelihood (one C pass)
        dec = _Decoder(m, z, tensors[K.BATCH_KEY], x)
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
