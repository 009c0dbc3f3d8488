"""InterpretMixin on models with the scvi-tools module contract (tiny VAE, cellsight's SCVI)."""

import numpy as np
import pandas as pd
import pytest
import torch
from scvi import REGISTRY_KEYS as K
from scvi.distributions import NegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput

from cellsight.interpret import InterpretMixin, sign_test
from cellsight.models.base import BaseModel
from toymodel import toy_adata


class TinyVAEModule(BaseModuleClass):
    """scvi-tools names: inference -> z, qz, library; generative -> px (NB with a scale)."""

    def __init__(self, n_genes: int, n_batch: int, n_latent: int = 3) -> None:
        super().__init__()
        self.n_batch = n_batch
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(n_genes + n_batch, 16), torch.nn.ReLU()
        )
        self.mean = torch.nn.Linear(16, n_latent)
        self.logvar = torch.nn.Linear(16, n_latent)
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(n_latent + n_batch, 16), torch.nn.ReLU(), torch.nn.Linear(16, n_genes),
            torch.nn.Softmax(dim=-1),
        )
        self.log_theta = torch.nn.Parameter(torch.zeros(n_genes))

    def _onehot(self, batch_n1):
        return torch.nn.functional.one_hot(batch_n1.long().squeeze(-1), self.n_batch).float()

    def _get_inference_input(self, tensors):
        return {"x": tensors[K.X_KEY], "batch": tensors[K.BATCH_KEY]}

    def inference(self, x, batch):
        h = self.encoder(torch.cat([torch.log1p(x), self._onehot(batch)], -1))
        qz = torch.distributions.Normal(self.mean(h), torch.exp(0.5 * self.logvar(h)) + 1e-4)
        return {"z": qz.rsample(), "qz": qz, "library": torch.log(x.sum(-1, keepdim=True))}

    def _get_generative_input(self, tensors, inference_outputs):
        return {
            "z": inference_outputs["z"],
            "library": inference_outputs["library"],
            "batch": tensors[K.BATCH_KEY],
        }

    def generative(self, z, library, batch):
        scale = self.decoder(torch.cat([z, self._onehot(batch)], -1))
        px = NegativeBinomial(mu=torch.exp(library) * scale, theta=self.log_theta.exp(),
                              scale=scale)
        return {"px": px}

    def loss(self, tensors, inference_outputs, generative_outputs, kl_weight=1.0):
        rec = -generative_outputs["px"].log_prob(tensors[K.X_KEY]).sum(-1)
        qz = inference_outputs["qz"]
        kl = torch.distributions.kl_divergence(
            qz, torch.distributions.Normal(torch.zeros_like(qz.loc), torch.ones_like(qz.loc))
        ).sum(-1)
        return LossOutput(loss=(rec + kl_weight * kl).mean(), reconstruction_loss=rec,
                          kl_local=kl)


class TinyVAE(InterpretMixin, BaseModel):
    def __init__(self, adata, seed: int = 0):
        super().__init__(adata, seed=seed, gene_likelihood="nb")

    def _build_module(self):
        return TinyVAEModule(self.summary.n_vars, self.summary.n_batch)


@pytest.fixture(scope="module")
def trained():
    adata = toy_adata(n_cells=150, n_genes=20, seed=1)
    TinyVAE.setup_anndata(adata, batch_key="batch", labels_key="label")
    model = TinyVAE(adata, seed=0)
    model.train(max_epochs=3, batch_size=50, enable_progress_bar=False)
    return model, adata


def _tensors(model, adata, idx=None):
    b = next(iter(model._loader(adata, idx, batch_size=10_000)))
    return {k: v for k, v in b.items()}


