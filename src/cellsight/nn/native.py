"""Fused CPU kernels written in C, compiled on first use and called through ``ctypes``.

A small model's training step on CPU is dominated not by its matrix products but by dozens of
elementwise operations on ``(cells, genes)`` or ``(cells, hidden)`` tensors, each a separate
pass over memory with its own dispatch and allocation (see :mod:`cellsight.nn.zinb_grad` and
:class:`cellsight.models.fadvi.FADVI`). The kernels here fuse such chains into one loop each
(the ZINB log-likelihood and its gradients; LayerNorm, ReLU and dropout of a hidden layer;
masked cross-entropy), called from ``torch.autograd.Function`` objects; the matrix products stay
with torch.

Building. The C sources live next to this module (``csrc/*.c``). The first call of
:func:`library` compiles one with the system C compiler (``$CC``, else ``cc``/``gcc``; about a
second) into ``$CELLSIGHT_CACHE_DIR/native`` (default ``~/.cache/cellsight/native``) under a
name that hashes the source, the flags, the compiler's version and this CPU's instruction-set
flags, so a changed source or another machine never loads a stale binary; the file is written
to a temporary name and renamed, so concurrent processes (pytest-xdist, DDP ranks) may compile
at the same time safely. Compilation uses ``-O3 -march=native -ffast-math`` (which lets the
compiler use glibc's vectorised ``expf``/``logf``); linking does not use ``-ffast-math``, so
loading a kernel never changes the process's floating-point mode (flush-to-zero).

Nothing is downloaded; without a working compiler (or with ``CELLSIGHT_NATIVE=0``) every
caller falls back to its torch implementation, which gives the same values to float32 rounding;
:func:`library` then warns once with the compiler's message. The kernels take float32,
C-contiguous CPU tensors only; callers check that (:func:`usable`) and fall back otherwise.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["blas_sgemm", "enabled", "library", "native_gemm_wanted", "ptr", "usable"]

_SRC_DIR = Path(__file__).with_name("csrc")
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC",
                  "-std=c11", "-Wall"]
_LIBS: dict[str, ctypes.CDLL | None] = {}
_SGEMM: list[int | None] = []
_WARNED: set[str] = set()


def enabled() -> bool:
    """Whether the native kernels may be used (``CELLSIGHT_NATIVE`` is not ``0``/``false``)."""
    return os.environ.get("CELLSIGHT_NATIVE", "1").strip().lower() not in ("0", "false", "no")


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether the native kernels can take ``tensors`` (``None`` entries are skipped): kernels
    enabled, and each tensor float32, on the CPU and contiguous."""
    if not enabled():
        return False
    return all(
        t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())
        for t in tensors
    )


def ptr(t: torch.Tensor | None) -> int | None:
    """Data pointer of ``t`` for a ``ctypes`` call (``None`` for ``None``)."""
    return None if t is None else t.data_ptr()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpuinfo(*keys: str) -> str | None:
    """The first ``/proc/cpuinfo`` field named by one of ``keys`` (``None``: not there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(keys):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_flags() -> str:
    """This CPU's instruction-set flags (the build is ``-march=native``)."""
    return _cpuinfo("flags", "Features") or platform.processor() or platform.machine()


def _cpu_vendor() -> str:
    """This CPU's vendor string (``/proc/cpuinfo``'s ``vendor_id``; ``""`` if unknown)."""
    return _cpuinfo("vendor_id") or ""


