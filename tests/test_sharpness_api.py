"""sharpjax.sharpness: batches vs one batch, jit, and clear errors on bad input."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharpjax import sharpness
from tests.test_sharpness_nets import flatten, net_case, unflatten_like, x64  # noqa: F401

KEY = jax.random.key(0)


def batch_loss(params, batch):
    return net_case("mlp").net.loss(params, *batch)


@pytest.fixture(scope="module")
def mlp(x64):  # noqa: F811
    """(net, full-batch loss, two equal batches: one per-batch compilation).

    The loss object and the measures' static arguments are those of test_sharpness_hessian,
    so in one pytest run the single-batch references reuse its compilations.
    """
    case = net_case("mlp")
    net = case.net
    return net, case.loss, [(net.x[:6], net.y[:6]), (net.x[6:], net.y[6:])]


LOSS_MEASURES = {
    "hvp": lambda loss, p, **kw: sharpness.hvp(loss, p, p, **kw),
    "hutchinson": lambda loss, p, **kw: sharpness.hessian_trace(loss, p, KEY, 12, **kw),
    "hutch++": lambda loss, p, **kw: sharpness.hessian_trace(loss, p, KEY, 249, "hutch++", **kw),
    "eigenvectors": lambda loss, p, **kw: sharpness.top_eigenvalues(
        loss, p, KEY, k=3, num_iterations=40, return_eigenvectors=True, **kw
    ),
    # Not the weights of single nodes: with 83 steps in 83 dimensions some Ritz values are
    # (nearly) repeated, and how eigh splits a repeated node's weight is rounding-dependent;
    # the density, which sums them, is not.
    "density": lambda loss, p, **kw: sharpness.spectral_density(
        loss, p, KEY, num_iterations=83, num_probes=2, **kw
    )._replace(weights=None),
    "average": lambda loss, p, **kw: sharpness.adaptive_sharpness(
        loss, p, 0.1, "average", key=KEY, num_samples=2000, **kw
    ),
    "worst": lambda loss, p, **kw: sharpness.adaptive_sharpness(loss, p, 0.1, **kw),
}


# Streaming sums the loss over batches in another order than one batch does: each float64 result
# moves by a few ulps per operation, amplified by the measure's conditioning (Lanczos: ‖H‖ over
# the gap of the top eigenvalues). 1e-9 is 4.5e6 ulps: a condition number of ~1e4 on ~100
# operations, far above these tiny nets' (observed differences: < 1e-13 relative). The atol
# (1e-12 on O(1) quantities) covers entries that cancel to ~0, e.g. Hutch++'s residual.
RTOL, ATOL = 1e-9, 1e-12


def assert_trees_close(a, b, rtol=RTOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=ATOL)


def assert_eigenvectors_close(a, b):
    """Eigenvalues to RTOL; each eigenvector up to its sign, which eigh does not define."""
    (values_a, vectors_a), (values_b, vectors_b) = a[:2], b[:2]
    assert_trees_close(values_a, values_b)
    flat_a = np.concatenate(
        [np.reshape(v, (len(values_a), -1)) for v in jax.tree.leaves(vectors_a)], 1
    )
    flat_b = np.concatenate(
        [np.reshape(v, (len(values_b), -1)) for v in jax.tree.leaves(vectors_b)], 1
    )
    signs = np.sign(np.sum(flat_a * flat_b, axis=1, keepdims=True))
    np.testing.assert_allclose(flat_a, signs * flat_b, rtol=RTOL, atol=ATOL)


def assert_worst_cases_close(a, b, net):
    """The ascent keeps the best of iterates whose losses agree to ~1e-12 near convergence, so
    rounding may pick another one: compare the value (a max, stable to the loss's rounding),
    and check that each returned delta is feasible and attains its own value."""
    np.testing.assert_allclose(a.value, b.value, rtol=RTOL, atol=ATOL)
    flat = flatten(net.params)
    scale = np.abs(flat)
    base = float(net.loss(net.params))
    for result in (a, b):
        delta = flatten(result.delta)
        assert np.linalg.norm(delta[scale > 0] / scale[scale > 0]) <= 0.1 * (1 + 1e-12)
        attained = float(net.loss(unflatten_like(net.params, flat + delta))) - base
        # A difference of two O(1) losses, each exact to ~1e-15: absolute, not relative.
        np.testing.assert_allclose(attained, result.value, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", list(LOSS_MEASURES))
def test_loss_measures_over_batches_equal_one_batch(mlp, name):
    net, loss, batches = mlp
    measure = LOSS_MEASURES[name]
    many, one = measure(batch_loss, net.params, batches=batches), measure(loss, net.params)
    if name == "worst":
        assert_worst_cases_close(many, one, net)
    elif name == "eigenvectors":
        assert_eigenvectors_close(many, one)
    else:
        assert_trees_close(many, one)


def test_batches_are_weighted_by_example_count(mlp):
    net, loss, _ = mlp
    batches = [(net.x[:3], net.y[:3]), (net.x[3:], net.y[3:])]
    many = sharpness.hvp(batch_loss, net.params, net.params, batches=batches)
    assert_trees_close(many, sharpness.hvp(loss, net.params, net.params))
    one = sharpness.minimum_sharpness(net.logits_fn, net.params, (net.x, net.y))
    many = sharpness.minimum_sharpness(net.logits_fn, net.params, batches)
    np.testing.assert_allclose(many.value, one.value, rtol=1e-9)


@pytest.mark.parametrize(
    "kwargs", [{}, {"method": "hvp", "key": KEY, "num_samples": 8}], ids=["exact", "hvp"]
)
def test_hessian_diagonal_over_batches_equals_one_batch(mlp, kwargs):
    net, _, batches = mlp
    one = sharpness.hessian_diagonal(net.logits_fn, net.params, (net.x, net.y), **kwargs)
    assert_trees_close(
        sharpness.hessian_diagonal(net.logits_fn, net.params, batches, **kwargs), one
    )


@pytest.mark.parametrize("granularity", ["layer", "node"])
def test_minimum_sharpness_over_batches_equals_one_batch(mlp, granularity):
    net, _, batches = mlp
    one = sharpness.minimum_sharpness(net.logits_fn, net.params, (net.x, net.y), None, granularity)
    many = sharpness.minimum_sharpness(net.logits_fn, net.params, batches, None, granularity)
    np.testing.assert_allclose(many.value, one.value, rtol=1e-9)
    np.testing.assert_allclose(many.trace, one.trace, rtol=1e-9)


def test_one_shot_iterators(mlp):
    net, loss, batches = mlp
    once = sharpness.hvp(batch_loss, net.params, net.params, batches=iter(batches))
    assert_trees_close(once, sharpness.hvp(loss, net.params, net.params))
    with pytest.raises(TypeError, match="one-shot"):
        sharpness.top_eigenvalues(batch_loss, net.params, KEY, batches=iter(batches))


def test_everything_jits(mlp):
    """All measures inside one outer jit (one compilation), static arguments bound by partial.

    The eager calls are the references (themselves jitted inside, cached from other tests).
    """
    net, loss, _ = mlp
    trace = partial(sharpness.hessian_trace, loss, num_samples=12)
    eigen = partial(sharpness.top_eigenvalues, loss, k=3, num_iterations=40)
    diagonal = partial(sharpness.hessian_diagonal, net.logits_fn)
    minimum = partial(sharpness.minimum_sharpness, net.logits_fn, granularity="node")

    def everything(p, batch, key):
        result = minimum(p, batch)
        return {
            "hvp": sharpness.hvp(loss, p, p),
            "trace": trace(p, key),
            "eigen": eigen(p, key),
            "diagonal": diagonal(p, batch),
            "minimum": result,
            "rescaled": sharpness.apply_scales(p, result),
        }

    args = (net.params, (net.x, net.y), KEY)
    jitted, eager = jax.jit(everything)(*args), everything(*args)
    for name in ("hvp", "trace", "eigen", "diagonal"):
        assert_trees_close(jitted[name], eager[name])
    # Minimum Sharpness: the value is a minimum, stable to rounding; the minimiser (the scales)
    # and the Newton step count are not (flat directions, an early stop one step apart), so
    # check instead that the jitted scales preserve the function and attain the value.
    for field in ("value", "trace"):
        assert_trees_close(getattr(jitted["minimum"], field), getattr(eager["minimum"], field))
    rescaled = jitted["rescaled"]
    np.testing.assert_allclose(
        net.logits_fn(rescaled, net.x), net.logits_fn(net.params, net.x), rtol=1e-9, atol=1e-9
    )
    attained = sum(np.sum(d) for d in jax.tree.leaves(diagonal(rescaled, (net.x, net.y))))
    # value is the objective at the returned scales (not at the exact minimiser): equal up to
    # rounding, amplified by the scales' range.
    np.testing.assert_allclose(attained, jitted["minimum"].value, rtol=1e-9)


def bad_layout(params):
    return {**params, "BatchNorm_0": {"scale": jnp.ones(3)}}


def wrong_bias(params):
    return {**params, "Dense_0": {**params["Dense_0"], "bias": jnp.ones(7)}}


def ms(net, params=None, batch=None, **kw):
    params = net.params if params is None else params
    batch = (net.x, net.y) if batch is None else batch
    return sharpness.minimum_sharpness(net.logits_fn, params, batch, **kw)


BAD_CALLS = [
    pytest.param(
        ValueError,
        "num_samples",
        lambda n, loss: sharpness.hessian_trace(loss, n.params, KEY, 0),
        id="trace_zero_samples",
    ),
    pytest.param(
        TypeError,
        "num_samples",
        lambda n, loss: sharpness.hessian_trace(loss, n.params, KEY, 2.5),
        id="trace_float_samples",
    ),
    pytest.param(
        ValueError,
        "method",
        lambda n, loss: sharpness.hessian_trace(loss, n.params, KEY, 4, "exact"),
        id="trace_method",
    ),
    pytest.param(
        ValueError,
        "num_samples",
        lambda n, loss: sharpness.hessian_trace(loss, n.params, KEY, 2, "hutch++"),
        id="hutchpp_budget",
    ),
    pytest.param(
        ValueError,
        "structure",
        lambda n, loss: sharpness.hvp(loss, n.params, {"w": 1.0}),
        id="hvp_structure",
    ),
    pytest.param(
        TypeError,
        "loss_fn",
        lambda n, loss: sharpness.hvp(3.0, n.params, n.params),
        id="loss_not_callable",
    ),
    pytest.param(
        ValueError,
        "empty",
        lambda n, loss: sharpness.hvp(batch_loss, n.params, n.params, batches=[]),
        id="empty_batches",
    ),
    pytest.param(
        ValueError,
        "k=",
        lambda n, loss: sharpness.top_eigenvalues(loss, n.params, KEY, k=10**4),
        id="k_too_large",
    ),
    pytest.param(
        ValueError,
        "num_iterations",
        lambda n, loss: sharpness.top_eigenvalues(loss, n.params, KEY, num_iterations=0),
        id="zero_iterations",
    ),
    pytest.param(
        ValueError,
        "num_iterations",
        lambda n, loss: sharpness.top_eigenvalues(loss, n.params, KEY, k=5, num_iterations=3),
        id="k_above_iterations",
    ),
    pytest.param(
        ValueError,
        "num_probes",
        lambda n, loss: sharpness.spectral_density(loss, n.params, KEY, num_probes=0),
        id="zero_probes",
    ),
    pytest.param(
        ValueError,
        "kind",
        lambda n, loss: sharpness.adaptive_sharpness(loss, n.params, 0.1, "max"),
        id="adaptive_kind",
    ),
    pytest.param(
        ValueError,
        "key",
        lambda n, loss: sharpness.adaptive_sharpness(loss, n.params, 0.1, "average"),
        id="adaptive_key",
    ),
    pytest.param(
        ValueError,
        "rho",
        lambda n, loss: sharpness.adaptive_sharpness(loss, n.params, 0.0),
        id="adaptive_rho",
    ),
    pytest.param(
        ValueError,
        "num_steps",
        lambda n, loss: sharpness.adaptive_sharpness(loss, n.params, 0.1, num_steps=0),
        id="adaptive_steps",
    ),
    pytest.param(
        ValueError,
        "method",
        lambda n, loss: sharpness.hessian_diagonal(n.logits_fn, n.params, (n.x, n.y), "dense"),
        id="diagonal_method",
    ),
    pytest.param(
        ValueError,
        "key",
        lambda n, loss: sharpness.hessian_diagonal(n.logits_fn, n.params, (n.x, n.y), "hvp"),
        id="diagonal_key",
    ),
    pytest.param(
        ValueError,
        "num_samples",
        lambda n, loss: sharpness.hessian_diagonal(
            n.logits_fn, n.params, (n.x, n.y), "hvp", KEY, -1
        ),
        id="diagonal_samples",
    ),
    pytest.param(
        TypeError,
        "integer",
        lambda n, loss: sharpness.hessian_diagonal(
            n.logits_fn, n.params, (n.x, jax.nn.one_hot(n.y, 3))
        ),
        id="one_hot_labels",
    ),
    pytest.param(
        TypeError,
        "batch",
        lambda n, loss: sharpness.hessian_diagonal(n.logits_fn, n.params, n.x),
        id="not_a_batch",
    ),
    pytest.param(
        ValueError, "granularity", lambda n, loss: ms(n, granularity="unit"), id="granularity"
    ),
    pytest.param(ValueError, "method", lambda n, loss: ms(n, method="dense"), id="ms_method"),
    pytest.param(
        ValueError,
        "Dense_9",
        lambda n, loss: ms(n, layers=["Dense_0", "Dense_9"]),
        id="missing_layer",
    ),
    pytest.param(
        ValueError, "BatchNorm_0", lambda n, loss: ms(n, bad_layout(n.params)), id="no_kernel"
    ),
    pytest.param(
        ValueError,
        "forward order",
        lambda n, loss: ms(n, layers=["Dense_1", "Dense_0", "Dense_2"]),
        id="layers_order",
    ),
    pytest.param(ValueError, "bias", lambda n, loss: ms(n, wrong_bias(n.params)), id="bias_shape"),
    pytest.param(
        ValueError, "variables", lambda n, loss: ms(n, {"params": n.params}), id="flax_variables"
    ),
    pytest.param(TypeError, "layers", lambda n, loss: ms(n, layers="Dense_0"), id="layers_string"),
]


@pytest.mark.parametrize(("error", "match", "call"), BAD_CALLS)
def test_bad_input_raises_clear_errors(mlp, error, match, call):
    net, loss, _ = mlp
    with pytest.raises(error, match=match):
        call(net, loss)