def test_latent_attributions_are_a_frame_that_completes_to_the_latent_mean(trained):
    model, adata = trained
    attr, delta = model.get_feature_attributions(
        target="latent", target_index=1, n_steps=300, return_delta=True, show_progress=False
    )
    assert isinstance(attr, pd.DataFrame) and attr.shape == (150, 20)
    assert list(attr.index) == list(adata.obs_names) and list(attr.columns) == list(adata.var_names)
    t = _tensors(model, adata)
    with torch.no_grad():
        fx = model.module.inference(t[K.X_KEY], t[K.BATCH_KEY])["qz"].loc[:, 1]
        f0 = model.module.inference(torch.zeros_like(t[K.X_KEY]), t[K.BATCH_KEY])["qz"].loc[:, 1]
    diff = (fx - f0).numpy()
    # completeness against the latent mean with each cell's own batch (held fixed)
    np.testing.assert_allclose(attr.to_numpy().sum(1) - delta, diff, atol=1e-5)
    # within 1% of the cell's attribution mass (f(x) - f(0) alone can be ~0 when the path
    # crosses ReLU kinks and comes back)
    assert np.all(np.abs(delta) <= 0.01 * np.abs(attr.to_numpy()).sum(1))


def test_every_latent_dimension_adds_a_trailing_axis(trained):
    model, _ = trained
    every = model.get_feature_attributions(n_steps=16, show_progress=False)
    one = model.get_feature_attributions(target_index=2, n_steps=16, return_numpy=True,
                                         show_progress=False)
    assert every.shape == (150, 20, 3)
    np.testing.assert_allclose(every[..., 2], one, atol=1e-6)


def test_expression_target_takes_gene_names_and_completes_to_px_scale(trained):
    model, adata = trained
    attr, delta = model.get_feature_attributions(
        target="expression", target_index=["gene4", "gene7"], baselines="mean", n_steps=64,
        return_delta=True, show_progress=False,
    )
    by_pos = model.get_feature_attributions(
        target="expression", target_index=7, baselines="mean", n_steps=64, return_numpy=True,
        show_progress=False,
    )
    assert attr.shape == (150, 20, 2)
    np.testing.assert_allclose(attr[..., 1], by_pos, atol=1e-7)
    t = _tensors(model, adata)
    x = t[K.X_KEY]
    with torch.no_grad():
        def scale(x_):
            z = model.module.inference(x_, t[K.BATCH_KEY])["qz"].loc
            return model.module.generative(z, torch.zeros(len(x_), 1), t[K.BATCH_KEY])["px"].scale

        diff = (scale(x) - scale(x.mean(0, keepdim=True).expand_as(x)))[:, [4, 7]].numpy()
    np.testing.assert_allclose(attr.sum(1) - delta, diff, atol=1e-6)


def test_loss_target_from_the_mean_baseline_is_finite_and_complete(trained):
    model, _ = trained
    attr, delta = model.get_feature_attributions(
        target="loss", baselines="mean", n_steps=100, return_delta=True, show_progress=False
    )
    total = attr.to_numpy().sum(1)
    assert np.isfinite(attr.to_numpy()).all()
    assert np.all(np.abs(delta) <= 0.01 * np.abs(total - delta) + 1e-3)


def test_a_subset_of_cells_gets_the_same_rows(trained):
    model, _ = trained
    full = model.get_feature_attributions(target_index=0, n_steps=16, show_progress=False)
    sub = model.get_feature_attributions(indices=[3, 70, 149], target_index=0, n_steps=16,
                                         show_progress=False)
    pd.testing.assert_frame_equal(sub, full.iloc[[3, 70, 149]], atol=1e-6)


@pytest.mark.parametrize("method", ["gs", "grad", "ixg", "deeplift", "shap"])
def test_every_method_explains_the_model(trained, method):
    model, _ = trained
    base = "zeros" if method == "deeplift" else None
    a1 = model.get_feature_attributions(target_index=0, method=method, baselines=base,
                                        n_samples=10, show_progress=False)
    a2 = model.get_feature_attributions(target_index=0, method=method, baselines=base,
                                        n_samples=10, show_progress=False)
    assert a1.shape == (150, 20) and np.isfinite(a1.to_numpy()).all()
    pd.testing.assert_frame_equal(a1, a2)  # seeded


def test_training_mode_is_restored(trained):
    model, _ = trained
    model.module.train()
    model.get_feature_attributions(target_index=0, n_steps=4, show_progress=False)
    assert model.module.training
    model.module.eval()


