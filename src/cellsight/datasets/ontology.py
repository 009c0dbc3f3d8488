"""The bundled Cell Ontology (CL) as a plain dictionary."""

from __future__ import annotations

import json
from typing import Any

from cellsight.datasets._files import data_path

__all__ = ["cell_ontology"]

_MAX_BYTES = 10**8  # the decompressed JSON is ~3 MB; a generous cap against a damaged file


def cell_ontology() -> dict[str, dict[str, Any]]:
    """The Cell Ontology (release 2026-03-26): 3,596 CL terms with labels and ancestors.

    Returns
    -------
    dict
        ``"CL:xxxxxxx" -> {"label", "description", "synonyms", "deprecated", "ancestors"}``,
        where ``ancestors`` maps each ancestor term id to its hop distance (1 = direct
        parent). For example ``cell_ontology()["CL:0000084"]["label"] == "T cell"``. A fresh
        dictionary on every call.

    Notes
    -----
    Needs the ``zstandard`` package. Source: ``cellxgene-ontology-guide==1.11.1`` wheel,
    ``cellxgene_ontology_guide/data/CL-ontology-v2026-03-26.json.zst``; package licence MIT,
    ontology content CC-BY 4.0 (the Cell Ontology); see ``cellsight/datasets/data/LICENSES.md``.
    This is a JSON digest, not OBO format.
    """
    try:
        import zstandard
    except ImportError as err:  # pragma: no cover - zstandard is a dependency
        raise ModuleNotFoundError(
            "cell_ontology() needs the 'zstandard' package; install it with "
            "`pip install zstandard`."
        ) from err
    raw = data_path("cell_ontology").read_bytes()
    text = zstandard.ZstdDecompressor().decompress(raw, max_output_size=_MAX_BYTES)
    return json.loads(text)