def native_gemm_wanted() -> bool:
    """Whether the stacked kernels should run their matrix products with their own AVX-512
    kernel (``csrc/gemm.c``) rather than the BLAS sgemm torch links.

    ``CELLSIGHT_NATIVE_GEMM=1``/``0`` decides; by default the own kernel is used except on
    Intel CPUs. torch's x86 wheels link MKL, which picks its code path by CPU vendor: on Intel
    it runs AVX-512 kernels tuned beyond what ``gemm.c`` does, on AMD processors with AVX-512
    its AVX2 ones (88-94 GFLOPS on a Zen 5 core against 140-185 for ``gemm.c`` on FADVI's
    shapes). The kernel exists only in builds for AVX-512 CPUs; elsewhere the BLAS is used
    whatever this says. The choice is fixed per machine, so runs stay reproducible.
    """
    flag = os.environ.get("CELLSIGHT_NATIVE_GEMM", "").strip().lower()
    if flag in ("0", "false", "no"):
        return False
    if flag in ("1", "true", "yes"):
        return True
    return _cpu_vendor() != "GenuineIntel"


def _cache_dir() -> Path:
    root = os.environ.get("CELLSIGHT_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "cellsight")
    return Path(root) / "native"


def _build(name: str) -> Path:
    """Compile ``csrc/{name}.c`` into the cache (if not there yet); its path."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC, or install gcc)")
    # every source of the directory, so a change to an #included one rebuilds too
    source = b"\0".join(f.read_bytes() for f in sorted(_SRC_DIR.glob("*.[ch]")))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([
        source, " ".join(_COMPILE_FLAGS).encode(), version.encode(), _cpu_flags().encode(),
        platform.machine().encode(),
    ])).hexdigest()[:16]
    out = _cache_dir() / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = Path(tmp) / f"{name}.o", Path(tmp) / f"{name}.so"
        for cmd in ([cc, *_COMPILE_FLAGS, "-c", str(_SRC_DIR / f"{name}.c"), "-o", str(obj)],
                    [cc, "-shared", str(obj), "-o", str(lib), "-lm"]):
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        os.replace(lib, out)  # atomic: a concurrent build of the same key writes the same file
    return out


Signatures = dict[str, tuple[Any, list[Any]]]


def library(name: str, signatures: Signatures | None = None,
            init: Callable[[ctypes.CDLL], None] | None = None) -> ctypes.CDLL | None:
    """The compiled kernel library ``csrc/{name}.c`` (built on first use), or ``None`` when
    native kernels are disabled or it cannot be built (warned once per process).

    ``signatures`` (``{function: (restype, argtypes)}``) are set and ``init(lib)`` is called
    the first time a caller passes them, so the module that binds a library declares its
    functions in one place whoever loads it first.
    """
    if not enabled():
        return None
    if name not in _LIBS:
        _LIBS[name] = _load(name)
    lib = _LIBS[name]
    if lib is not None and (signatures or init) and not getattr(lib, "_cellsight_bound", False):
        for fn_name, (restype, argtypes) in (signatures or {}).items():
            fn = getattr(lib, fn_name)
            fn.restype, fn.argtypes = restype, argtypes
        if init is not None:
            init(lib)
        lib._cellsight_bound = True
    return lib


def _load(name: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(_build(name)))
    except (OSError, RuntimeError) as err:
        if not _WARNED:  # one warning per process, not one per library
            _WARNED.add(name)
            warnings.warn(
                f"cellsight's native {name!r} kernels could not be built ({err}); using the "
                "torch implementation (same results, slower). Install a C compiler (gcc) to "
                "enable them, or set CELLSIGHT_NATIVE=0 to silence this.",
                RuntimeWarning, stacklevel=3,
            )
        return None


def blas_sgemm() -> int | None:
    """Address of the Fortran ``SGEMM`` of the BLAS that torch's CPU library exports (MKL's on
    x86 wheels), for kernels that chain matrix products themselves; ``None`` when it does not
    export one (those kernels are then not used)."""
    if not _SGEMM:
        addr = None
        lib_dir = Path(torch.__file__).parent / "lib"
        for path in sorted(lib_dir.glob("libtorch_cpu.*")):
            try:
                addr = ctypes.cast(ctypes.CDLL(str(path)).SGEMM, ctypes.c_void_p).value
                break
            except (OSError, AttributeError):
                continue
        _SGEMM.append(addr)
    return _SGEMM[0]
