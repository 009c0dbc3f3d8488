"""Training figures: loss curves and embeddings draw exactly the data they are given."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from matplotlib.figure import Figure

from cellsight.plot import embedding, embedding_and_loss, loss_curves


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _history(n_epochs: int = 8) -> pd.DataFrame:
    epochs = np.arange(n_epochs)
    hist = pd.DataFrame(
        {
            "elbo_train": 1000.0 / (epochs + 1),
            "elbo_validation": 1100.0 / (epochs + 1),
            "reconstruction_loss_train": 900.0 / (epochs + 1),
            "kl_local_train": np.linspace(1, 5, n_epochs),
            "train_loss_epoch": 1000.0 / (epochs + 1),
        },
        index=pd.Index(epochs, name="epoch"),
    )
    hist.loc[3, "elbo_validation"] = np.nan  # a missing validation epoch
    return hist


def _adata(n: int = 60) -> AnnData:
    rng = np.random.default_rng(0)
    adata = AnnData(np.zeros((n, 3), dtype=np.float32))
    adata.obs["kind"] = pd.Categorical(np.array(["a", "b", "c"])[np.arange(n) % 3])
    adata.obs["score"] = rng.normal(size=n)
    adata.obsm["X_umap"] = rng.normal(size=(n, 2))
    adata.uns["kind_colors"] = ["#ff0000", "#00ff00", "#0000ff"]
    return adata


def test_loss_curves_draw_one_panel_per_default_metric_with_the_history_values():
    hist = _history()
    fig = loss_curves(hist)
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["elbo", "reconstruction loss", "kl local"]
    train, val = fig.axes[0].lines
    np.testing.assert_array_equal(train.get_ydata(), hist["elbo_train"].to_numpy())
    # the NaN epoch is left out, not drawn as zero
    ok = hist["elbo_validation"].notna()
    np.testing.assert_array_equal(val.get_xdata(), hist.index[ok].to_numpy(dtype=float))
    np.testing.assert_array_equal(val.get_ydata(), hist.loc[ok, "elbo_validation"].to_numpy())


def test_loss_curves_fall_back_to_every_train_metric_for_other_models():
    hist = pd.DataFrame(
        {"loss_train": [3.0, 2.0], "acc_train": [0.5, 0.7], "acc_validation": [0.4, 0.6]}
    )
    fig = loss_curves(hist)
    assert sorted(ax.get_title() for ax in fig.axes) == ["acc", "loss"]


def test_loss_curves_reject_empty_history_unknown_metric_and_wrong_axes():
    with pytest.raises(ValueError, match="history is empty"):
        loss_curves(pd.DataFrame())
    with pytest.raises(ValueError, match="no '<metric>_train'"):
        loss_curves(_history(), metrics=["accuracy"])
    _, axes = plt.subplots(1, 2)
    with pytest.raises(ValueError, match="one axes per metric"):
        loss_curves(_history(), metrics=["elbo"], axes=axes)


def test_embedding_colours_categories_with_stored_colours_and_keeps_adata_unchanged():
    adata = _adata()
    uns_before = {k: list(v) for k, v in adata.uns.items()}
    fig = embedding(adata, basis="X_umap", color="kind")
    ax = fig.axes[0]
    assert len(ax.collections) == 3
    for coll, name, hexcol in zip(ax.collections, ["a", "b", "c"], adata.uns["kind_colors"]):
        sel = (adata.obs["kind"] == name).to_numpy()
        np.testing.assert_allclose(coll.get_offsets(), adata.obsm["X_umap"][sel])
        np.testing.assert_allclose(
            coll.get_facecolor()[0][:3], plt.matplotlib.colors.to_rgb(hexcol)
        )
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]
    assert {k: list(v) for k, v in adata.uns.items()} == uns_before


def test_embedding_numeric_colour_gets_a_colour_bar():
    fig = embedding(_adata(), color="score")
    assert len(fig.axes) == 2  # the scatter and its colour bar


def test_embedding_rejects_missing_basis_and_colour():
    with pytest.raises(ValueError, match="not in adata.obsm"):
        embedding(_adata(), basis="X_tsne")
    with pytest.raises(ValueError, match="not a column of adata.obs"):
        embedding(_adata(), color="cell_type")


def test_embedding_and_loss_puts_the_embedding_beside_the_metric_panels():
    fig = embedding_and_loss(_adata(), _history(), color="kind", metrics=None, title="run")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["kind", "elbo", "reconstruction loss", "kl local"]
    assert fig._suptitle.get_text() == "run"
