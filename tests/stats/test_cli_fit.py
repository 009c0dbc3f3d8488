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


@pytest.fixture
def no_data_read(monkeypatch):
    """Make reading the data (and so any pass over it) fail the test."""
    import cellsight.cli_fit as cli_fit

    def fail(*args, **kwargs):
        raise AssertionError("the data were read before the config was checked")

    monkeypatch.setattr(cli_fit, "stream_data", fail)


def test_out_of_range_quantiles_are_rejected_before_reading_data(shards, no_data_read, capsys):
    from cellsight.cli import main as cellsight_main

    _, _, paths = shards
    with pytest.raises(ValueError, match=r"quantiles=\[1.5\] must hold values in \[0, 1\]"):
        main(["tdigest", f"--data.paths={paths}", "--quantiles=[1.5]"])
    assert cellsight_main(["fit", "tdigest", f"--data.paths={paths}", "--quantiles=[]"]) == 1
    assert "cellsight fit: error: quantiles is empty" in capsys.readouterr().err


@pytest.mark.parametrize("devices", ["0", "-2", "gpu"])
def test_bad_trainer_devices_is_a_clean_error_line(shards, no_data_read, capsys, devices):
    from cellsight.cli import main as cellsight_main

    _, _, paths = shards
    assert cellsight_main(["fit", "mean_var", f"--data.paths={paths}",
                           f"--trainer.devices={devices}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cellsight fit: error: trainer.devices=")
    assert devices in err.splitlines()[0]
    assert "positive integer" in err and "'auto'" in err and "Traceback" not in err


def test_lightning_misconfiguration_is_reported_as_a_value_error(shards, tmp_path,
                                                                  monkeypatch):
    """A trainer setting Lightning refuses (e.g. an accelerator this machine lacks) becomes a
    ValueError, which `cellsight` prints as one error line."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    import cellsight.cli_fit as cli_fit

    def refuse(*args, **kwargs):
        raise MisconfigurationException("No supported gpu backend found!")

    monkeypatch.setattr(cli_fit, "fit_statistic", refuse)
    _, _, paths = shards
    with pytest.raises(ValueError, match="the trainer section is not valid: No supported gpu"):
        main(["mean_var", f"--data.paths={paths}", f"--output_dir={tmp_path}"])


def test_ipca_with_more_components_than_cells_fails_before_the_pass(shards, monkeypatch,
                                                                   tmp_path):
    import cellsight.cli_fit as cli_fit

    def fail(*args, **kwargs):
        raise AssertionError("the pass started before n_components was checked")

    monkeypatch.setattr(cli_fit, "fit_statistic", fail)
    cells, _, _ = shards
    small = write_shards(cells[:100], tmp_path, [(0, 100)])  # 100 cells, 150 genes
    with pytest.raises(ValueError, match=r"n_components=120 is more than the number of cells "
                                         r"\(n_obs=100\)"):
        main(["ipca", f"--data.paths={small}", "--model.n_components=120"])


def _printed_config(model, paths, capsys):
    with pytest.raises(SystemExit) as stop:
        main([model, f"--data.paths={paths}", "--print_config"])
    assert stop.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_of_mean_var_lists_only_its_own_options(shards, capsys):
    import inspect

    import cellsight.pp as cpp

    _, _, paths = shards
    printed = _printed_config("mean_var", paths, capsys)
    assert "quantiles" not in printed and "mean_path" not in printed
    assert set(printed["model"]) == {"algorithm"}  # output_path: the table goes to output_dir
    assert {"lr", "lr_schedule", "max_epochs"}.isdisjoint(printed["trainer"])
    # the CLI and cellsight.pp.mean_var default to the same algorithm
    pp_default = inspect.signature(cpp.mean_var).parameters["algorithm"].default
    assert printed["model"]["algorithm"] == pp_default == "shifted_data"


def test_print_config_keeps_the_model_specific_options(shards, capsys):
    _, _, paths = shards
    assert _printed_config("tdigest", paths, capsys)["quantiles"] == [0.5, 0.9]
    ppca = _printed_config("ppca", paths, capsys)
    assert "mean_path" in ppca and "quantiles" not in ppca
    assert {"lr", "lr_schedule", "max_epochs"} <= set(ppca["trainer"])


def test_options_of_other_models_are_rejected(shards):
    _, _, paths = shards
    with pytest.raises(SystemExit) as stop:
        main(["mean_var", f"--data.paths={paths}", "--quantiles=[0.5]"])
    assert stop.value.code == 2
