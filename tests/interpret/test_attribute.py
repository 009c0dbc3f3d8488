"""The attribution engine against analytic answers and captum called directly."""

import warnings

import numpy as np
import pytest
import torch
from captum.attr import GradientShap, IntegratedGradients

from cellsight.interpret import attribute
from cellsight.interpret.batching import cells_per_chunk, resolve_baselines


def _linear(n_in=12, n_out=3, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out).double()
    return lin


def _mlp(n_in=12, n_out=3, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Softplus(),
        torch.nn.Linear(16, n_out),
    ).eval()


def _data(n=9, g=12, seed=0, dtype=torch.float64):
    g_ = torch.Generator().manual_seed(seed)
    return torch.rand(n, g, generator=g_, dtype=dtype) * 3


# ---------------------------------------------------------------- analytic: linear model
@pytest.mark.parametrize("method", ["ig", "deeplift"])
def test_linear_model_ig_and_deeplift_equal_x_minus_baseline_times_w(method):
    lin = _linear()
    x = _data()
    b = _data(n=1, seed=1)
    out = attribute(lin, x, method=method, baselines=b, target=2)
    expected = ((x - b) * lin.weight[2]).detach().numpy()
    # float64, exact in theory: 1e-5 is the tolerance with room for rounding
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_linear_model_input_x_gradient_equals_x_times_w():
    lin = _linear()
    x = _data()
    out = attribute(lin, x, method="ixg", target=1)
    np.testing.assert_allclose(out, (x * lin.weight[1]).detach().numpy(), atol=1e-5, rtol=0)


def test_grad_is_the_signed_gradient():
    lin = _linear()
    x = _data()
    out = attribute(lin, x, method="grad", target=0)
    np.testing.assert_allclose(out, lin.weight[0].detach().expand_as(x).numpy(), atol=1e-12)


def test_gradientshap_with_one_baseline_row_is_exact_on_a_linear_model():
    lin = _linear()
    x, b = _data(), _data(n=1, seed=3)
    out = attribute(lin, x, method="gs", baselines=b, target=0, n_samples=7)
    np.testing.assert_allclose(out, ((x - b) * lin.weight[0]).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("method", ["gs", "deeplift", "ixg", "shap"])
def test_per_cell_targets_work_for_every_method(method):
    lin = _linear()
    x, b = _data(), _data(n=1, seed=3)
    t = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    base = None if method == "ixg" else b
    out = attribute(lin, x, method=method, baselines=base, target=t, n_samples=5)
    ref = x if method == "ixg" else x - b
    np.testing.assert_allclose(out, (ref * lin.weight[t]).detach().numpy(), atol=1e-5)


def test_deep_shap_on_a_linear_model_is_w_times_x_minus_background_mean():
    lin = _linear()
    x, bg = _data(), _data(n=25, seed=4)
    out = attribute(lin, x, method="shap", shap_explainer="deep", baselines=bg, target=1)
    expected = ((x - bg.mean(0)) * lin.weight[1]).detach().numpy()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_gradient_shap_on_a_linear_model_with_one_background_row_is_exact():
    lin = _linear()
    x, bg = _data(), _data(n=1, seed=4)
    out = attribute(lin, x, method="shap", baselines=bg, target=1, n_samples=10)
    np.testing.assert_allclose(out, ((x - bg) * lin.weight[1]).detach().numpy(), atol=1e-5)


# ---------------------------------------------------------------- completeness
def test_ig_completeness_within_one_percent_and_delta_is_reported():
    net = _mlp().double()
    x, b = _data(n=20), _data(n=1, seed=2)
    attr, delta = attribute(
        net, x, method="ig", baselines=b, target=1, n_steps=100, return_convergence_delta=True
    )
    with torch.no_grad():
        diff = (net(x)[:, 1] - net(b.expand_as(x))[:, 1]).numpy()
    total = attr.sum(1)
    assert np.all(np.abs(total - diff) <= 0.01 * np.abs(diff) + 1e-8)
    # the reported delta is exactly sum(attributions) - (f(x) - f(b)) per cell
    np.testing.assert_allclose(delta, total - diff, atol=1e-9)


def test_ig_warns_when_the_path_integral_is_not_resolved():
    """A step along the path (a saturated sigmoid switching at 1% of the counts) is missed by
    a few integration points, and the warning says by how much; smooth paths stay quiet."""
    w = torch.linspace(0.5, 1.5, 12, dtype=torch.float64)
    x = _data(n=6)
    s0 = 0.01 * float((x @ w).min())  # every cell switches within its first 1% of the path

    def step(x):
        return torch.sigmoid(500.0 * (x @ w - s0) / s0)[:, None]

    with pytest.warns(UserWarning, match="did not converge with n_steps=8"):
        attribute(step, x, method="ig", baselines=0.0, target=0, n_steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attribute(_mlp().double(), x, method="ig", baselines=0.0, target=1, n_steps=50)
        attribute(_linear(), x, method="ig", baselines=0.0, target=1, n_steps=8)


def test_deeplift_completeness_holds_for_relu_networks():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    ).double().eval()
    x, b = _data(), _data(n=1, seed=5)
    attr, delta = attribute(
        net, x, method="deeplift", baselines=b, target=0, return_convergence_delta=True
    )
    with torch.no_grad():
        diff = (net(x)[:, 0] - net(b)[:, 0]).numpy()
    # DeepLIFT's rescale rule satisfies summation-to-delta exactly for ReLU networks
    np.testing.assert_allclose(attr.sum(1), diff, atol=1e-9)
    np.testing.assert_allclose(delta, 0.0, atol=1e-9)


# ---------------------------------------------------------------- agreement with captum
def test_ig_matches_captum_called_directly_with_chunks_and_several_targets():
    net = _mlp()
    x = _data(n=23, dtype=torch.float32)
    b = _data(n=1, seed=7, dtype=torch.float32)
    ours = attribute(net, x, method="ig", baselines=b, target=[2, 0], n_steps=32, batch_size=5)
    assert ours.shape == (23, 12, 2)
    ig = IntegratedGradients(net)
    for k, t in enumerate([2, 0]):
        ref = ig.attribute(x, baselines=b.expand_as(x), target=t, n_steps=32).detach().numpy()
        # float32, different summation order: 1e-6 relative to the largest attribution
        np.testing.assert_allclose(ours[..., k], ref, atol=1e-6 * np.abs(ref).max(), rtol=0)


def test_ig_matches_captum_with_additional_forward_args_and_per_cell_targets():
    torch.manual_seed(1)
    lin = torch.nn.Linear(12 + 2, 3)

    def f(x, cov):
        return torch.tanh(lin(torch.cat([x, cov], 1)))

    x = _data(n=11, dtype=torch.float32)
    cov = torch.randn(11, 2)
    target = np.array([0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1])
    ours = attribute(f, x, target=target, additional_forward_args=cov, n_steps=20, batch_size=4)
    ref = IntegratedGradients(f).attribute(
        x, target=torch.as_tensor(target), additional_forward_args=cov, n_steps=20
    ).detach().numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6 * np.abs(ref).max(), rtol=0)


