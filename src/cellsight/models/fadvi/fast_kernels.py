"""C bindings of FADVI's written-out training step (:mod:`cellsight.models.fadvi.fast_step`).

Each class runs one block of the network as one C call forward and one backward
(``csrc/stacked_mlp.c``, built by :mod:`cellsight.nn.native`; the matrix products by the BLAS
sgemm torch uses or, on AMD CPUs with AVX-512, by ``csrc/gemm.c``, see
:func:`~cellsight.nn.native.native_gemm_wanted`): :class:`MLP` the hidden layers of stacked
networks (the three encoders, a group of classifier heads) described by a :class:`Site`,
:class:`Heads` a :class:`~cellsight.models.fadvi.heads.ParallelClassifiers` with its masked
cross-entropy, and :class:`Decoder` scVI's decoder with the ZINB likelihood. Arguments passed
to C are kept referenced until each call returns.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from cellsight.models.fadvi.heads import ParallelClassifiers
from cellsight.nn import native
from cellsight.nn.dropout import LEVELS, dropout_bits, dropout_threshold

__all__ = ["Decoder", "Heads", "MLP", "Site", "accumulate_grad", "mlp_kernels", "ptrs",
           "slices"]


def accumulate_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """Accumulate ``g`` into ``p.grad`` (as autograd does)."""
    if g.shape != p.shape:
        g = g.reshape(p.shape)
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
_PP = ctypes.POINTER(ctypes.c_void_p)
_INT = ctypes.c_int
_SIGNATURES = {
    "set_native_gemm": (_INT, [_INT]),
    "has_native_gemm": (_INT, []),
    "gemm_for_tests": (None, [_INT] * 5 + [_F32, _P, _INT, _P, _INT, _F32, _P, _INT]),
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


def _bind_products(lib: ctypes.CDLL) -> None:
    lib.set_sgemm(ctypes.c_void_p(native.blas_sgemm()))
    lib.set_native_gemm(int(native.native_gemm_wanted()))


def mlp_kernels() -> ctypes.CDLL | None:
    """``csrc/stacked_mlp.c`` with its signatures set, torch's sgemm bound and its matrix
    product kernel chosen (:func:`cellsight.nn.native.native_gemm_wanted`), or ``None``."""
    if native.blas_sgemm() is None:
        return None
    return native.library("stacked_mlp", _SIGNATURES, init=_bind_products)


def ptrs(tensors) -> ctypes.Array:
    """A C array of the data pointers of ``tensors`` (``None`` entries: NULL)."""
    return (ctypes.c_void_p * len(tensors))(*[native.ptr(t) for t in tensors])


def slices(t: torch.Tensor) -> list[torch.Tensor]:
    """The ``G`` leading slices of a stacked ``(G, ...)`` tensor."""
    return list(t.unbind(0))


class Site:
    """The fixed C arguments of ``G`` stacked networks' hidden layers: ``layers[l][g]`` is
    ``(weight, bias)`` of layer ``l`` of network ``g`` (with ``wt`` the weights are ``(out,
    in)`` as ``nn.Linear`` stores them, else ``(in, out)``), ``k_in`` the input width; the
    pointer arrays are built once (the parameters are updated in place)."""

    def __init__(self, layers, k_in: int, wt: bool):
        self.layers, self.wt, self.g = layers, int(wt), len(layers[0])
        self.widths = [int(k_in)] + [
            (lay[0][0].shape[0] if wt else lay[0][0].shape[1]) for lay in layers]
        self.widths_c = (ctypes.c_int64 * len(self.widths))(*self.widths)
        self.w = ptrs([lay[i][0] for lay in layers for i in range(self.g)])
        self.b = ptrs([lay[i][1] for lay in layers for i in range(self.g)])


class MLP:
    """Hidden layers Linear -> [LayerNorm] -> ReLU -> [dropout] of the networks of a
    :class:`Site`, forward now and backward on request, one C call each
    (``csrc/stacked_mlp.c``); ``inputs``: each network's ``(n, k)`` input."""

    def __init__(self, inputs, site: Site, eps: float | None, p: float, training: bool):
        self.lib = mlp_kernels()
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
        self._x = ptrs(inputs)
        self._act, self._xhat, self._rstd = ptrs(self.act), ptrs(self.xhat), ptrs(self.rstd)
        self.lib.mlp_forward(g, n, self.n_layers, self._widths_c, self._x, self._w, self._b,
                             self.wt, ptrs(bits), threshold, self.scale,
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
            gw = ptrs([lay[i][0] for lay in grads for i in range(g)])
            gb = ptrs([lay[i][1] for lay in grads for i in range(g)])
        gx = [torch.empty_like(x) for x in self.inputs] if inputs else None
        self.lib.mlp_backward(g, n, self.n_layers, self._widths_c, self._x, self._w, self.wt,
                              self._act, self._xhat, self._rstd, self.scale, int(self.ln),
                              d.data_ptr(), gw, gb, None if gx is None else ptrs(gx),
                              other.data_ptr())
        return grads, gx


class Heads:
    """Forward of a :class:`ParallelClassifiers` and its masked cross-entropy, with the
    backward on request (parameter gradients and/or the gradient of the inputs)."""

    def __init__(self, heads: ParallelClassifiers, site: Site, inputs: list[torch.Tensor],
                 target_gn: torch.Tensor, weight_gn: torch.Tensor, n_classes_g: torch.Tensor):
        """``site``: the heads' hidden layers (views of the stacked parameters)."""
        self.heads = heads
        self.widths = [x.shape[-1] for x in inputs]
        k_max = heads.weights[0].shape[1]
        x_gnk = torch.stack([x if x.shape[-1] == k_max else F.pad(x, (0, k_max - x.shape[-1]))
                             for x in inputs])
        norm = heads.layer_norms[0]
        eps = float(norm.eps) if isinstance(norm, nn.LayerNorm) else None
        self.mlp = MLP(slices(x_gnk), site, eps, heads.dropout_rate, heads.training)
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
            list(zip(slices(w), slices(b))) for w, b in stacked])
        if params:
            accumulate_grad(heads.weights[-1], g_wo)
            accumulate_grad(heads.biases[-1], g_bo)
            for i, (w, b) in enumerate(stacked):
                accumulate_grad(heads.weights[i], w)
                accumulate_grad(heads.biases[i], b)
        if not inputs:
            return None
        return [x[:, :w] for x, w in zip(gx, self.widths)]


