"""Hessian diagonal and Minimum Sharpness against dense jax.hessian and independent solves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from sharpjax import sharpness
from tests.test_sharpness_nets import dense_diagonal, flatten, net_case, x64  # noqa: F401


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def case(request, x64):  # noqa: F811
    return net_case(request.param)


def ms(case, params=None, **kwargs):
    net = case.net
    params = net.params if params is None else params
    return sharpness.minimum_sharpness(net.logits_fn, params, (net.x, net.y), **kwargs)


def block_sums(case, params=None):
    """Per layer (in params order): (T_W, T_b) from the dense Hessian diagonal."""
    diag = dense_diagonal(case, params)
    return [(float(np.sum(d["kernel"])), float(np.sum(d["bias"]))) for d in diag.values()]


def minimise_log_sum_exp(log_c, A):
    """min_u log Σ_t exp(log_c_t + A_t·u) with scipy (BFGS, analytic gradient)."""

    def fun(u):
        z = log_c + A @ u
        value = scipy.special.logsumexp(z)
        return value, A.T @ np.exp(z - value)

    res = scipy.optimize.minimize(fun, np.zeros(A.shape[1]), jac=True, method="BFGS", tol=1e-13)
    return np.exp(res.fun)


def test_exact_diagonal_matches_dense_hessian(case):
    net = case.net
    diag = sharpness.hessian_diagonal(net.logits_fn, net.params, (net.x, net.y))
    expected = dense_diagonal(case)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12), diag, expected
    )


def test_exact_diagonal_in_padded_chunks_matches_dense_hessian(x64, monkeypatch):  # noqa: F811
    """Chunks of 5 of 12 examples (a padded, masked last chunk) give the same diagonal."""
    import sys

    diagonal_module = sys.modules["sharpjax.sharpness.diagonal"]
    monkeypatch.setattr(diagonal_module, "example_chunk", lambda entries: 5)
    case = net_case("mlp")
    net = case.net
    # A fresh function object: the jitted diagonal is cached per logits_fn.
    diag = sharpness.hessian_diagonal(lambda p, x: net.logits_fn(p, x), net.params, (net.x, net.y))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12),
        diag,
        dense_diagonal(case),
    )


def test_example_chunk_rule():
    import sys

    d = sys.modules["sharpjax.sharpness.diagonal"]
    assert d.example_chunk(10 * 26_000) == d.EXAMPLE_CHUNK_ENTRIES // (10 * 26_000)  # cache
    assert d.example_chunk(10 * 1_100_000) == d.MIN_EXAMPLE_CHUNK  # wide: amortise weights
    huge = d.MAX_CHUNK_ENTRIES // 3
    assert d.example_chunk(huge) == 3  # memory cap
    assert d.example_chunk(2 * d.MAX_CHUNK_ENTRIES) == 1


def test_hvp_diagonal_converges_to_exact(x64):  # noqa: F811
    case = net_case("mlp")
    net = case.net
    exact = np.diag(case.H)
    errors = {}
    for m in (20, 2000):
        est = sharpness.hessian_diagonal(
            net.logits_fn, net.params, (net.x, net.y), "hvp", jax.random.key(0), num_samples=m
        )
        errors[m] = np.linalg.norm(flatten(est) - exact)
    # E‖error‖² = Σ_j Σ_{k≠j} H_jk² / m for Rademacher probes.
    expected = np.sqrt((np.sum(case.H**2) - np.sum(exact**2)) / 2000)
    assert errors[2000] < errors[20] / 3
    assert errors[2000] < 2 * expected


def test_layerwise_matches_scipy_on_the_paper_formula(case):
    (TW, Tb) = map(np.array, zip(*block_sums(case), strict=True))
    L = len(TW)

    def objective(s):  # ALGORITHMS.md: the variables are s_1..s_{L-1}, α_L = 1/Π α_l
        S = np.cumsum(s)
        value = np.sum(TW[:-1] * np.exp(-2 * s) + Tb[:-1] * np.exp(-2 * S))
        return np.log(value + TW[-1] * np.exp(2 * S[-1]) + Tb[-1])

    res = scipy.optimize.minimize(objective, np.zeros(L - 1), method="BFGS", tol=1e-13)
    result = ms(case)
    np.testing.assert_allclose(result.value, np.exp(res.fun), rtol=1e-7)
    np.testing.assert_allclose(result.trace, TW.sum() + Tb.sum(), rtol=1e-10)
    np.testing.assert_allclose(np.sum(result.log_scales), 0, atol=1e-12)


def unit_of_input_row(kernel_shape, prev_kernel_shape):
    """The previous layer's unit read by each input row of a kernel (NHWC flatten)."""
    rows, channels = kernel_shape[-2], prev_kernel_shape[-1]
    if len(kernel_shape) == 2 and len(prev_kernel_shape) > 2:
        return np.unravel_index(np.arange(rows), (rows // channels, channels))[1]
    return np.arange(rows)


def test_nodewise_matches_scipy_on_entrywise_terms(case):
    """Every diagonal entry is a term c · exp(2 u_in − 2 u_out) over per-unit log-scales u."""
    diag = dense_diagonal(case)
    names = list(diag)
    widths = [diag[n]["bias"].shape[0] for n in names[:-1]]
    offsets = np.concatenate([[0], np.cumsum(widths)])
    log_c, rows = [], []
    for i, name in enumerate(names):
        K = np.asarray(diag[name]["kernel"])
        if i > 0:
            ins = offsets[i - 1] + unit_of_input_row(K.shape, diag[names[i - 1]]["kernel"].shape)
        for index in np.ndindex(K.shape):
            row = np.zeros(offsets[-1])
            if i > 0:
                row[ins[index[-2]]] += 2
            if i < len(names) - 1:
                row[offsets[i] + index[-1]] -= 2
            log_c.append(K[index])
            rows.append(row)
        for j, b in enumerate(np.asarray(diag[name]["bias"])):
            row = np.zeros(offsets[-1])
            if i < len(names) - 1:
                row[offsets[i] + j] -= 2
            log_c.append(b)
            rows.append(row)
    # Zero entries (units dead on the whole batch) contribute nothing.
    log_c, rows = np.array(log_c), np.array(rows)
    log_c, rows = np.log(log_c[log_c > 0]), rows[log_c > 0]
    expected = minimise_log_sum_exp(log_c, rows)
    np.testing.assert_allclose(ms(case, granularity="node").value, expected, rtol=1e-7)


def test_closed_form_without_biases(x64):  # noqa: F811
    case = net_case("mlp", use_bias=False)
    T = np.array([float(np.sum(d["kernel"])) for d in dense_diagonal(case).values()])
    result = ms(case)
    np.testing.assert_allclose(result.value, len(T) * np.prod(T) ** (1 / len(T)), rtol=1e-9)


def log_uniform(rng, size):
    return np.exp(rng.uniform(np.log(1e-2), np.log(1e2), size))


def layer_rescaled(params, rng):
    """W_l → α_l W_l, b_l → (Π_{m≤l} α_m) b_l, Π α = 1."""
    alphas = log_uniform(rng, len(params) - 1)
    alphas = np.append(alphas, 1 / np.prod(alphas))
    out, cumulative = {}, 1.0
    for alpha, (name, layer) in zip(alphas, params.items(), strict=True):
        cumulative *= alpha
        out[name] = {"kernel": layer["kernel"] * alpha, "bias": layer["bias"] * cumulative}
    return out


def node_rescaled(params, rng):
    """Hidden unit j of layer l: incoming column and bias × a_j, outgoing rows ÷ a_j."""
    out, previous = {}, None
    names = list(params)
    for i, name in enumerate(names):
        kernel, bias = params[name]["kernel"], params[name]["bias"]
        if previous is not None:
            shape = kernel.shape
            # A Dense after an NHWC flatten reads its rows as (position, channel).
            split = kernel.reshape(*shape[:-2], -1, previous.shape[0], shape[-1])
            kernel = (split / previous[:, None]).reshape(shape)
        if i < len(names) - 1:
            previous = log_uniform(rng, kernel.shape[-1])
            kernel, bias = kernel * previous, bias * previous
        out[name] = {"kernel": kernel, "bias": bias}
    return out


@pytest.mark.parametrize(
    ("granularity", "rescale"), [("layer", layer_rescaled), ("node", node_rescaled)]
)
def test_invariant_under_function_preserving_rescaling(case, granularity, rescale):
    net = case.net
    rng = np.random.default_rng(0)
    base = ms(case, granularity=granularity)
    for _ in range(2):
        params = rescale(net.params, rng)
        np.testing.assert_allclose(
            case.outputs(params), case.outputs(net.params), rtol=1e-9, atol=1e-9
        )
        result = ms(case, params, granularity=granularity)
        assert abs(result.value / base.value - 1) < 1e-4
        ratio = float(result.trace / base.trace)
        assert max(ratio, 1 / ratio) > 2


def test_nodewise_at_most_layerwise_at_most_trace(case):
    layer, node = ms(case), ms(case, granularity="node")
    assert node.value <= layer.value * (1 + 1e-10)
    assert layer.value <= layer.trace * (1 + 1e-10)
    np.testing.assert_allclose(node.trace, layer.trace)


@pytest.mark.parametrize("granularity", ["layer", "node"])
def test_apply_scales_preserves_function_and_attains_value(case, granularity):
    net = case.net
    result = ms(case, granularity=granularity)
    params = sharpness.apply_scales(net.params, result)
    np.testing.assert_allclose(case.outputs(params), case.outputs(net.params), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.trace(case.hessian(params)), result.value, rtol=1e-9)
    scales = result.scales
    if granularity == "layer":
        assert scales.shape == (len(net.params),)
    else:
        assert [s.shape[0] for s in scales] == [
            p["kernel"].shape[-1] for p in list(net.params.values())[:-1]
        ]


def test_hvp_method_estimates_exact(x64):  # noqa: F811
    case = net_case("mlp")
    exact = ms(case)
    estimate = ms(case, method="hvp", key=jax.random.key(0), num_samples=2000)
    np.testing.assert_allclose(estimate.value, exact.value, rtol=0.05)


def test_zero_curvature_gives_zero_not_nan():
    """All-zero bias-free weights: every block of the Hessian diagonal vanishes."""
    params = {"Dense_0": {"kernel": jnp.zeros((4, 3))}, "Dense_1": {"kernel": jnp.zeros((3, 2))}}

    def logits_fn(p, x):
        return jax.nn.relu(x @ p["Dense_0"]["kernel"]) @ p["Dense_1"]["kernel"]

    batch = (jnp.ones((5, 4)), jnp.zeros(5, jnp.int32))
    for granularity in ("layer", "node"):
        result = sharpness.minimum_sharpness(logits_fn, params, batch, granularity=granularity)
        assert float(result.value) == 0.0
        assert all(bool(jnp.all(jnp.isfinite(s))) for s in jax.tree.leaves(result.log_scales))
