"""The data layer: registration, in-memory and sharded (streaming) loaders, validation.

Public names are imported on first use, so ``import cellsight.data`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule defining it
_EXPORTS = {
    "read_shards": "shards",
    "is_sharded": "shards",
    "validate_shards": "shards",
    "ShardedDataModule": "shards_module",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"cellsight.data.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cellsight.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
