"""The demo's machinery: a context shared by the steps, running them, writing the report.

A step is a :class:`DemoStep`: a name, a one-line title and a function ``run(ctx)`` that does
its work, writes its files into ``ctx.out_dir`` (recording them with :meth:`DemoContext.add_file`)
and adds its part of the report with :meth:`DemoContext.add_section`.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from anndata import AnnData

__all__ = ["DemoContext", "DemoStep", "run_steps", "REPORT_FILE"]

REPORT_FILE = "report.md"


@dataclass(frozen=True)
class DemoStep:
    """One step of ``cellsight demo``.

    Attributes
    ----------
    name
        Short name (used by ``cellsight demo --steps``).
    title
        One line saying what the step shows.
    run
        ``run(ctx)``: does the work; files go to ``ctx.out_dir``, text to the report.
    """

    name: str
    title: str
    run: Callable[[DemoContext], None]


@dataclass
class DemoContext:
    """What the steps share: settings, a data cache, the report being written.

    Attributes
    ----------
    out_dir
        Directory for every output file.
    quick
        Tiny settings (a few epochs) for smoke tests; results are not meaningful.
    max_epochs
        Overrides each step's number of training epochs.
    seed
        Seed of every model, split and embedding.
    progress_bar
        Show Lightning's progress bars.
    log
        Where progress lines go (default: ``print`` with flush).
    """

    out_dir: Path
    quick: bool = False
    max_epochs: int | None = None
    seed: int = 0
    progress_bar: bool = True
    log: Callable[[str], None] = field(default=lambda msg: print(msg, flush=True))
    sections: list[tuple[str, str]] = field(default_factory=list)
    files: list[tuple[str, str]] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)
    _cache: dict[str, AnnData] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    def epochs(self, full: int, quick: int = 3) -> int:
        """Training epochs for a step: ``max_epochs`` if given, else ``quick`` or ``full``."""
        if self.max_epochs is not None:
            return int(self.max_epochs)
        return int(quick if self.quick else full)

    def dataset(self, name: str) -> AnnData:
        """A bundled dataset (``cellsight.datasets.<name>()``), read once; returns a copy."""
        if name not in self._cache:
            from cellsight import datasets

            loader = getattr(datasets, name, None)
            if loader is None or not callable(loader):
                raise ValueError(f"cellsight.datasets has no loader {name!r}.")
            self._cache[name] = loader()
        return self._cache[name].copy()

    def path(self, filename: str) -> Path:
        """``out_dir / filename``."""
        return self.out_dir / filename

    def add_file(self, filename: str, description: str) -> None:
        """Record an output file for the report's file list."""
        self.files.append((filename, description))

    def add_section(self, title: str, body: str) -> None:
        """Add a Markdown section (``## title``) to the report."""
        self.sections.append((title, body.strip()))


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("cellsight", "torch", "lightning", "scvi-tools", "anndata", "scanpy"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            continue
    return ", ".join(parts)


def _write_report(ctx: DemoContext, steps: Sequence[DemoStep], total_s: float) -> Path:
    lines = [
        "# cellsight demo report",
        "",
        f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {os.cpu_count()} CPU cores, {platform.platform()}, Python "
        f"{sys.version.split()[0]}",
        f"- versions: {_versions()}",
        f"- settings: quick={ctx.quick}, max_epochs={ctx.max_epochs or 'per step'}, "
        f"seed={ctx.seed}",
        f"- total time: {total_s:.1f} s",
        "",
        "| step | what | seconds |",
        "|---|---|---|",
    ]
    titles = {s.name: s.title for s in steps}
    lines += [f"| {name} | {titles.get(name, '')} | {sec:.1f} |" for name, sec in ctx.timings]
    for title, body in ctx.sections:
        lines += ["", f"## {title}", "", body]
    if ctx.files:
        lines += ["", "## Files", ""]
        lines += [f"- `{name}`: {desc}" for name, desc in ctx.files + [(REPORT_FILE, "this")]]
    path = ctx.path(REPORT_FILE)
    path.write_text("\n".join(lines) + "\n")
    return path


def run_steps(steps: Sequence[DemoStep], ctx: DemoContext) -> Path:
    """Run ``steps`` in order with ``ctx`` and write ``report.md``; returns its path."""
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, step in enumerate(steps, 1):
        ctx.log(f"[{i}/{len(steps)}] {step.name}: {step.title}")
        t0 = time.perf_counter()
        step.run(ctx)
        ctx.timings.append((step.name, time.perf_counter() - t0))
        ctx.log(f"[{i}/{len(steps)}] {step.name} done in {ctx.timings[-1][1]:.1f} s")
    path = _write_report(ctx, steps, time.perf_counter() - start)
    ctx.log(f"report: {path}")
    return path
