"""Loss landscapes: filter normalisation against its definition, exact slices of quadratics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharpjax import sharpness
from tests.helpers import cross_entropy, tiny_mlp_params, toy_batches

# float32 throughout: one op is ~1e-7 relative, a loss over a 16-example batch a few 1e-7.
RTOL = 1e-5


@pytest.fixture(scope="module")
def conv_params():
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        },
        "bn": {"scale": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
    }


def _filter_normalised_reference(d: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Li et al. (2018), one filter at a time: d_f ← d_f ‖w_f‖ / ‖d_f‖."""
    out = np.empty_like(d)
    for f in range(w.shape[axis]):
        wf, df = np.take(w, f, axis=axis), np.take(d, f, axis=axis)
        idx = [slice(None)] * w.ndim
        idx[axis] = f
        out[tuple(idx)] = df * np.linalg.norm(wf) / np.linalg.norm(df)
    return out


@pytest.mark.parametrize("filter_axis", [-1, 0])
def test_filter_normalisation_matches_its_definition(conv_params, filter_axis):
    rng = np.random.default_rng(1)
    direction = jax.tree.map(
        lambda w: jnp.asarray(rng.normal(size=w.shape), jnp.float32), conv_params
    )
    out = sharpness.normalize_direction(direction, conv_params, filter_axis=filter_axis)
    for layer, name in [("conv", "kernel"), ("dense", "kernel")]:
        w, d = np.asarray(conv_params[layer][name]), np.asarray(direction[layer][name])
        np.testing.assert_allclose(
            out[layer][name], _filter_normalised_reference(d, w, filter_axis % w.ndim), rtol=RTOL
        )
    # Biases and BatchNorm parameters are not perturbed by default.
    assert not np.any(np.asarray(out["dense"]["bias"]))
    assert not np.any(np.asarray(out["bn"]["scale"]))


def test_include_1d_uses_the_weights_and_layer_normalisation(conv_params):
    direction = jax.tree.map(lambda w: 2.0 * jnp.ones_like(w), conv_params)
    out = sharpness.normalize_direction(direction, conv_params, "layer", include_1d=True)
    np.testing.assert_array_equal(out["dense"]["bias"], conv_params["dense"]["bias"])
    np.testing.assert_array_equal(out["bn"]["scale"], conv_params["bn"]["scale"])
    w = np.asarray(conv_params["conv"]["kernel"])
    np.testing.assert_allclose(
        out["conv"]["kernel"], np.ones_like(w) * np.linalg.norm(w) / np.sqrt(w.size), rtol=RTOL
    )
    same = sharpness.normalize_direction(direction, conv_params, None)
    assert same is not direction and np.all(np.asarray(same["bn"]["scale"]) == 2)


def test_random_direction_has_the_filter_norms_of_the_weights(conv_params):
    d = sharpness.random_direction(jax.random.key(3), conv_params)
    w = np.asarray(conv_params["conv"]["kernel"])
    norms = lambda a: np.sqrt(np.sum(np.asarray(a) ** 2, axis=(0, 1, 2)))
    np.testing.assert_allclose(norms(d["conv"]["kernel"]), norms(w), rtol=RTOL)
    other = sharpness.random_direction(jax.random.key(4), conv_params)
    assert np.max(np.abs(np.asarray(d["conv"]["kernel"] - other["conv"]["kernel"]))) > 0.1


@pytest.fixture(scope="module")
def mlp():
    params = tiny_mlp_params(jax.random.key(0))
    (batch,) = toy_batches(jax.random.key(1), 1)
    return params, batch


def test_centre_value_is_the_loss_at_the_params(mlp):
    params, (x, y) = mlp
    loss = lambda p: cross_entropy(p, x, y)
    expected = float(loss(params))
    one = sharpness.loss_landscape(loss, params, jax.random.key(0), 1, jnp.linspace(-1, 1, 5))
    two = sharpness.loss_landscape(loss, params, jax.random.key(0), 2, jnp.linspace(-1, 1, 5))
    assert one.losses.shape == (5,) and two.losses.shape == (5, 5)
    np.testing.assert_allclose(one.losses[2], expected, rtol=RTOL)
    np.testing.assert_allclose(two.losses[2, 2], expected, rtol=RTOL)
    # Away from the centre the random slice does move the loss.
    assert abs(float(two.losses[0, 4]) - expected) > 1e-3
    assert jax.tree.leaves(two.directions)[0].shape[0] == 2


