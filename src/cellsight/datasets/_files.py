"""Where the bundled files live and how they are read (never downloaded)."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata
from anndata import AnnData

__all__ = ["DATA_DIR", "FILES", "data_path", "read_bundled"]

DATA_DIR = Path(__file__).resolve().parent / "data"

# short name -> file name (the file name records the source package and version; see LICENSES.md)
FILES = {
    "pbmc3k": "pbmc3k_raw__desc-2.1.1.h5ad",
    "pbmc68k_reduced": "pbmc68k_reduced__scanpy-1.11.5.h5ad",
    "wu2020": "wu2020_200__scirpy-0.22.5.h5ad",
    "pbmc_cite_5k": "pbmc_5k_protein_v3_200cells__scvi-tools-1.4.2-sdist.h5ad",
    "pbmc_cite_10k": "pbmc_10k_protein_v3_200cells__scvi-tools-1.4.2-sdist.h5ad",
    "mouse_10k": "mouse_10k_subset_1000genes_raw__scanpy-1.11.5-sdist.h5ad",
    "visium_mouse_brain": "visium_mouse_brain_49spots__squidpy-1.8.2-sdist.h5ad",
    "cell_ontology": "CL-ontology-v2026-03-26__cellxgene-ontology-guide-1.11.1.json.zst",
}


def data_path(name: str) -> Path:
    """Path of the bundled file called ``name`` (a key of :data:`FILES`)."""
    if name not in FILES:
        raise ValueError(f"Unknown bundled dataset {name!r}; known: {sorted(FILES)}.")
    path = DATA_DIR / FILES[name]
    if not path.is_file():
        raise ValueError(
            f"The bundled file {path} is missing, so this cellsight installation is incomplete; "
            "reinstall cellsight (the data files ship inside the package, nothing is downloaded)."
        )
    return path


def read_bundled(name: str) -> AnnData:
    """Read a bundled ``.h5ad`` into memory (a fresh object on every call)."""
    with warnings.catch_warnings():
        # old files keep graphs in uns['neighbors']; anndata moves them to obsp and warns
        warnings.filterwarnings("ignore", category=FutureWarning, module="anndata")
        warnings.filterwarnings("ignore", ".*Moving element from .uns.*")
        # files written by old anndata versions lack encoding metadata; they read correctly
        warnings.filterwarnings("ignore", ".*without encoding metadata.*")
        warnings.filterwarnings("ignore", ".*written with a very old version of AnnData.*")
        return anndata.read_h5ad(data_path(name))
