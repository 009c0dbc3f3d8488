"""The order in which streamed cells are served: block shuffling, rank and worker splits, resume.

Everything here is index arithmetic on cell numbers; nothing reads data. One epoch is planned
in four steps, each a pure function of ``(indices, seed, epoch)`` and the sizes:

1. **Blocks.** The cells to serve (sorted, for training) are cut into blocks of
   ``block_size`` consecutive cells: a block is one contiguous read from disk.
2. **Stream.** Blocks are put in a random order (seeded by ``(seed, epoch)``; with
   ``block_size=1`` exactly the in-memory loader's permutation), consecutive groups of
   ``buffer_blocks`` blocks form a *buffer*, and cells are shuffled within each buffer. The
   concatenation is the epoch's global stream; it does not depend on the number of processes.
3. **Ranks.** Rank ``r`` of ``w`` serves a contiguous part of the stream (sizes differ by at
   most one cell). With ``even=True`` (training under DDP) a shorter part is padded with its
   own first cell, so every rank has ``ceil(n / w)`` cells and runs the same number of steps;
   at most ``w - 1`` cells per epoch are served twice. With ``even=False`` (validation,
   inference) every cell is served exactly once.
4. **Workers.** A rank's minibatches are numbered in stream order. With ``k`` DataLoader
   workers the serving sequence interleaves ``k`` contiguous ranges of minibatch numbers
   (worker ``i`` reads only the buffers of its range); worker ``i`` produces the entries
   ``i, i + k, i + 2k, ...`` of the sequence, which is exactly the order in which a
   ``DataLoader`` collects them. Resuming after ``m`` served minibatches serves the sequence
   from entry ``m`` on.
"""

from __future__ import annotations

import math

import numpy as np

from cellsight.data.loaders import epoch_permutation

__all__ = [
    "epoch_stream",
    "rank_positions",
    "n_batches",
    "serve_sequence",
]


def epoch_stream(
    indices: np.ndarray,
    *,
    block_size: int,
    buffer_blocks: int,
    shuffle: bool,
    seed: int,
    epoch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's global order of cells and the buffer each position belongs to.

    Parameters
    ----------
    indices
        Cells to serve (global cell numbers). Without ``shuffle`` they are served in the given
        order.
    block_size, buffer_blocks
        Cells per contiguous block; blocks per shuffle buffer.
    shuffle, seed, epoch
        Block-shuffle with a permutation depending only on ``(seed, epoch)``.

    Returns
    -------
    ``(cells, buffer_id)``, both of length ``len(indices)``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    n_blocks = math.ceil(n / block_size)
    if not shuffle:
        buffer_id = np.arange(n, dtype=np.int64) // (block_size * buffer_blocks)
        return indices, buffer_id
    base = np.sort(indices)
    order_b = epoch_permutation(n_blocks, seed, epoch)
    starts = order_b * block_size
    lengths = np.minimum(starts + block_size, n) - starts
    # position -> source position in `base`, block by block in the shuffled block order
    block_of_pos = np.repeat(np.arange(n_blocks), lengths)
    first_pos = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    src = starts[block_of_pos] + (np.arange(n) - first_pos[block_of_pos])
    buffer_id = block_of_pos // buffer_blocks
    if buffer_blocks * block_size > 1:
        keys = np.random.default_rng([int(seed), int(epoch), 1]).random(n)
        within = np.lexsort((keys, buffer_id))
        src = src[within]
    return base[src], buffer_id


def rank_positions(n: int, rank: int, world: int, *, even: bool) -> np.ndarray:
    """Positions in the epoch stream served by ``rank`` (contiguous; padded when ``even``)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} must be in [0, world_size={world}).")
    sizes = np.full(world, n // world, dtype=np.int64)
    sizes[: n % world] += 1
    start = int(sizes[:rank].sum())
    pos = np.arange(start, start + sizes[rank], dtype=np.int64)
    if even and world > 1 and n > 0:
        target = math.ceil(n / world)
        if len(pos) < target:
            source = pos if len(pos) else np.arange(n, dtype=np.int64)
            pad = np.resize(source, target - len(pos))
            pos = np.concatenate([pos, pad])
    return pos


def n_batches(n_cells: int, batch_size: int, drop_last: bool) -> int:
    """Minibatches for ``n_cells`` cells."""
    return n_cells // batch_size if drop_last else math.ceil(n_cells / batch_size)


def serve_sequence(n: int, n_streams: int) -> np.ndarray:
    """Minibatch numbers ``0..n-1`` in the order a ``DataLoader`` with ``n_streams`` workers
    serves them, worker ``i`` owning the ``i``-th contiguous range (round robin, in order)."""
    if n_streams <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    sizes = np.full(n_streams, n // n_streams, dtype=np.int64)
    sizes[: n % n_streams] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    out = [starts[i] + j for j in range(int(sizes[0])) for i in range(n_streams) if j < sizes[i]]
    return np.asarray(out, dtype=np.int64)
