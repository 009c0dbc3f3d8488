"""The ``cellsight`` command line: ``cellsight demo --quick`` end to end, argument handling."""

from __future__ import annotations

import importlib.metadata

import anndata
import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from cellsight.cli import build_parser, main


def test_console_script_points_at_main():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert [ep.value for ep in scripts if ep.name == "cellsight"] == ["cellsight.cli:main"]


def test_no_command_prints_help_and_returns_usage_status(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_demo_options_parse():
    args = build_parser().parse_args(["demo", "--out", "x", "--max-epochs", "7", "--quick"])
    assert (args.command, args.out, args.max_epochs, args.quick) == ("demo", "x", 7, True)
    assert build_parser().parse_args(["demo"]).out == "demo_out"


def test_demo_rejects_non_positive_epochs_as_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--max-epochs", "0"])
    assert exc.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_demo_unknown_step_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "nosuchstep"]) == 1
    err = capsys.readouterr().err
    assert "nosuchstep" in err and "scvi" in err


@pytest.mark.slow
def test_demo_quick_writes_latent_figure_and_report(tmp_path):
    out = tmp_path / "demo_out"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0

    latent = anndata.read_h5ad(out / "latent.h5ad")
    assert latent.shape == (700, 765)
    z = latent.obsm["X_scVI"]
    assert z.shape == (700, 10) and np.isfinite(z).all() and z.std(axis=0).min() > 0
    assert latent.obsm["X_umap"].shape == (700, 2)
    assert latent.obs["bulk_labels"].nunique() == 10

    image = matplotlib.image.imread(out / "scvi_umap_loss.png")
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # something was drawn

    report = (out / "report.md").read_text()
    for needle in ("pbmc68k_reduced", "700 cells x 765 genes", "3 epochs", "kNN accuracy", "ELBO"):
        assert needle in report
    # final ELBOs are numbers, not 'n/a'
    elbo_row = next(line for line in report.splitlines() if line.startswith("| ELBO |"))
    train, val = (float(v) for v in elbo_row.strip("|").split("|")[1:3])
    assert 0 < train < 1e5 and 0 < val < 1e5
    acc_row = next(line for line in report.splitlines() if line.startswith("| scVI latent"))
    assert 0.0 <= float(acc_row.strip("|").split("|")[1]) <= 1.0

    # FADVI step: integrated latents, gene table with q-values, figure
    fadvi = anndata.read_h5ad(out / "fadvi_latent.h5ad")
    for key in ("X_fadvi_b", "X_fadvi_l", "X_fadvi_r"):
        assert fadvi.obsm[key].shape[0] == fadvi.n_obs and np.isfinite(fadvi.obsm[key]).all()
    genes = pd.read_csv(out / "fadvi_top_genes.csv")
    assert {"group", "feature", "qvalue"} <= set(genes.columns)
    assert ((genes["qvalue"] >= 0) & (genes["qvalue"] <= 1)).all()
    assert "FADVI: batch / label / residual latents" in report

    # CauTrigger step: AUROC of both models against the planted truth, in [0, 1]
    assert "CauTrigger on a simulated causal cascade" in report
    for name in ("CauTrigger1L", "CauTrigger2L"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert 0.0 <= float(row.strip("|").split("|")[1]) <= 1.0
    assert (out / "cautrigger_weights.png").exists()
