"""The counter-based generator of dropout masks (nn/dropout.py, csrc/random_bits.c)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from cellsight.nn import dropout as D
from cellsight.nn import native

needs_native = pytest.mark.skipif(native.library("random_bits") is None,
                                  reason="native kernels unavailable")


def _splitmix_python(seed: int, n: int) -> list[int]:
    """SplitMix64 written out on Python integers (the reference)."""
    mask = (1 << 64) - 1
    out = []
    for i in range(1, n + 1):
        z = (seed + i * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def _unsigned(t: torch.Tensor) -> list[int]:
    return [v & ((1 << 64) - 1) for v in t.tolist()]


def test_torch_words_are_splitmix64():
    # SplitMix64's first output from state 0 is the published 0xE220A8397B1DCDAF
    assert _unsigned(D.splitmix_words_torch(0, 1)) == [0xE220A8397B1DCDAF]
    for seed in (1, 2**40 + 7, 2**63 - 1):
        assert _unsigned(D.splitmix_words_torch(seed, 37)) == _splitmix_python(seed, 37)


@needs_native
@pytest.mark.parametrize("seed", [0, 12345, 2**62 + 17, 2**63 - 1])
def test_c_words_equal_the_torch_words(seed):
    lib = D._words_kernel()
    out = torch.empty(1031, dtype=torch.int64)
    lib.splitmix_words(seed, 1031, out.data_ptr())
    assert torch.equal(out, D.splitmix_words_torch(seed, 1031))


def test_bits_follow_torch_seed_and_match_without_native(monkeypatch):
    torch.manual_seed(3)
    a = D.dropout_bits(1001)
    torch.manual_seed(3)
    b = D.dropout_bits(1001)
    c = D.dropout_bits(1001)
    assert a.shape == (1004,) and a.dtype == torch.int16
    assert torch.equal(a, b) and not torch.equal(b, c)
    monkeypatch.setenv("CELLSIGHT_NATIVE", "0")
    torch.manual_seed(3)
    assert torch.equal(D.dropout_bits(1001), a)


def test_uniforms_are_uniform_and_independent():
    torch.manual_seed(0)
    u = (D.dropout_bits(200_000) & (D.LEVELS - 1)).numpy().astype(np.int64)
    counts = np.bincount(u >> 10, minlength=32)  # 32 equal bins of the 15-bit range
    assert stats.chisquare(counts).pvalue > 1e-3
    x, y = u[:-1] / D.LEVELS, u[1:] / D.LEVELS  # neighbours, also across a word's 4 lanes
    assert abs(np.corrcoef(x, y)[0, 1]) < 0.01
    keep = u >= D.dropout_threshold(0.1)
    assert abs(keep.mean() - 0.9) < 0.003