def test_rank_features_by_an_obs_column(trained):
    model, adata = trained
    df = model.rank_features(groupby="label", target_index=0, n_steps=8)
    assert set(df["group"]) == set(adata.obs["label"])
    assert len(df) == 4 * 20
    assert set(df[df.group == "T"]["n_cells"]) == {(adata.obs.label == "T").sum()}


def test_feature_significance_sign_test_equals_the_engine(trained):
    model, _ = trained
    df = model.get_feature_significance(target_index=0, test="sign", n_steps=8,
                                        show_progress=False)
    attr = model.get_feature_attributions(target_index=0, n_steps=8, return_numpy=True,
                                          show_progress=False)
    ref = sign_test(attr, model.var_names)
    pd.testing.assert_frame_equal(df, ref)


def test_feature_significance_permutation_returns_the_seed_columns(trained):
    model, _ = trained
    df = model.get_feature_significance(
        target_index=0, method="ixg", baselines=None, n_perm=20, genes=["gene0", "gene5"],
        show_progress=False,
    )
    assert list(df.index) == ["gene0", "gene5"]
    assert {"weight", "weight_signed", "pvalue", "qvalue"} <= set(df.columns)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": "umap"}, "target='umap' is not known"),
        ({"target": "expression"}, "pass target_index= a gene name"),
        ({"target": "expression", "target_index": "CD3E"}, "'CD3E' is not an output"),
        ({"target": 3}, "target must be a target name or a callable"),
    ],
)
def test_bad_targets_raise_clear_errors(trained, kwargs, match):
    model, _ = trained
    with pytest.raises(ValueError, match=match):
        model.get_feature_attributions(show_progress=False, **kwargs)


def test_significance_needs_one_output_per_cell(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="one output per cell"):
        model.get_feature_significance(target="latent", show_progress=False)


def test_callable_target_gets_module_and_tensors(trained):
    model, _ = trained

    def total_scale(module, tensors):  # any scalar per cell
        return module.inference(tensors[K.X_KEY], tensors[K.BATCH_KEY])["qz"].loc.sum(-1)

    a = model.get_feature_attributions(target=total_scale, n_steps=16, return_numpy=True,
                                       show_progress=False)
    every = model.get_feature_attributions(target="latent", n_steps=16, show_progress=False)
    np.testing.assert_allclose(a, every.sum(-1), atol=1e-5)


# ---------------------------------------------------------------- cellsight's SCVI
def _scvi_class():
    from cellsight.models import SCVI

    assert issubclass(SCVI, InterpretMixin)
    return SCVI


@pytest.fixture(scope="module")
def scvi_model():
    cls = _scvi_class()
    adata = toy_adata(n_cells=120, n_genes=20, seed=2)
    cls.setup_anndata(adata, batch_key="batch")
    model = cls(adata, n_hidden=16, n_latent=4, seed=0)
    model.train(max_epochs=2, batch_size=60, enable_progress_bar=False)
    return model, adata


def test_scvi_latent_ig_completes_to_the_posterior_mean(scvi_model):
    model, adata = scvi_model
    attr, delta = model.get_feature_attributions(
        target="latent", target_index=0, n_steps=300, return_delta=True, show_progress=False
    )
    z = model.get_latent_representation(adata)  # posterior means
    assert attr.shape == (120, 20)
    # the zero baseline encodes to the same mean for every cell of a batch; completeness says
    # sum(attributions) - delta = z(x) - z(0)
    z_diff = attr.to_numpy().sum(1) - delta
    batches = adata.obs["batch"].to_numpy()
    for b in np.unique(batches):
        rows = batches == b
        offsets = z[rows, 0] - z_diff[rows]
        np.testing.assert_allclose(offsets, offsets[0], atol=1e-4)
    assert np.all(np.abs(delta) <= 0.01 * np.abs(attr.to_numpy()).sum(1))


def test_scvi_expression_and_deeplift_run_on_the_real_module(scvi_model):
    model, _ = scvi_model
    expr = model.get_feature_attributions(target="expression", target_index=["gene1", "gene2"],
                                          baselines="mean", n_steps=16, show_progress=False)
    dl = model.get_feature_attributions(target_index=1, method="deeplift", show_progress=False)
    assert expr.shape == (120, 20, 2) and np.isfinite(expr).all()
    assert np.isfinite(dl.to_numpy()).all()