def test_gradientshap_is_seeded_and_agrees_with_captum_in_expectation():
    net = _mlp().double()
    x, bg = _data(n=6), _data(n=30, seed=8)
    a1 = attribute(net, x, method="gs", baselines=bg, target=0, n_samples=50, seed=3)
    a2 = attribute(net, x, method="gs", baselines=bg, target=0, n_samples=50, seed=3)
    a3 = attribute(net, x, method="gs", baselines=bg, target=0, n_samples=50, seed=4)
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, a3)
    torch.manual_seed(0)
    ref = GradientShap(net).attribute(x, baselines=bg, target=0, n_samples=20000).detach().numpy()
    ours = attribute(net, x, method="gs", baselines=bg, target=0, n_samples=20000, seed=0)
    # both are Monte Carlo estimates of the same expectation (20000 draws each: at 4000 the
    # Monte Carlo error reached 6.6% of the largest attribution in one CI run)
    assert np.abs(ours - ref).max() <= 0.05 * np.abs(ref).max()


# ---------------------------------------------------------------- targets and shapes
def test_per_cell_target_picks_the_columns_of_all_targets():
    net = _mlp()
    x = _data(n=8, dtype=torch.float32)
    every = attribute(net, x, target="all", n_steps=16)
    assert every.shape == (8, 12, 3)
    t = np.array([2, 1, 0, 0, 1, 2, 2, 0])
    picked = attribute(net, x, target=t, n_steps=16)
    np.testing.assert_allclose(picked, every[np.arange(8), :, t], atol=1e-6)


def test_chunking_and_internal_batch_size_do_not_change_results():
    net = _mlp()
    x = _data(n=13, dtype=torch.float32)
    whole = attribute(net, x, target=1, n_steps=10)
    one = attribute(net, x, target=1, n_steps=10, batch_size=1)
    internal = attribute(net, x, target=1, n_steps=10, internal_batch_size=7)
    np.testing.assert_allclose(one, whole, atol=1e-6)
    np.testing.assert_allclose(internal, whole, atol=1e-6)


def test_scalar_output_needs_no_target_and_mean_baseline_is_the_feature_mean():
    w = torch.arange(12, dtype=torch.float64)

    def f(x):
        return x @ w

    x = _data()
    out = attribute(f, x, baselines="mean")
    np.testing.assert_allclose(out, ((x - x.mean(0)) * w).numpy(), atol=1e-9)


def test_per_cell_baselines_are_used_cell_by_cell():
    lin = _linear()
    x, b = _data(n=7), _data(n=7, seed=9)
    out = attribute(lin, x, baselines=b, target=0, batch_size=3)
    np.testing.assert_allclose(out, ((x - b) * lin.weight[0]).detach().numpy(), atol=1e-9)


