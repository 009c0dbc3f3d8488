"""FADVI trained on real PBMC counts with a planted batch effect, scored on hidden labels.

One FADVI and one scVI are trained once (module fixture, ~25 s on one core) on
``pbmc_with_batches()``: the bundled 700 PBMC 68k cells split at random into two batches with
a per-gene log-normal effect (sigma 0.5), resampled as Poisson counts, with 20% of the labels
(142 cells, stratified) hidden as ``"Unknown"``. Accuracies are scored on the hidden cells
only: their labels were never used in training.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellsight.models import FADVI, SCVI
from cellsight.models.fadvi.data import pbmc_with_batches
from cellsight.models.fadvi.metrics import knn_transfer_accuracy, latent_predictability

EPOCHS = 100
# canonical PBMC markers (all among the 765 genes) and the largest rank accepted. Measured
# over two model seeds (Integrated Gradients from zero counts, ranked by mean |attribution|):
# CD79A 1-4, NKG7 2, GNLY 1, LYZ 5-14 (S100A8 46-85). LYZ's attribution to "CD14+ Monocyte" is
# *negative*: the data's "Dendritic" class is monocyte-like with even more LYZ, so LYZ is the
# strongest evidence separating the two, in the direction of "Dendritic".
MARKERS = {
    "CD19+ B": (("CD79A", "MS4A1"), 10),
    "CD56+ NK": (("NKG7", "GNLY"), 10),
    "CD14+ Monocyte": (("LYZ", "S100A8"), 20),
}


@pytest.fixture(scope="module")
def trained():
    adata, hidden = pbmc_with_batches(seed=0)
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="labels_observed")
    model = FADVI(adata, seed=0)
    model.train(max_epochs=EPOCHS, enable_progress_bar=False)
    ref = adata.copy()
    SCVI.setup_anndata(ref, batch_key="batch")
    scvi_model = SCVI(ref, seed=0)
    scvi_model.train(max_epochs=EPOCHS, enable_progress_bar=False)
    truth = adata.obs["bulk_labels"].astype(str).to_numpy()
    return {"model": model, "adata": adata, "hidden": hidden, "truth": truth,
            "z_scvi": scvi_model.get_latent_representation()}


def test_hidden_label_knn_accuracy_from_z_l_matches_or_beats_scvi(trained):
    z_l = trained["model"].get_latent_representation(representation="l")
    ours = knn_transfer_accuracy(z_l, trained["truth"], trained["hidden"])
    scvi_acc = knn_transfer_accuracy(trained["z_scvi"], trained["truth"], trained["hidden"])
    # 142 hidden cells: the standard error of an accuracy near 0.8 is 0.034; measured here
    # 0.775 (ours) vs 0.782 (scVI); over three model seeds ours is 0.746-0.810 (mean 0.777) and
    # scVI is 0.782-0.824 over two data seeds: within one standard error of each other.
    # One standard error of slack keeps the test about the method, not the draw.
    assert ours >= scvi_acc - 0.035
    assert ours >= 0.75


def test_hidden_label_predict_accuracy_is_high(trained):
    pred = trained["model"].predict()
    hidden = trained["hidden"]
    acc = float((pred[hidden] == trained["truth"][hidden]).mean())
    # the most frequent type (Dendritic) is 34% of the cells; measured 0.77 (three model seeds:
    # 0.73-0.80), fadvi 0.76
    assert acc >= 0.72


def test_batch_is_predictable_from_z_b_and_near_chance_from_z_l_and_z_r(trained):
    model, adata = trained["model"], trained["adata"]
    batch = adata.obs["batch"].astype(str).to_numpy()
    acc = {r: latent_predictability(model.get_latent_representation(representation=r), batch)
           for r in ("b", "l", "r")}
    chance = acc["l"]["chance"]  # ~0.5: batches were assigned at random
    assert acc["b"]["accuracy"] >= 0.95
    # 700 cells: the accuracy of a classifier at chance has sd ~0.02, so 0.08 above chance
    # (four sd) is a real batch signal
    # measured 0.51 and 0.54 (with BatchNorm encoders z_l reached 0.59-0.60)
    assert acc["l"]["accuracy"] <= chance + 0.08
    assert acc["r"]["accuracy"] <= chance + 0.08


def test_predict_is_deterministic_and_returns_label_names(trained):
    model = trained["model"]
    a, b = model.predict(), model.predict()
    np.testing.assert_array_equal(a, b)
    assert set(a) <= set(model.class_names) and "Unknown" not in model.class_names
    soft = model.predict(soft=True)
    assert list(soft.columns) == model.class_names
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(soft.to_numpy().argmax(1),
                                  [model.class_names.index(x) for x in a])
    batches = model.predict(prediction_mode="batch", return_numpy=False)
    assert isinstance(batches, pd.Series) and set(batches) <= {"batch0", "batch1"}


def test_predict_with_sampling_is_seeded_and_differs_from_the_mean(trained):
    model = trained["model"]
    s1 = model.predict(soft=True, give_mean=False)
    s2 = model.predict(soft=True, give_mean=False)
    pd.testing.assert_frame_equal(s1, s2)
    assert not np.allclose(s1.to_numpy(), model.predict(soft=True).to_numpy())


def test_label_head_attributions_rank_known_markers_near_the_top(trained):
    model, truth = trained["model"], trained["truth"]
    idx = np.flatnonzero(np.isin(truth, list(MARKERS)))
    res = model.predict(indices=idx, interpretability="ig",
                        interpretability_args={"n_steps": 20})
    assert res["attributions"].shape == (len(idx), model.summary.n_vars)
    ranked = model.get_ranked_features(attributions=res["attributions"], groupby=truth[idx])
    for cell_type, (genes, max_rank) in MARKERS.items():
        sub = ranked[ranked["group"] == cell_type].set_index("feature")
        best = int(sub.loc[list(genes), "rank"].min())
        # 765 genes: rank 10 is the top 1.3%, rank 20 the top 2.6%
        assert best <= max_rank, (cell_type, sub.head(10).index.tolist())


def test_label_head_ig_is_complete_against_the_predicted_probabilities(trained):
    """Integrated Gradients of the predicted class's probability sum to p(x) - p(0). With the
    zero-count baseline p(0) is the same for every cell (the label encoder reads no
    covariates), so p(x) - sum(attributions) is one constant across the cells explaining a
    class. LayerNorm makes the encoder scale-invariant, so the probability rises within the
    first percent of the path: 50 steps do not resolve it (and say so), 1,000 do."""
    model = trained["model"]
    soft = model.predict(soft=True)
    code = soft.to_numpy().argmax(1)
    top = np.bincount(code).argmax()
    idx = np.flatnonzero(code == top)[:8]
    with pytest.warns(UserWarning, match="Integrated Gradients did not converge with n_steps=50"):
        model.predict(indices=idx, interpretability="ig")
    res = model.predict(indices=idx, interpretability="ig",
                        interpretability_args={"n_steps": 1000})
    assert set(res["explained_class"]) == {soft.columns[top]}
    p_x = soft.to_numpy()[idx, top]
    implied_p0 = p_x - res["attributions"].sum(1)
    assert np.ptp(implied_p0) <= 0.03, (implied_p0, p_x)
    assert np.all(np.abs(p_x - implied_p0) > 0.5)  # the class is far from the baseline's
    _, delta = model.get_feature_attributions(
        indices=idx, target="label_probability", target_index=np.full(len(idx), top),
        method="ig", n_steps=1000, return_numpy=True, return_delta=True, show_progress=False)
    assert np.abs(np.asarray(delta)).max() <= 0.03


def test_ranked_features_per_predicted_class_and_overall(trained):
    model = trained["model"]
    res = model.predict(indices=np.arange(40), interpretability="gs",
                        interpretability_args={"n_samples": 5})
    overall = model.get_ranked_features(attributions=res, top_n=10)
    assert len(overall) == 10 and list(overall["rank"]) == list(range(1, 11))
    assert {"feature", "feature_idx", "attribution_mean", "attribution_std",
            "attribution_abs_mean", "n_cells"} <= set(overall.columns)
    per_class = model.get_ranked_features(attributions=res, top_n=5, groupby="predicted")
    assert set(per_class["group"]) == set(res["predictions"])
    preds, attrs = model.predict(indices=np.arange(40), interpretability="gs",
                                 interpretability_args={"n_samples": 5}, return_dict=False)
    np.testing.assert_array_equal(preds, res["predictions"])
    np.testing.assert_allclose(attrs, res["attributions"])


def test_save_load_round_trip_is_exact(trained, tmp_path):
    model, adata = trained["model"], trained["adata"]
    model.save(str(tmp_path / "m"))
    loaded = FADVI.load(str(tmp_path / "m"), adata=adata)
    for rep in ("full", "l"):
        np.testing.assert_array_equal(loaded.get_latent_representation(representation=rep),
                                      model.get_latent_representation(representation=rep))
    np.testing.assert_array_equal(loaded.predict(), model.predict())
    pd.testing.assert_frame_equal(loaded.predict(soft=True, give_mean=False),
                                  model.predict(soft=True, give_mean=False))
    pd.testing.assert_frame_equal(loaded.history, model.history)


def test_normalized_expression_sums_to_library_size_and_transforms_batch(trained):
    model = trained["model"]
    expr = model.get_normalized_expression(indices=np.arange(20), library_size=1e4)
    assert expr.shape == (20, model.summary.n_vars)
    np.testing.assert_allclose(expr.sum(1), 1e4, rtol=1e-4)
    b0 = model.get_normalized_expression(indices=np.arange(20), transform_batch="batch0")
    b1 = model.get_normalized_expression(indices=np.arange(20), transform_batch=1)
    assert not np.allclose(b0.to_numpy(), b1.to_numpy())
    some = model.get_normalized_expression(indices=np.arange(5), gene_list=["LYZ", "CD79A"],
                                           n_samples=3, return_mean=False)
    assert some.shape == (3, 5, 2)
    drawn = model.get_normalized_expression(indices=np.arange(5), n_samples_overall=12)
    assert drawn.shape == (12, model.summary.n_vars)
    with pytest.raises(ValueError, match="not a batch"):
        model.get_normalized_expression(transform_batch="batch7")


def test_latent_representations_have_the_requested_parts(trained):
    model = trained["model"]
    full = model.get_latent_representation(representation="full", indices=np.arange(10))
    assert full.shape == (10, 70)
    lr = model.get_latent_representation(representation="label_residual", indices=np.arange(10))
    np.testing.assert_array_equal(lr, full[:, 30:])
    dist = model.get_latent_representation(representation="b", indices=np.arange(10),
                                           return_dist=True)
    np.testing.assert_array_equal(dist["mean"], full[:, :30])
    assert (dist["variance"] > 0).all() and dist["dist"].loc.shape == (10, 30)
    sampled = model.get_latent_representation(give_mean=False, indices=np.arange(10))
    assert not np.allclose(sampled, full[:, 30:60])
