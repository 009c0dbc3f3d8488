"""The demo machinery (steps, context, report) and its sanity metric, without training."""

from __future__ import annotations

import numpy as np
import pytest

from cellsight.demo import STEPS, DemoContext, DemoStep, run_demo, step_names
from cellsight.demo.core import run_steps
from cellsight.demo.metrics import knn_label_accuracy, majority_accuracy


def test_steps_are_registered_in_order_with_unique_names():
    assert step_names()[0] == "scvi"
    assert len(set(step_names())) == len(STEPS)


def test_run_steps_runs_in_order_shares_context_and_writes_the_report(tmp_path):
    seen = []

    def first(ctx):
        seen.append("first")
        ctx.path("a.txt").write_text("a")
        ctx.add_file("a.txt", "file of the first step")
        ctx.add_section("First", f"epochs: {ctx.epochs(full=100, quick=2)}")

    def second(ctx):
        seen.append("second")
        ctx.add_section("Second", f"cells: {ctx.dataset('pbmc68k_reduced').n_obs}")

    lines = []
    ctx = DemoContext(out_dir=tmp_path / "out", quick=True, log=lines.append)
    run_steps([DemoStep("one", "first step", first), DemoStep("two", "second", second)], ctx)
    assert seen == ["first", "second"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.index("## First") < report.index("## Second")
    assert "epochs: 2" in report and "cells: 700" in report
    assert "`a.txt`: file of the first step" in report
    assert "| one | first step |" in report and "| two | second |" in report
    assert lines[0] == "[1/2] one: first step"


def test_context_epochs_prefers_explicit_max_epochs():
    assert DemoContext(out_dir=".", quick=True, max_epochs=9).epochs(full=100, quick=2) == 9
    assert DemoContext(out_dir=".").epochs(full=100, quick=2) == 100


def test_context_dataset_returns_copies():
    ctx = DemoContext(out_dir=".")
    a = ctx.dataset("pbmc68k_reduced")
    a.obs["bulk_labels"] = "x"
    assert (ctx.dataset("pbmc68k_reduced").obs["bulk_labels"] != "x").all()
    with pytest.raises(ValueError, match="no loader"):
        ctx.dataset("nope")


def test_run_demo_rejects_unknown_steps_and_bad_epochs(tmp_path):
    with pytest.raises(ValueError, match="choose from"):
        run_demo(out=tmp_path, steps=["fadvi_typo"])
    with pytest.raises(ValueError, match="max_epochs"):
        run_demo(out=tmp_path, max_epochs=0)


def test_knn_label_accuracy_is_one_on_separated_clusters_and_chance_on_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 100)
    centres = {"a": 0.0, "b": 20.0, "c": 40.0}
    z = rng.normal(size=(300, 4)) + np.array([centres[x] for x in labels])[:, None]
    assert knn_label_accuracy(z, labels) == 1.0
    noise = rng.normal(size=(300, 4))
    acc = knn_label_accuracy(noise, labels)
    assert abs(acc - 1 / 3) < 0.12  # 300 held-out predictions: sd of chance accuracy ~0.03
    assert majority_accuracy(labels) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="one row"):
        knn_label_accuracy(z[:10], labels)