def test_quadratic_loss_gives_the_exact_parabola():
    rng = np.random.default_rng(0)
    M = rng.normal(size=(6, 6))
    A, b = jnp.asarray(M @ M.T / 6, jnp.float32), jnp.asarray(rng.normal(size=6), jnp.float32)
    loss = lambda p: 0.5 * p["w"] @ A @ p["w"] + b @ p["w"]
    params = {"w": jnp.asarray(rng.normal(size=6), jnp.float32)}
    d1, d2 = ({"w": jnp.asarray(rng.normal(size=6), jnp.float32)} for _ in range(2))
    alphas, betas = jnp.linspace(-2, 2, 9), jnp.linspace(-1, 1, 5)
    out = sharpness.loss_landscape(
        loss, params, directions=[d1, d2], coordinates=[alphas, betas], normalization=None
    )
    w, u, v, A_, b_ = (np.asarray(a, np.float64) for a in (params["w"], d1["w"], d2["w"], A, b))
    g = A_ @ w + b_
    a, c = np.asarray(alphas)[:, None], np.asarray(betas)[None, :]
    L0 = 0.5 * w @ A_ @ w + b_ @ w
    expected = (
        L0 + a * (g @ u) + c * (g @ v) + 0.5 * a**2 * (u @ A_ @ u) + a * c * (u @ A_ @ v)
    ) + 0.5 * c**2 * (v @ A_ @ v)
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(out.losses, expected, atol=RTOL * scale)


def test_batches_chunks_and_one_batch_agree(mlp):
    params, _ = mlp
    batches = toy_batches(jax.random.key(5), 3)
    x = jnp.concatenate([b[0] for b in batches])
    y = jnp.concatenate([b[1] for b in batches])
    grid = jnp.linspace(-0.5, 0.5, 7)
    kwargs = dict(num_directions=2, coordinates=grid)
    whole = sharpness.loss_landscape(
        lambda p: cross_entropy(p, x, y), params, jax.random.key(0), **kwargs
    )
    streamed = sharpness.loss_landscape(
        lambda p, b: cross_entropy(p, *b), params, jax.random.key(0), batches=batches, **kwargs
    )
    chunked = sharpness.loss_landscape(
        lambda p: cross_entropy(p, x, y), params, jax.random.key(0), chunk_size=10, **kwargs
    )
    np.testing.assert_allclose(streamed.losses, whole.losses, rtol=RTOL)
    np.testing.assert_allclose(chunked.losses, whole.losses, rtol=RTOL)


def test_bad_arguments_are_clear_errors(mlp):
    params, (x, y) = mlp
    loss = lambda p: cross_entropy(p, x, y)
    with pytest.raises(ValueError, match="key is required"):
        sharpness.loss_landscape(loss, params)
    with pytest.raises(ValueError, match="num_directions must be 1 or 2"):
        sharpness.loss_landscape(loss, params, jax.random.key(0), 3)
    with pytest.raises(TypeError, match="wrap a single direction"):
        sharpness.loss_landscape(loss, params, directions=params)
    with pytest.raises(ValueError, match="same pytree structure"):
        sharpness.loss_landscape(loss, params, directions=[{"w": x}])
    with pytest.raises(ValueError, match="one grid per direction"):
        sharpness.loss_landscape(loss, params, jax.random.key(0), 2, [jnp.zeros(3)])
    with pytest.raises(ValueError, match="Unknown normalization"):
        sharpness.loss_landscape(loss, params, jax.random.key(0), normalization="unit")


def test_plot_landscape_draws_curves_and_contours(mlp):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params, (x, y) = mlp
    loss = lambda p: cross_entropy(p, x, y)
    grid = jnp.linspace(-1, 1, 5)
    one = {
        n: sharpness.loss_landscape(loss, params, jax.random.key(i), 1, grid)
        for i, n in enumerate("ab")
    }
    two = {
        n: sharpness.loss_landscape(loss, params, jax.random.key(i), 2, grid)
        for i, n in enumerate("ab")
    }
    fig1 = sharpness.plot_landscape(one, title="1-D")
    fig2 = sharpness.plot_landscape(two, title="2-D")
    assert len(fig1.axes[0].lines) == 2
    assert len(fig2.axes) == 3  # two panels and the shared colour bar
    with pytest.raises(ValueError, match="cannot mix"):
        sharpness.plot_landscape({"a": one["a"], "b": two["b"]})
    plt.close("all")
