"""SCVI's and FADVI's ``get_normalized_expression`` against the module decoded by hand.

The reference below runs the module's ``inference`` and ``generative`` directly, minibatch by
minibatch, with torch seeded by the model's seed exactly as the model seeds it, so the model's
method and the reference draw the same posterior samples. Both models' public behaviour
(``gene_list``, ``transform_batch``, ``library_size``, ``n_samples``, ``return_mean``,
``return_numpy``, ``batch_size``, FADVI's ``n_samples_overall``), the shapes, the names of the
rows and columns and the error messages are pinned, so a refactor of the shared code
(:class:`cellsight.models.expression.ExpressionMixin`) cannot change them unnoticed.

Tolerance: ``rtol=1e-6``. The reference repeats the model's float32 operations; averaging over
at most three decodes differs by a few float32 ulps (1.2e-7) at most if the order of the sums
changes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scvi import REGISTRY_KEYS as K
from scvi_helpers import count_adata
from test_fadvi_units import small_model

from cellsight.models import SCVI

RTOL = 1e-6
SCVI_SETUP = {
    "batch_key": "batch",
    "labels_key": "label",
    "categorical_covariate_keys": ["donor"],
    "continuous_covariate_keys": ["age"],
}


@pytest.fixture(scope="module")
def scvi_model():
    adata = count_adata(n_cells=60, n_genes=12, n_batch=3)
    SCVI.setup_anndata(adata, **SCVI_SETUP)
    return SCVI(adata, n_hidden=16, n_latent=4, seed=3)


@pytest.fixture(scope="module")
def fadvi_model():
    return small_model(seed=5)


def reference_expression(model, indices=None, codes=(None,), genes=None, library_size=1,
                         n_samples=1, batch_size=None) -> np.ndarray:
    """Decode with the module directly: ``(cells, genes)``, or ``(samples, cells, genes)``."""
    tensors = next(iter(model._loader(indices=indices, batch_size=100_000)))
    n_cells, step = len(tensors[K.X_KEY]), batch_size or 1024
    scaling = 1.0 if library_size == "latent" else float(library_size)
    module = model.module.eval()
    chunks = []
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(model.seed)
        for start in range(0, n_cells, step):
            part = {k: v[start:start + step] for k, v in tensors.items()}
            acc = 0.0
            for code in codes:
                inf = module.inference(**module._get_inference_input(part), n_samples=n_samples)
                gen = module.generative(
                    **module._get_generative_input(part, inf), transform_batch=code
                )
                px = gen["px"]
                expr = (px.mu if library_size == "latent" else px.scale) * scaling
                acc = acc + (expr if genes is None else expr[..., genes]) / len(codes)
            chunks.append(acc)
    return torch.cat(chunks, dim=1 if n_samples > 1 else 0).numpy()


def _gene_pos(model, gene_list):
    if gene_list is None:
        return None
    names = [gene_list] if isinstance(gene_list, str) else list(gene_list)
    return model.var_names.get_indexer(names)


def _check_frame(out, model, expected, indices, genes):
    assert isinstance(out, pd.DataFrame)
    names = model.adata.obs_names if indices is None else model.adata.obs_names[indices]
    assert list(out.index) == list(names)
    columns = model.var_names if genes is None else model.var_names[genes]
    assert list(out.columns) == list(columns)
    np.testing.assert_allclose(out.to_numpy(), expected, rtol=RTOL, atol=0)


# (keyword arguments of get_normalized_expression, batch codes the reference decodes in)
SCVI_CASES = [
    ({}, [None]),
    ({"gene_list": ["gene3", "gene0"], "transform_batch": "b1", "library_size": 1e4}, [1]),
    ({"gene_list": "gene5", "transform_batch": ["b0", "b2"], "library_size": "latent"}, [0, 2]),
    ({"transform_batch": "mean", "n_samples": 3}, [0, 1, 2]),
    ({"indices": [4, 1, 9, 30, 31, 50], "batch_size": 4, "library_size": 50.0}, [None]),
]


def test_scvi_normalized_expression_errors_name_the_bad_batch_and_genes(scvi_model):
    with pytest.raises(ValueError, match=r"transform_batch='b7' is not a batch of this model; "
                       r"known batches are \['b0', 'b1', 'b2'\]"):
        scvi_model.get_normalized_expression(transform_batch="b7")
    with pytest.raises(ValueError, match="transform_batch=0 is not a batch"):
        scvi_model.get_normalized_expression(transform_batch=0)
    with pytest.raises(ValueError, match=r"gene_list has 1 gene\(s\) the model does not know "
                       r"\(\['nope'\]\); pick genes from model.var_names."):
        scvi_model.get_normalized_expression(gene_list=["gene0", "nope"])


FADVI_CASES = [
    ({}, [None]),
    ({"gene_list": ["gene3", "gene0"], "transform_batch": "b1", "library_size": 1e4}, [1]),
    ({"gene_list": "gene5", "transform_batch": 0, "library_size": "latent"}, [0]),
    ({"transform_batch": np.int64(1), "n_samples": 3}, [1]),
    ({"indices": [4, 1, 9, 30, 31, 50], "batch_size": 4, "library_size": 50.0}, [None]),
]


@pytest.mark.parametrize(
    "model_name,kwargs,codes",
    [("scvi_model", *c) for c in SCVI_CASES] + [("fadvi_model", *c) for c in FADVI_CASES],
    ids=lambda c: str(c),
)
def test_normalized_expression_frame_matches_module_decode(request, model_name, kwargs, codes):
    model = request.getfixturevalue(model_name)
    genes = _gene_pos(model, kwargs.get("gene_list"))
    n_samples = kwargs.get("n_samples", 1)
    expected = reference_expression(
        model, kwargs.get("indices"), codes, genes, kwargs.get("library_size", 1),
        n_samples, kwargs.get("batch_size"),
    )
    if n_samples > 1:
        expected = expected.mean(0)
    out = model.get_normalized_expression(**kwargs)
    _check_frame(out, model, expected, kwargs.get("indices"), genes)


@pytest.mark.parametrize("model_name,batch,code,batch_size",
                         [("scvi_model", "b2", 2, 25), ("fadvi_model", "b1", 1, 50)])
def test_normalized_expression_samples_and_numpy_match_module_decode(
    request, model_name, batch, code, batch_size
):
    model = request.getfixturevalue(model_name)
    n_cells = model.adata.n_obs
    genes = _gene_pos(model, ["gene2", "gene7"])
    expected = reference_expression(model, None, [code], genes, 1e4, n_samples=3,
                                    batch_size=batch_size)
    kwargs = dict(transform_batch=batch, gene_list=["gene2", "gene7"], library_size=1e4,
                  n_samples=3, batch_size=batch_size)
    samples = model.get_normalized_expression(return_mean=False, **kwargs)
    assert isinstance(samples, np.ndarray) and samples.shape == (3, n_cells, 2)
    np.testing.assert_allclose(samples, expected, rtol=RTOL, atol=0)
    mean = model.get_normalized_expression(return_numpy=True, **kwargs)
    assert isinstance(mean, np.ndarray) and mean.shape == (n_cells, 2)
    np.testing.assert_allclose(mean, expected.mean(0), rtol=RTOL, atol=0)
    one = model.get_normalized_expression(return_numpy=True)
    np.testing.assert_allclose(one, reference_expression(model), rtol=RTOL, atol=0)


@pytest.mark.parametrize("n_overall", [1, 7, 12])
def test_fadvi_n_samples_overall_draws_seeded_rows_of_the_decoded_samples(fadvi_model, n_overall):
    indices = np.arange(5)
    n_samples = max(1, n_overall // 5 + 1)
    expected = reference_expression(fadvi_model, indices, [None], None, 1e4, n_samples)
    flat = expected.reshape(-1, expected.shape[-1])
    rows = np.random.default_rng(fadvi_model.seed).choice(len(flat), n_overall, replace=True)
    # return_mean and return_numpy are overridden: always the drawn rows, as an array
    drawn = fadvi_model.get_normalized_expression(
        indices=indices, library_size=1e4, n_samples_overall=n_overall, return_mean=True,
        return_numpy=False,
    )
    assert isinstance(drawn, np.ndarray) and drawn.shape == (n_overall, fadvi_model.summary.n_vars)
    np.testing.assert_allclose(drawn, flat[rows], rtol=RTOL, atol=0)


def test_fadvi_normalized_expression_errors_name_the_bad_batch_and_genes(fadvi_model):
    with pytest.raises(ValueError, match=r"transform_batch='b7' is not a batch of this model; "
                       r"pass a batch name \(\['b0', 'b1'\]\) or a code in \[0, 1\]."):
        fadvi_model.get_normalized_expression(transform_batch="b7")
    for bad in (2, -1, True, ["b0", "b1"], "mean"):
        with pytest.raises(ValueError, match="is not a batch of this model; pass a batch name"):
            fadvi_model.get_normalized_expression(transform_batch=bad)
    with pytest.raises(ValueError, match=r"gene_list has 2 gene\(s\) the model does not know "
                       r"\(\['nope', 'nada'\]\); pick genes from model.var_names."):
        fadvi_model.get_normalized_expression(gene_list=["gene0", "nope", "nada"])
    with pytest.raises(ValueError, match="n_samples_overall=0 must be >= 1."):
        fadvi_model.get_normalized_expression(n_samples_overall=0)
    # the batch is checked before the genes, the genes before n_samples_overall
    with pytest.raises(ValueError, match="transform_batch"):
        fadvi_model.get_normalized_expression(transform_batch="b7", gene_list=["nope"])
    with pytest.raises(ValueError, match="gene_list"):
        fadvi_model.get_normalized_expression(gene_list=["nope"], n_samples_overall=0)