class Decoder:
    """scVI's decoder and the ZINB log-likelihood of the counts, forward now and backward on
    request, one C call each (``decoder_zinb_*`` of ``csrc/stacked_mlp.c``)."""

    @staticmethod
    def layers(m) -> list[nn.Linear]:
        """The decoder's Linear layers in the kernel's order (hidden, scale, zero-inflation)."""
        lins = [layer[0] for layer in m.decoder.px_decoder.fc_layers]
        return lins + [m.decoder.px_scale_decoder[0], m.decoder.px_dropout_decoder]

    def __init__(self, m, z: torch.Tensor, batch_n1: torch.Tensor, x: torch.Tensor,
                 site: Site | None = None):
        """``site``: the layers' cached pointer arrays (:meth:`site`), else built here."""
        self.lib = mlp_kernels()
        px = m.decoder.px_decoder
        self.params = self.layers(m)
        lins = self.params[:-2]
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
        site = site or self.site(m)
        self._w = site.w
        self._hs = ptrs(self.hs)
        status = self.lib.decoder_zinb_forward(
            *self.dims, self.z.data_ptr(), self.batch.data_ptr(), x.data_ptr(), self._w,
            site.b, m.px_r.data_ptr(), self._hs,
            self.rho.data_ptr(), self.mu.data_ptr(), self.zi.data_ptr(), self.theta.data_ptr(),
            self.ll.data_ptr(), self.dmu.data_ptr(), self.dzi.data_ptr(), self.dth.data_ptr())
        if status != 0:
            raise MemoryError("the ZINB kernel could not allocate its scratch memory.")

    @classmethod
    def site(cls, m) -> Site:
        """The pointer arrays of the decoder's weights and biases (one "network")."""
        return Site([[(lin.weight, lin.bias)] for lin in cls.layers(m)], 0, True)

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
            ptrs(g_w), ptrs(g_b), g_px_r.data_ptr(), d_z.data_ptr(),
            *[t.data_ptr() for t in scratch])
        for p, gw, gb in zip(self.params, g_w, g_b):
            accumulate_grad(p.weight, gw)
            accumulate_grad(p.bias, gb)
        accumulate_grad(self.px_r, g_px_r)
        return d_z
