"""cellsight: interpretable, causal and scalable deep learning for single-cell and spatial omics.

Subpackages are imported on first use (``cellsight.models``, ``cellsight.datasets``,
``cellsight.interpret``, ``cellsight.pp``, ``cellsight.tl``, ``cellsight.plot`` ...), so
``import cellsight`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "data",
    "datasets",
    "interpret",
    "models",
    "nn",
    "plot",
    "pp",
    "stats",
    "tl",
    "train",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"cellsight.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'cellsight' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
