"""Bundled small real datasets and simulators with planted truth.

Every loader reads a file shipped inside the package (``cellsight/datasets/data/``, sources and
licences in ``LICENSES.md`` there) and returns a fresh object; nothing is ever downloaded.

=========================  ==============  ==============================================
loader                     cells x genes   content
=========================  ==============  ==============================================
``pbmc68k_reduced()``      700 x 765       integer counts, 10 cell types (``bulk_labels``)
``pbmc3k()``               2700 x 32738    raw counts, no labels
``pbmc_cite(which)``       200-400 x ~16k  raw counts + ADT (CITE-seq), 2 batches
``mouse_10k()``            10000 x 1000    raw sparse counts, no labels
``visium_mouse_brain()``   49 x 1999       log-normalised, spatial coordinates
``wu2020()``               200 x 30727     raw counts, T-cell states, patients, TCR
``cell_ontology()``        3596 terms      Cell Ontology labels and ancestors (dict)
``simulate_counts(...)``   any             NB counts, cell types, markers, batch effects
``simulate_batch_effect``  as input        real counts split into batches, planted effects
=========================  ==============  ==============================================
"""

from cellsight.datasets._files import data_path
from cellsight.datasets.batch_effect import simulate_batch_effect
from cellsight.datasets.causal import simulate_causal_cascade
from cellsight.datasets.mouse import mouse_10k, visium_mouse_brain
from cellsight.datasets.ontology import cell_ontology
from cellsight.datasets.pbmc import pbmc3k, pbmc68k_reduced, pbmc_cite
from cellsight.datasets.simulate import simulate_counts
from cellsight.datasets.tcells import wu2020

__all__ = [
    "data_path",
    "pbmc68k_reduced",
    "pbmc3k",
    "pbmc_cite",
    "mouse_10k",
    "visium_mouse_brain",
    "wu2020",
    "cell_ontology",
    "simulate_counts",
    "simulate_batch_effect",
    "simulate_causal_cascade",
]
