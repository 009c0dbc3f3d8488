"""Sparse CSR minibatches: conversions between SciPy and torch, and per-row helpers.

Streaming statistics read mostly-zero count matrices; keeping a minibatch in CSR through the
sparsity-preserving transforms (normalise total, log1p, gene filter) and into the statistic
costs work in proportion to the non-zeros instead of ``cells x genes``. These helpers are the
small vocabulary for that: a CSR tensor's row of every stored value, a copy with new values,
and conversions.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["is_csr", "csr_tensor", "csr_to_scipy", "csr_row_index", "csr_with_values"]


def is_csr(x: torch.Tensor) -> bool:
    """Whether ``x`` is a torch sparse CSR tensor."""
    return isinstance(x, torch.Tensor) and x.layout == torch.sparse_csr


def csr_tensor(x: sp.spmatrix | sp.sparray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A SciPy sparse matrix as a torch CSR tensor (int64 indices, ``dtype`` values)."""
    x = sp.csr_matrix(x)
    if not x.has_sorted_indices:
        x = x.sorted_indices()
    return _csr(
        torch.from_numpy(x.indptr.astype(np.int64)),
        torch.from_numpy(x.indices.astype(np.int64)),
        torch.from_numpy(np.ascontiguousarray(x.data)).to(dtype),
        x.shape,
    )


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    # the arrays come from a valid SciPy CSR matrix (or one of ours): no invariant checks;
    # torch's once-per-process "CSR support is in beta" notice says nothing to our users
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=tuple(shape),
                                       check_invariants=False)


def csr_to_scipy(x_ng: torch.Tensor) -> sp.csr_matrix:
    """A torch CSR tensor (CPU) as a SciPy CSR matrix, sharing the index arrays."""
    return sp.csr_matrix(
        (x_ng.values().numpy(), x_ng.col_indices().numpy(), x_ng.crow_indices().numpy()),
        shape=tuple(x_ng.shape),
    )


def csr_row_index(x_ng: torch.Tensor) -> torch.Tensor:
    """The row of every stored value of a CSR tensor (``(nnz,)`` long)."""
    counts = torch.diff(x_ng.crow_indices())
    return torch.repeat_interleave(torch.arange(x_ng.shape[0], device=counts.device), counts)


def csr_with_values(x_ng: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A CSR tensor with the sparsity pattern of ``x_ng`` and new stored ``values``."""
    return _csr(x_ng.crow_indices(), x_ng.col_indices(), values, x_ng.shape)