def test_shap_holds_per_cell_inputs_fixed():
    torch.manual_seed(2)
    w, v = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)

    def f(x, c):  # linear in x given c: SHAP = (w + c v) (x - E[background])
        return (x * (w + c * v)).sum(1)

    x, bg = _data(n=10), _data(n=15, seed=11)
    c = torch.tensor([0.0, 1.0] * 5, dtype=torch.float64).unsqueeze(1)
    out = attribute(f, x, method="shap", shap_explainer="deep", baselines=bg,
                    additional_forward_args=c)
    expected = ((x - bg.mean(0)) * (w + c * v)).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-9)


def test_numpy_inputs_and_the_default_background_are_deterministic():
    net = _mlp()
    x = np.random.default_rng(0).random((40, 12))
    a = attribute(net, x, method="shap", target=0, n_samples=20, seed=1)
    b = attribute(net, x, method="shap", target=0, n_samples=20, seed=1)
    assert a.dtype == np.float32 and a.shape == (40, 12)
    np.testing.assert_array_equal(a, b)


def test_background_baseline_draws_distinct_cells():
    x = torch.arange(50, dtype=torch.float32).reshape(25, 2)
    bg = resolve_baselines(x, "background", "gs", n_background=10, seed=0)
    assert bg.shape == (10, 2) and len(set(bg[:, 0].tolist())) == 10


def test_chunk_size_respects_the_memory_budget():
    assert cells_per_chunk(2000, 1000, 50, 1, max_batch_elements=2**22) == 83
    big = 2**30
    assert cells_per_chunk(2000, 1000, 50, 2, internal_batch_size=100, max_batch_elements=big) == 50
    assert cells_per_chunk(10, 1000, 50, 1, max_batch_elements=10) == 1


def test_deeplift_warns_when_the_nonlinearities_are_not_modules():
    lin = _linear()

    def f(x):
        return torch.relu(lin(x))

    with pytest.warns(UserWarning, match="plain gradients"):
        attribute(f, _data(), method="deeplift", target=0)


# ---------------------------------------------------------------- clear errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "lime"}, "method='lime' is not known"),
        ({"target": None}, "returns 3 outputs per cell; pass target="),
        ({"target": 3}, "target=3 is out of range"),
        ({"target": "max"}, "only name accepted is 'all'"),
        ({"target": np.array([0, 1])}, "one integer output index per cell"),
        ({"baselines": "median", "target": 0}, "baselines='median' is not known"),
        ({"baselines": np.zeros((1, 5)), "target": 0}, "baselines have shape"),
        ({"baselines": np.zeros((4, 12)), "target": 0}, "one baseline row or one per cell"),
        ({"method": "ixg", "baselines": "mean", "target": 0}, "takes no baselines"),
        ({"method": "grad", "target": 0, "return_convergence_delta": True}, "no convergence"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attribute(_mlp().double(), _data(), **kwargs)


@pytest.mark.parametrize("method", ["ig", "deeplift", "gs", "shap"])
@pytest.mark.parametrize("baselines", [float("nan"), float("inf"), -np.inf, np.float32("nan")])
def test_non_finite_scalar_baselines_are_rejected(method, baselines):
    """A NaN baseline used to give all-NaN attributions silently."""
    with pytest.raises(ValueError, match="is not finite, so every attribution would be NaN"):
        attribute(_mlp().double(), _data(), method=method, baselines=baselines, target=0)


def test_non_finite_baseline_arrays_are_rejected_with_the_count():
    b = np.zeros(12)
    b[[2, 5]] = [np.nan, np.inf]
    with pytest.raises(ValueError, match="2 NaN or infinite value"):
        attribute(_mlp().double(), _data(), baselines=b, target=0)


def test_bool_baselines_are_a_type_error():
    with pytest.raises(TypeError, match="baselines=True is a bool"):
        resolve_baselines(_data(), True, "ig")


def test_non_finite_inputs_are_rejected_with_the_cell():
    x = _data()
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="first in cell 3"):
        attribute(_mlp().double(), x, target=0)


def test_integer_inputs_are_rejected():
    with pytest.raises(ValueError, match="floating inputs"):
        attribute(_mlp(), torch.ones(3, 12, dtype=torch.long), target=0)


def test_deeplift_warns_when_an_nn_softmax_is_used_but_not_when_it_is_idle():
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(12, 3), torch.nn.ReLU())
    with_softmax = torch.nn.Sequential(body, torch.nn.Softmax(-1)).double()
    with pytest.warns(UserWarning, match="nn.Softmax normalises over the whole batch"):
        attribute(with_softmax, _data(), method="deeplift", target=0)

    class Idle(torch.nn.Module):  # owns a softmax it does not use for this output
        def __init__(self):
            super().__init__()
            self.body, self.head = body.double(), torch.nn.Softmax(-1)

        def forward(self, x):
            return self.body(x)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attribute(Idle(), _data(), method="deeplift", target=0)
