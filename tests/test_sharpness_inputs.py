"""The measures on inputs that used to be answered silently wrong or with an unrelated crash.

A loss reading changed data (closure or global) must see the new data (the jit cache is keyed
on the loss as traced at each call); radii that are not finite and positive are refused, also
as arrays, and give NaN when traced; a PRNG key where adaptive_sharpness takes rho, and integer
params, are clear errors naming the argument or the leaf.

The loss is the diagonal quadratic ``L(w) = s Σ_j (w_j x_j)²``: ``H = diag(2 s x²)``, so the
exact answers are written here: ``tr H = 2 s Σ x²``, ``λ_max = 2 s max x²``, ``H 1 = 2 s x²``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharpjax import sharpness
from sharpjax.sharpness import _batches

KEY = jax.random.key(0)
PARAMS = {"w": jnp.ones(3)}
DATA = {"x": jnp.asarray([1.0, 2.0, 3.0])}
SCALE = 1.0


def quadratic(params):  # reads DATA (through a closure over the dict) and SCALE (a global)
    return SCALE * jnp.sum((params["w"] * DATA["x"]) ** 2)


def quadratic_on_batch(params, batch):
    return SCALE * jnp.mean(jnp.sum((params["w"] * batch) ** 2, axis=1))


EXACT = {
    "trace": lambda s, x: 2 * s * np.sum(x**2),
    "trace_streamed": lambda s, x: 2 * s * np.sum(x**2),
    "top_eigenvalue": lambda s, x: 2 * s * np.max(x**2),
    "hvp": lambda s, x: 2 * s * x**2,
    # L(w + α·1) at α = 1 with w = 1: s Σ (2 x)².
    "landscape": lambda s, x: 4 * s * np.sum(x**2),
}


def measure(name):
    if name == "trace":  # Hutchinson is exact on a diagonal Hessian (v_j² = 1)
        return sharpness.hessian_trace(quadratic, PARAMS, KEY, 4).value
    if name == "trace_streamed":
        batches = [DATA["x"][None], DATA["x"][None]]
        return sharpness.hessian_trace(quadratic_on_batch, PARAMS, KEY, 4, batches=batches).value
    if name == "top_eigenvalue":  # 3 Lanczos steps in 3 dimensions: exact
        return sharpness.top_eigenvalues(quadratic, PARAMS, KEY, 1, 3).value[0]
    if name == "hvp":
        return sharpness.hvp(quadratic, PARAMS, {"w": jnp.ones(3)})["w"]
    return sharpness.loss_landscape(
        quadratic,
        PARAMS,
        coordinates=jnp.asarray([1.0]),
        directions=[{"w": jnp.ones(3)}],
        normalization=None,
    ).losses[0]


@pytest.fixture
def restore_data():
    global SCALE
    old = DATA["x"], SCALE
    yield
    DATA["x"], SCALE = old


@pytest.mark.parametrize("name", sorted(EXACT))
def test_a_loss_reading_changed_data_is_never_answered_stale(name, restore_data):
    global SCALE
    x = np.asarray(DATA["x"])
    # float32: a handful of operations on values ≤ 1e4: 1e-6 relative.
    np.testing.assert_allclose(measure(name), EXACT[name](1.0, x), rtol=1e-6)
    DATA["x"] = 10 * DATA["x"]  # new data, same shapes: the 3.859 vs 38.59 case
    np.testing.assert_allclose(measure(name), EXACT[name](1.0, 10 * x), rtol=1e-6)
    SCALE = 2.0  # a Python number read from a global
    np.testing.assert_allclose(measure(name), EXACT[name](2.0, 10 * x), rtol=1e-6)


def test_logits_reading_changed_data_are_never_answered_stale(restore_data):
    # Linear logits z = x W + b·c with b read from DATA: the GGN diagonal is the Hessian
    # diagonal (each logit is linear in the weights); the reference is a dense jax.hessian.
    def logits_fn(p, x):
        return x @ p["W"] + DATA["x"][None] * p["c"]

    params = {
        "W": jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)), jnp.float32),
        "c": jnp.ones(3),
    }
    x = jnp.asarray([[1.0, -1.0], [0.5, 2.0]])
    y = jnp.asarray([0, 2])
    for factor in (1.0, 3.0):
        DATA["x"] = factor * jnp.asarray([1.0, 2.0, 3.0])
        loss = lambda c, p=params: sharpness.SoftmaxCrossEntropy(logits_fn)({**p, "c": c}, (x, y))
        expected = np.diag(jax.hessian(loss)(params["c"]))
        diagonal = sharpness.hessian_diagonal(logits_fn, params, (x, y))["c"]
        np.testing.assert_allclose(diagonal, expected, rtol=1e-5, atol=1e-7)


def test_a_new_lambda_with_the_same_body_reuses_the_compilation():
    def trace_of_new_lambda():
        loss = lambda p: jnp.sum((p["w"] * DATA["x"]) ** 2)  # a new object on every call
        return sharpness.hessian_trace(loss, PARAMS, KEY, 4).value

    trace_of_new_lambda()
    compiled = _batches._whole._cache_size()
    values = [trace_of_new_lambda() for _ in range(2)]
    assert _batches._whole._cache_size() == compiled
    np.testing.assert_allclose(values, 2 * np.sum(np.asarray(DATA["x"]) ** 2), rtol=1e-6)


@pytest.mark.parametrize(
    "rho",
    [
        float("inf"),
        float("nan"),
        -0.1,
        0.0,
        jnp.asarray(-0.1),
        jnp.asarray(jnp.inf),
        np.float32(np.nan),
        jnp.asarray([0.1, 0.2]),
        lambda step: 0.1,
    ],
    ids=[
        "inf",
        "nan",
        "negative",
        "zero",
        "negative_array",
        "inf_array",
        "nan_numpy",
        "vector",
        "schedule",
    ],
)
@pytest.mark.parametrize("kind", ["worst", "average"])
def test_b_radii_that_are_not_finite_and_positive_are_refused(rho, kind):
    with pytest.raises((ValueError, TypeError), match="rho"):
        sharpness.adaptive_sharpness(quadratic, PARAMS, rho, kind, key=KEY)


def test_b_other_radii_are_checked_as_arrays_too():
    with pytest.raises(ValueError, match="step_size"):
        sharpness.adaptive_sharpness(quadratic, PARAMS, 0.1, step_size=jnp.asarray(jnp.inf))
    with pytest.raises(ValueError, match="sigma"):
        sharpness.spectral_density(quadratic, PARAMS, KEY, 3, sigma=jnp.asarray(-1.0))


def test_b_a_traced_radius_out_of_range_gives_nan():
    @jax.jit
    def worst(rho):
        return sharpness.adaptive_sharpness(quadratic, PARAMS, rho, num_steps=2).value

    for bad in (-0.1, jnp.inf, jnp.nan, 0.0):
        assert np.isnan(worst(bad)), bad
    # A valid traced radius is used as given: the eager (checked) value.
    eager = sharpness.adaptive_sharpness(quadratic, PARAMS, 0.1, num_steps=2).value
    np.testing.assert_allclose(worst(0.1), eager, rtol=1e-6)


@pytest.mark.parametrize("key", [jax.random.key(0), jax.random.PRNGKey(0)], ids=["typed", "raw"])
def test_c_a_key_where_adaptive_sharpness_takes_rho_is_a_clear_error(key):
    with pytest.raises(TypeError, match=r"rho.*key=key"):
        sharpness.adaptive_sharpness(quadratic, PARAMS, key)
    with pytest.raises(TypeError, match="key=key"):
        sharpness.adaptive_sharpness(quadratic, PARAMS, 0.1, key)


INT_PARAMS = {"w": jnp.ones(3), "steps": jnp.zeros((), jnp.int32)}


def int_loss(params):
    return jnp.sum(params["w"] ** 2)


@pytest.mark.parametrize(
    "call",
    [
        lambda: sharpness.hessian_trace(int_loss, INT_PARAMS, KEY, 4),
        lambda: sharpness.top_eigenvalues(int_loss, INT_PARAMS, KEY, 1, 3),
        lambda: sharpness.spectral_density(int_loss, INT_PARAMS, KEY, 3),
        lambda: sharpness.hvp(int_loss, INT_PARAMS, INT_PARAMS),
        lambda: sharpness.adaptive_sharpness(int_loss, INT_PARAMS, 0.1),
        lambda: sharpness.loss_landscape(int_loss, INT_PARAMS, KEY),
        lambda: sharpness.hessian_diagonal(
            lambda p, x: x * p["w"], INT_PARAMS, (jnp.ones((2, 3)), jnp.zeros(2, jnp.int32))
        ),
    ],
    ids=["trace", "eigenvalues", "density", "hvp", "adaptive", "landscape", "diagonal"],
)
def test_d_integer_params_are_a_clear_error_naming_the_leaf(call):
    with pytest.raises(TypeError, match=r"\['steps'\].*int32"):
        call()


def test_f_plot_spectral_density_draws_the_density_and_its_nodes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    # H = diag(2 x²) = diag(2, 8, 18): 3 Lanczos steps give exactly these Ritz values.
    densities = {
        f"s = {s}": sharpness.spectral_density(
            lambda p, s=s: s * quadratic(p), PARAMS, KEY, 3, sigma=0.5, num_points=400
        )
        for s in (1.0, 2.0)
    }
    np.testing.assert_allclose(np.sort(densities["s = 1.0"].nodes.ravel()), [2, 8, 18], rtol=1e-5)
    fig = sharpness.plot_spectral_density(densities, title="test")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    curves = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    rugs = [line for line in ax.get_lines() if line.get_marker() == "|"]
    assert len(curves) == len(rugs) == 2
    top = max(float(np.max(d.density)) for d in densities.values())
    for curve, rug, d in zip(curves, rugs, densities.values(), strict=True):
        np.testing.assert_allclose(curve.get_xdata(), d.grid)
        np.testing.assert_allclose(curve.get_ydata(), np.maximum(d.density, 1e-7 * top))
        np.testing.assert_allclose(np.sort(rug.get_xdata()), np.sort(d.nodes.ravel()))
    path = tmp_path / "density.png"
    fig.savefig(path)
    assert path.stat().st_size > 0
    with pytest.raises(TypeError, match="SpectralDensity"):
        sharpness.plot_spectral_density((densities["s = 1.0"].grid, densities["s = 1.0"].density))
