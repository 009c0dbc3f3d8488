"""`cellsight fit <model> --config x.yaml`: chained runs over shards, --print_config."""

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from stats_helpers import lognorm, mouse, write_shards

from cellsight.cli_fit import main


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    cells = mouse(1500, 150)
    folder = tmp_path_factory.mktemp("cli")
    return cells, folder, write_shards(cells, folder, [(0, 600), (600, 1000), (1000, 1500)])


def _config(path, body):
    path.write_text(yaml.safe_dump(body))
    return str(path)


def test_mean_var_then_zscored_pca_chain_through_files(shards, tmp_path):
    cells, _, paths = shards
    out = str(tmp_path / "out")
    data = {"paths": paths, "batch_size": 256}
    lognormal = [{"class_path": "cellsight.stats.transforms.NormalizeTotal"},
                 {"class_path": "cellsight.stats.transforms.Log1p"}]
    trainer = {"enable_progress_bar": False}
    mv = _config(tmp_path / "mv.yaml", {"data": data, "transforms": lognormal,
                                        "output_dir": out, "trainer": trainer})
    assert main(["mean_var", "--config", mv]) == 0
    pca = _config(tmp_path / "pca.yaml", {
        "data": data, "output_dir": out, "trainer": trainer, "model": {"n_components": 4},
        "transforms": lognormal + [{"class_path": "cellsight.stats.transforms.ZScore",
                                    "init_args": {"stats_path": f"{out}/mean_var.csv"}}],
    })
    assert main(["IncrementalPCA", "--config", pca]) == 0
    # reference: exact PCA of the z-scored log-normalised counts (population std, as written)
    x = lognorm(cells.X.toarray())
    std = x.std(0)
    z = (x - x.mean(0)) / np.where(std == 0, 1, std)
    _, s, vh = torch.linalg.svd(torch.as_tensor(z - z.mean(0)), full_matrices=False)
    var = pd.read_csv(f"{out}/ipca_variance.csv", index_col=0)
    np.testing.assert_allclose(var["explained_variance"], (s[:4] ** 2 / len(z)).numpy(),
                               rtol=1e-6)
    comps = pd.read_csv(f"{out}/ipca.csv", index_col=0)
    assert list(comps.index) == list(cells.var_names)
    np.testing.assert_allclose(np.abs(comps.to_numpy().T), np.abs(vh[:4].numpy()), atol=1e-6)
    state = torch.load(f"{out}/ipca.pt", weights_only=True)
    assert state["model"] == "ipca" and "S_q" in state["state_dict"]


def test_print_config_prints_every_section(shards, tmp_path, capsys):
    _, _, paths = shards
    cfg = _config(tmp_path / "h.yaml", {"data": {"paths": paths, "batch_key": None},
                                        "model": {"n_top_genes": 20}})
    with pytest.raises(SystemExit) as stop:
        main(["hvg", "--config", cfg, "--print_config"])
    assert stop.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["n_top_genes"] == 20
    assert printed["model"]["flavor"] == "seurat_v3"
    assert {"data", "trainer", "transforms", "output_dir"} <= set(printed)


def test_tdigest_and_hvg_runs_write_tables(shards, tmp_path):
    cells, _, paths = shards
    out = str(tmp_path / "o")
    assert main(["tdigest", f"--data.paths={paths}", f"--output_dir={out}",
                 "--quantiles=[0.5]", "--trainer.enable_progress_bar=false"]) == 0
    q = pd.read_csv(f"{out}/tdigest.csv", index_col=0)
    assert "0.5" in q.columns and len(q) == cells.n_vars
    assert main(["hvg", f"--data.paths={paths}", "--model.n_top_genes=30",
                 f"--output_dir={out}", "--trainer.enable_progress_bar=false"]) == 0
    assert pd.read_csv(f"{out}/hvg.csv", index_col=0)["highly_variable"].sum() == 30


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown model 'umap'"):
        main(["umap"])
    assert main([]) == 2


def test_cellsight_console_dispatches_fit_and_reports_bad_models(shards, tmp_path, capsys):
    """`cellsight fit ...` (the console entry point) runs cli_fit with the rest of argv."""
    from cellsight.cli import main as cellsight_main

    cells, _, paths = shards
    out = str(tmp_path / "m")
    assert cellsight_main(["fit", "mean_var", f"--data.paths={paths}", f"--output_dir={out}",
                           "--trainer.enable_progress_bar=false"]) == 0
    table = pd.read_csv(f"{out}/mean_var.csv", index_col=0)
    np.testing.assert_allclose(table["mean"], cells.X.toarray().mean(0), rtol=1e-5)
    assert cellsight_main(["fit", "nosuchmodel"]) == 1
    assert "Unknown model 'nosuchmodel'" in capsys.readouterr().err
    assert cellsight_main(["fit"]) == 2
