"""Streaming statistics: one pass (or two) over data of any size, across processes.

Each statistic is a model updated per minibatch and reduced across DDP ranks at the end of
an epoch, so results are complete on every rank:

- :class:`OnePassMeanVarStd`: per-gene (and per-batch) mean, variance, standard deviation;
- :class:`TDigest`: per-gene quantiles of the non-zero values;
- :class:`HVGSeuratV3`: Seurat v3 highly variable genes (two passes);
- :class:`IncrementalPCA`: principal components (incremental SVD, or exact one-pass Gram);
- :class:`ProbabilisticPCA`: PPCA by stochastic gradients (marginalised or linear VAE).

:mod:`cellsight.stats.transforms` holds the per-batch transforms; :func:`fit_statistic` runs
a statistic over a data module; ``cellsight.pp`` / ``cellsight.tl`` hide all of it.
"""

from cellsight.stats.base import StatisticPlan, StreamingModel, fit_statistic, stats_strategy
from cellsight.stats.data import StreamData, stream_data
from cellsight.stats.hvg import HVGSeuratV3
from cellsight.stats.ipca import IncrementalPCA
from cellsight.stats.mean_var import OnePassMeanVarStd
from cellsight.stats.ppca import ProbabilisticPCA
from cellsight.stats.tdigest import TDigest
from cellsight.stats.transforms import Densify, Filter, Log1p, NormalizeTotal, ZScore

__all__ = [
    "StreamingModel",
    "StatisticPlan",
    "fit_statistic",
    "stats_strategy",
    "StreamData",
    "stream_data",
    "OnePassMeanVarStd",
    "TDigest",
    "HVGSeuratV3",
    "IncrementalPCA",
    "ProbabilisticPCA",
    "Densify",
    "NormalizeTotal",
    "Log1p",
    "ZScore",
    "Filter",
]
