"""The ordered steps of ``cellsight demo``.

To add a step: write ``cellsight/demo/<name>.py`` defining ``STEP = DemoStep(name, title, run)``
(see :mod:`cellsight.demo.scvi`) and append it to :data:`STEPS` below.
"""

from __future__ import annotations

from cellsight.demo import cautrigger, fadvi, scvi
from cellsight.demo.core import DemoStep

__all__ = ["STEPS", "step_names"]

STEPS: list[DemoStep] = [
    scvi.STEP,
    fadvi.STEP,
    cautrigger.STEP,
    # later steps (causal triggers, FADVI, ...) go here, in the order they should run
]


def step_names() -> list[str]:
    """Names of the available steps, in order."""
    return [s.name for s in STEPS]
