"""Adam / AdamW whose step is one C call over all parameters (``csrc/adam.c``).

A small model's optimiser step on CPU carries bookkeeping: torch's ``Adam.step`` (even with
``fused=True``) groups the parameters by device and dtype, checks them and dispatches on every
call. For FADVI's 45 tensors (716,607 values) a warm step took 0.56-0.59 ms with torch's fused
kernel against 0.34-0.58 ms here (the arithmetic itself is memory-bound), and whole FADVI
epochs outside Lightning 71.8 against 75.8 ms (medians of 6 alternating process pairs, the
machine's speed drifting by about 10%).

:class:`NativeAdam` is a ``torch.optim.Adam`` (same constructor, same state layout, so
``state_dict``/``load_state_dict``, Lightning checkpoints, hooks and LR schedulers work
unchanged) whose ``step`` runs the update of every parameter that has a gradient in one C call
when it can: float32 contiguous CPU parameters and gradients, a float learning rate, no
``amsgrad``, ``capturable`` or ``differentiable``. Otherwise (or with ``CELLSIGHT_NATIVE=0``, or
without a C compiler) it is torch's own step. Both give the same update to float32 rounding
(tests compare them).
"""

from __future__ import annotations

import ctypes

import torch

from cellsight.nn import native

__all__ = ["NativeAdam"]

_P, _I64, _I32, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_double
_PP = ctypes.POINTER(ctypes.c_void_p)


_SIGNATURES = {"adam_step": (None, [_I64, ctypes.POINTER(_I64), _PP, _PP, _PP, _PP, _PP, _F64,
                                     _F64, _F64, _F64, _F64, _I32, _I32])}


def _kernel():
    return native.library("adam", _SIGNATURES)


class NativeAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (``decoupled_weight_decay=True``: AdamW) with its step in one C call
    where possible (see the module notes); parameters as ``torch.optim.Adam``'s."""

    @torch.no_grad()
    def step(self, closure=None):
        """One optimisation step (``closure``: re-evaluates the model and returns the loss)."""
        lib = _kernel()
        if lib is None:
            return super().step(closure)
        loss = None
        if closure is not None:  # first: in automatic optimisation it computes the gradients
            with torch.enable_grad():
                loss = closure()
        calls = [self._arguments(group) for group in self.param_groups]
        if any(call is False for call in calls):
            super().step()
            return loss
        for call in calls:
            if call is not None:
                lib.adam_step(*call)
        return loss

    def _arguments(self, group: dict):
        """The C call's arguments for ``group`` (``None``: no gradients; ``False``: an option
        or a tensor the C step does not cover). Creates missing state as torch does.

        The pointer arrays of the parameters and their state are kept between steps (only the
        gradients' are rebuilt) while the same parameters have gradients, their storage is
        unchanged and their state is the same tensors (``load_state_dict`` replaces it)."""
        if group["amsgrad"] or group.get("capturable") or group.get("differentiable"):
            return False
        if any(isinstance(v, torch.Tensor) for v in (group["lr"], *group["betas"])):
            return False
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        grads = [p.grad for p in params]
        for p, g in zip(params, grads):
            if not (g.layout == torch.strided and g.dtype == torch.float32 and g.is_contiguous()
                    and g.shape == p.shape):
                return False
        cache = self.__dict__.setdefault("_native_arrays", {})
        fixed = cache.get(id(group))
        if fixed is None or not fixed.matches(params, self.state):
            fixed = _FixedArrays.build(params, self.state)
            if fixed is None:
                return False
            cache[id(group)] = fixed
        n = len(params)
        grad_array = (ctypes.c_void_p * n)(*[g.data_ptr() for g in grads])
        beta1, beta2 = group["betas"]
        # the tensors stay referenced by the group and the state until the call returns
        return (n, fixed.numel, fixed.param, grad_array, fixed.exp_avg, fixed.exp_avg_sq,
                fixed.step, float(group["lr"]), float(beta1), float(beta2),
                float(group["eps"]), float(group["weight_decay"]),
                int(group["decoupled_weight_decay"]), int(group["maximize"]))


class _FixedArrays:
    """The C step's pointer arrays of a list of parameters and their Adam state."""

    def __init__(self, params, states, state_dict):
        self.states, self.state_dict = states, state_dict
        self.tensors = [(p, st["step"], st["exp_avg"], st["exp_avg_sq"])
                        for p, st in zip(params, states)]
        # every storage address the C step writes to, checked before each reuse
        self.ptrs = [tuple(t.data_ptr() for t in ts) for ts in self.tensors]
        n = len(params)
        self.numel = (ctypes.c_int64 * n)(*[p.numel() for p in params])
        self.param, self.step, self.exp_avg, self.exp_avg_sq = (
            (ctypes.c_void_p * n)(*[ptr[i] for ptr in self.ptrs]) for i in range(4))

    @classmethod
    def build(cls, params, state_dict) -> _FixedArrays | None:
        """Check the parameters and create missing state as torch does; ``None`` if a tensor
        is not covered by the C step."""
        states = []
        for p in params:
            if not (p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous()):
                return None
            state = state_dict[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
            if not (step.dtype == torch.float32 and step.device.type == "cpu"
                    and m.is_contiguous() and v.is_contiguous()
                    and m.shape == p.shape and v.shape == p.shape):
                return None
            states.append(state)
        return cls(params, states, state_dict)

    def matches(self, params, state_dict) -> bool:
        """Whether these arrays still describe ``params`` and their state: the same parameter
        and state tensors, at the same storage addresses."""
        if state_dict is not self.state_dict or len(params) != len(self.tensors):
            return False
        for p, st, kept, ptr in zip(params, self.states, self.tensors, self.ptrs):
            if state_dict.get(p) is not st:
                return False
            now = (p, st.get("step"), st.get("exp_avg"), st.get("exp_avg_sq"))
            if any(a is not b for a, b in zip(now, kept)):
                return False
            if ptr != tuple(t.data_ptr() for t in kept):
                return False
        return True
