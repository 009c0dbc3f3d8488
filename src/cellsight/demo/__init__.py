"""``cellsight demo``: a short tour that trains models on bundled data and writes a report.

Each step lives in its own module (``cellsight.demo.scvi``, ...) and is listed in
:data:`cellsight.demo.steps.STEPS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from cellsight.demo.core import REPORT_FILE, DemoContext, DemoStep, run_steps
from cellsight.demo.steps import STEPS, step_names

__all__ = ["run_demo", "DemoContext", "DemoStep", "STEPS", "step_names", "REPORT_FILE"]


def run_demo(
    out: str | Path = "demo_out",
    max_epochs: int | None = None,
    quick: bool = False,
    seed: int = 0,
    steps: Sequence[str] | None = None,
    progress_bar: bool = True,
    log: Callable[[str], None] | None = None,
) -> DemoContext:
    """Run the demo steps and write their files and ``report.md`` into ``out``.

    Parameters
    ----------
    out
        Output directory (created if needed; files in it are overwritten).
    max_epochs
        Training epochs of every step (default: each step's own, a few with ``quick``).
    quick
        Tiny settings for a smoke test (a few epochs); the numbers are not meaningful.
    seed
        Seed of models, splits and embeddings: the same seed gives the same results on CPU.
    steps
        Names of the steps to run (default: all, in order; see :func:`step_names`).
    progress_bar
        Show training progress bars.
    log
        Function receiving progress lines (default: print).

    Returns
    -------
    The context after the run (``ctx.files``, ``ctx.timings``, report sections).
    """
    if max_epochs is not None and int(max_epochs) < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
    chosen = list(STEPS)
    if steps is not None:
        unknown = [s for s in steps if s not in step_names()]
        if unknown or not steps:
            raise ValueError(
                f"Unknown or no demo steps {unknown or list(steps)}; choose from {step_names()}."
            )
        chosen = [s for s in STEPS if s.name in set(steps)]
    ctx = DemoContext(
        out_dir=Path(out), quick=quick, max_epochs=max_epochs, seed=seed, progress_bar=progress_bar
    )
    if log is not None:
        ctx.log = log
    run_steps(chosen, ctx)
    return ctx