def test_shap_leaves_every_submodule_in_its_mode(scvi_model):
    """shap switches the explained function's mode; restoring the *wrapper's* default mode
    put the whole model in training mode (dropout, BatchNorm batch statistics) for every later
    pass. Every submodule must come back in its own mode, and a SHAP permutation test (which
    re-explains one-cell-wide shuffles) must run on a BatchNorm model."""
    model, _ = scvi_model
    model.module.eval()
    before = [m.training for m in model.module.modules()]
    a1 = model.get_feature_attributions(target_index=0, method="shap", n_samples=8,
                                        show_progress=False)
    assert [m.training for m in model.module.modules()] == before
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.module.modules())
    # eval-mode passes after SHAP: IG equals IG before it
    ig0 = model.get_feature_attributions(target_index=0, n_steps=8, show_progress=False)
    model.get_feature_attributions(target_index=0, method="shap", n_samples=8,
                                   show_progress=False)
    ig1 = model.get_feature_attributions(target_index=0, n_steps=8, show_progress=False)
    pd.testing.assert_frame_equal(ig0, ig1)
    assert np.isfinite(a1.to_numpy()).all()
    sig = model.get_feature_significance(target_index=0, method="shap", test="permutation",
                                         n_perm=5, indices=np.arange(20), show_progress=False)
    assert np.all((sig["pvalue"] >= 0) & (sig["pvalue"] <= 1))


@pytest.mark.parametrize("method", ["ig", "gs", "deeplift", "shap"])
def test_path_methods_of_a_zinb_loss_are_refused(method):
    """The ZINB log-likelihood jumps where a count reaches 0: IG of the loss missed
    completeness by the size of the loss (attributions summing to +6 for a loss difference of
    -25). NB has no jump: IG of its loss adds up."""
    from cellsight.models import SCVI

    adata = toy_adata(n_cells=60, n_genes=12, seed=3)
    SCVI.setup_anndata(adata)
    zinb = SCVI(adata, n_hidden=8, n_latent=2, gene_likelihood="zinb", seed=0)
    with pytest.raises(ValueError, match="discontinuous at zero counts"):
        zinb.get_feature_attributions(target="loss", method=method, baselines="mean",
                                      show_progress=False)
    with pytest.raises(ValueError, match="discontinuous at zero counts"):
        zinb.get_feature_significance(target="loss", method=method, baselines="mean",
                                      test="sign", show_progress=False)
    assert np.isfinite(zinb.get_feature_attributions(
        target="loss", method="ixg", show_progress=False).to_numpy()).all()
    if method == "ig":
        nb = SCVI(adata, n_hidden=8, n_latent=2, gene_likelihood="nb", seed=0)
        attr, delta = nb.get_feature_attributions(target="loss", baselines="mean", n_steps=200,
                                                  return_delta=True, show_progress=False)
        assert np.all(np.abs(delta) <= 0.01 * np.abs(attr.to_numpy()).sum(1) + 1e-3)


def test_fadvi_deeplift_runs_and_warns_that_it_does_not_add_up():
    """FADVI's fused training pass stacks the three encoders as (3, cells, hidden), which
    captum's DeepLIFT hooks split along the wrong axis (a raw shape error); in eval mode the
    encoders run one by one. DeepLIFT then runs, and says that its attributions of this model
    (functional log1p / exp) do not satisfy summation-to-delta."""
    from cellsight.models import FADVI

    adata = toy_adata(n_cells=60, n_genes=12, seed=4)
    adata.obs["cell_type"] = np.array(["a", "b", "c"])[np.arange(60) % 3]
    FADVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = FADVI(adata, n_hidden=8, n_latent_b=2, n_latent_l=2, n_latent_r=2, seed=0)
    model.train(max_epochs=1, batch_size=30, enable_progress_bar=False)
    assert model.module.fused_encoders and not model.module.training
    with pytest.warns(UserWarning, match="do not add up"):
        dl = model.get_feature_attributions(target="latent", target_index=0, method="deeplift",
                                            show_progress=False)
    assert dl.shape == (60, 12) and np.isfinite(dl.to_numpy()).all()
