"""OnePassMeanVarStd and cellsight.pp.mean_var against numpy on the same transformed data."""

import numpy as np
import pandas as pd
import pytest
import torch
from stats_helpers import lognorm, mouse

import cellsight.pp as cpp
from cellsight.stats import Log1p, NormalizeTotal, OnePassMeanVarStd, fit_statistic, stream_data


@pytest.fixture(scope="module")
def cells():
    return mouse(2000, 300)


def _stream(model, x_ng, batch_n=None, batch_size=256):
    for s in range(0, x_ng.shape[0], batch_size):
        b = None if batch_n is None else torch.as_tensor(batch_n[s : s + batch_size])[:, None]
        model(torch.as_tensor(x_ng[s : s + batch_size]), batch_index_n=b)


@pytest.mark.parametrize("algorithm", ["naive", "shifted_data"])
def test_mean_var_std_match_numpy_on_lognormalised_counts_per_batch(cells, algorithm):
    """rtol 1e-5 (float64 sums; numpy on the same float64 values)."""
    src = stream_data(cells, batch_key="sample", batch_size=300)
    model = OnePassMeanVarStd(src.var_names_g, algorithm, n_batch=3, output_path=None)
    fit_statistic(model, src.datamodule, transforms=[NormalizeTotal(), Log1p()],
                  input_var_names_g=src.var_names_g)
    x = lognorm(cells.X.toarray())
    codes = cells.obs["sample"].astype("category").cat.codes.to_numpy()
    np.testing.assert_allclose(model.mean_g.numpy(), x.mean(0), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(model.var_g.numpy(), x.var(0), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(model.std_g.numpy(), x.std(0), rtol=1e-5, atol=1e-12)
    for b in range(3):
        np.testing.assert_allclose(model.batch_mean_bg[b].numpy(), x[codes == b].mean(0),
                                   rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(model.batch_var_bg[b].numpy(), x[codes == b].var(0),
                                   rtol=1e-5, atol=1e-12)
    assert model.x_size_b.tolist() == [float((codes == b).sum()) for b in range(3)]


def test_shifted_data_is_exact_with_a_large_offset():
    """mean 100, std 0.1: x**2 sums cancel 6 digits; the shifted sums keep rtol 1e-5 even in
    float32 input (the reference is numpy in float64 on the same float32 values)."""
    rng = np.random.default_rng(1)
    x = (100 + 0.1 * rng.standard_normal((5000, 20))).astype(np.float32)
    model = OnePassMeanVarStd([f"g{i}" for i in range(20)], "shifted_data", output_path=None)
    _stream(model, x, batch_size=333)
    ref = x.astype(np.float64)
    np.testing.assert_allclose(model.mean_g.numpy(), ref.mean(0), rtol=1e-5)
    np.testing.assert_allclose(model.var_g.numpy(), ref.var(0), rtol=1e-5)


def test_pp_mean_var_returns_per_batch_columns_and_sample_variance(cells, tmp_path):
    out = tmp_path / "mv.csv"
    df = cpp.mean_var(cells, normalize_total=1e4, log1p=True, batch_key="sample", ddof=1,
                      output_path=str(out))
    x = lognorm(cells.X.toarray())
    assert list(df.index) == list(cells.var_names)
    np.testing.assert_allclose(df["var"], x.var(0, ddof=1), rtol=1e-5, atol=1e-12)
    sel = (cells.obs["sample"] == "s1").to_numpy()
    np.testing.assert_allclose(df["mean_s1"], x[sel].mean(0), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(df["std_s1"], x[sel].std(0, ddof=1), rtol=1e-5, atol=1e-12)
    pd.testing.assert_frame_equal(pd.read_csv(out, index_col=0), df, check_names=False,
                                  check_index_type=False)


def test_mean_var_from_shards_equals_in_memory(cells, tmp_path):
    from stats_helpers import write_shards

    paths = write_shards(cells, tmp_path, [(0, 500), (500, 1700), (1700, 2000)])
    a = cpp.mean_var(cells, normalize_total=1e4, log1p=True)
    b = cpp.mean_var(paths, normalize_total=1e4, log1p=True, num_workers=2)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-10, atol=1e-14)


def test_output_csv_is_written_at_the_end_of_training(cells, tmp_path):
    src = stream_data(cells)
    out = tmp_path / "sub" / "mv.csv"
    model = OnePassMeanVarStd(src.var_names_g, output_path=str(out))
    fit_statistic(model, src.datamodule, input_var_names_g=src.var_names_g)
    df = pd.read_csv(out, index_col=0)
    np.testing.assert_allclose(df["mean"], cells.X.toarray().mean(0), rtol=1e-5)


def test_bad_inputs_raise_clear_errors(cells):
    model = OnePassMeanVarStd(["a", "b"], n_batch=2, output_path=None)
    with pytest.raises(ValueError, match="no 'batch' codes"):
        model(torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"batch codes must be in \[0, 2\)"):
        model(torch.ones(3, 2), batch_index_n=torch.tensor([[0], [1], [5]]))
    with pytest.raises(ValueError, match="expects minibatches of shape"):
        model(torch.ones(3, 4))
    with pytest.raises(ValueError, match="algorithm"):
        OnePassMeanVarStd(["a"], algorithm="welford")
    with pytest.raises(ValueError, match="duplicated gene names"):
        OnePassMeanVarStd(["a", "a"])
    with pytest.raises(ValueError, match="not a column of adata.obs"):
        cpp.mean_var(cells, batch_key="donor")
    with pytest.raises(ValueError, match="needs max_epochs=1"):
        src = stream_data(cells)
        fit_statistic(OnePassMeanVarStd(src.var_names_g, output_path=None), src.datamodule,
                      max_epochs=2)
