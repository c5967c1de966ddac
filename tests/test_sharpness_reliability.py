"""Minimum Sharpness refuses what it cannot handle, instead of returning a wrong number.

Each case returned a silently wrong value before the output check (issue 12 §5): a layer order
broken by a string sort of the keys, networks that are not rescaling-invariant, and a
channel-first flatten read channel-last.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharpjax import sharpness
from tests.test_sharpness_nets import x64  # noqa: F401

NUM_CLASSES = 3
RNG = np.random.default_rng(0)
# NumPy data: float64 once the x64 fixture is on (a jnp array made at import would be float32).
X = RNG.normal(size=(16, 4))
Y = RNG.integers(0, NUM_CLASSES, 16).astype(np.int32)
DEPTH = 12


def chain_params(widths, seed=0):
    """Dense_0..Dense_{L-1}, definition order, fan-in scaled kernels and non-zero biases."""
    rng = np.random.default_rng(seed)
    return {
        f"Dense_{i}": {
            "kernel": jnp.asarray(rng.normal(size=(a, b)) * np.sqrt(2 / a)),
            "bias": jnp.asarray(0.1 * rng.normal(size=b)),
        }
        for i, (a, b) in enumerate(itertools.pairwise(widths))
    }


def chain_logits(params, x, activation=lambda z: jax.nn.leaky_relu(z, 0.1), residual=False):
    """The forward pass in numeric order of the names, whatever the dict's order."""
    names = sorted(params, key=lambda n: int(n.split("_")[1]))
    for i, name in enumerate(names):
        z = x @ params[name]["kernel"] + params[name]["bias"]
        if i == len(names) - 1:
            return z
        z = activation(z)
        x = x + z if residual and z.shape == x.shape else z
    raise AssertionError("unreachable")


def leaky_chain(params, x):
    return chain_logits(params, x)


def tanh_chain(params, x):
    return chain_logits(params, x, activation=jnp.tanh)


def residual_chain(params, x):
    return chain_logits(params, x, residual=True)


@pytest.mark.parametrize("granularity", ["layer", "node"])
def test_string_sorted_keys_of_a_deep_mlp_keep_the_forward_order(granularity):
    # Every layer 3 → 3 (input and classes too): the string order Dense_0, Dense_1, Dense_10,
    # ... chains as well as the forward one, so no shape check can notice it.
    x = X[:, :NUM_CLASSES]
    params = chain_params([NUM_CLASSES] * (DEPTH + 1))
    shuffled = jax.tree.map(lambda a: a, params)  # what any tree.map or optax update returns
    assert list(shuffled)[:3] == ["Dense_0", "Dense_1", "Dense_10"]  # the trap is set
    forward = [f"Dense_{i}" for i in range(DEPTH)]
    expected = sharpness.minimum_sharpness(
        leaky_chain, params, (x, Y), forward, granularity=granularity
    )
    result = sharpness.minimum_sharpness(leaky_chain, shuffled, (x, Y), granularity=granularity)
    # One convex problem, two solves stopped at a Newton decrement ≤ tol = 1e-10 (relative).
    np.testing.assert_allclose(result.value, expected.value, rtol=1e-9)
    rescaled = sharpness.apply_scales(shuffled, result)
    np.testing.assert_allclose(
        leaky_chain(rescaled, x), leaky_chain(params, x), rtol=1e-9, atol=1e-9
    )
    # The value is the trace of the rescaled network (a piecewise-linear net: exact diagonal).
    diagonal = sharpness.hessian_diagonal(leaky_chain, rescaled, (x, Y))
    attained = float(sum(jnp.sum(d) for d in jax.tree.leaves(diagonal)))
    np.testing.assert_allclose(attained, result.value, rtol=1e-9)
    assert result.value < result.trace


@pytest.mark.parametrize("logits_fn", [tanh_chain, residual_chain], ids=["tanh", "residual"])
@pytest.mark.parametrize("granularity", ["layer", "node"])
def test_networks_that_are_not_rescaling_invariant_are_refused(logits_fn, granularity):
    params = chain_params([4, 4, 4, NUM_CLASSES], seed=1)
    with pytest.raises(ValueError, match="not invariant under rescaling") as error:
        sharpness.minimum_sharpness(logits_fn, params, (X, Y), granularity=granularity)
    assert "check=False" in str(error.value)
    result = sharpness.minimum_sharpness(
        logits_fn, params, (X, Y), granularity=granularity, check=False
    )
    assert result.output_change > np.sqrt(np.finfo(np.float64).eps)
    rescaled = sharpness.apply_scales(params, result)
    change = np.max(np.abs(logits_fn(rescaled, X) - logits_fn(params, X)))
    np.testing.assert_allclose(
        result.output_change, change / np.max(np.abs(logits_fn(params, X))), rtol=1e-9
    )


class FlattenCNN(nn.Module):
    """conv → max-pool → conv → flatten → dense, the flatten channel-first or channel-last."""

    channel_first: bool

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(3, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(4, (2, 2), padding="VALID")(x))
        if self.channel_first:
            x = x.transpose(0, 3, 1, 2)
        return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))


def test_channel_first_flatten_is_refused_then_handled():
    x = RNG.normal(size=(12, 6, 6, 1))
    y = RNG.integers(0, NUM_CLASSES, 12).astype(np.int32)
    first, last = FlattenCNN(True), FlattenCNN(False)
    # float64 params (flax initialises float32): the references below are to 1e-9.
    initial = first.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda a: 0.5 * np.asarray(a, np.float64) + 0.05, initial)
    # The channel-last twin: the same function, the dense kernel's rows permuted.
    kernel = params["Dense_0"]["kernel"]  # rows in (channel, position) order; 4 channels
    twin_kernel = kernel.reshape(4, -1, NUM_CLASSES).transpose(1, 0, 2).reshape(kernel.shape)
    twin = {**params, "Dense_0": {**params["Dense_0"], "kernel": twin_kernel}}

    def cf(p, inputs):
        return first.apply({"params": p}, inputs)

    def cl(p, inputs):
        return last.apply({"params": p}, inputs)

    np.testing.assert_allclose(cl(twin, x), cf(params, x), rtol=1e-12, atol=1e-12)

    with pytest.raises(ValueError, match="flatten='channel_first'"):
        sharpness.minimum_sharpness(cf, params, (x, y), granularity="node")
    result = sharpness.minimum_sharpness(
        cf, params, (x, y), granularity="node", flatten="channel_first"
    )
    reference = sharpness.minimum_sharpness(cl, twin, (x, y), granularity="node")
    np.testing.assert_allclose(result.value, reference.value, rtol=1e-9)
    assert result.value < sharpness.minimum_sharpness(cf, params, (x, y)).value  # node < layer
    rescaled = sharpness.apply_scales(params, result, flatten="channel_first")
    np.testing.assert_allclose(cf(rescaled, x), cf(params, x), rtol=1e-9, atol=1e-9)


def test_a_given_diagonal_is_used_and_checked():
    params = chain_params([4, 5, 5, NUM_CLASSES], seed=2)
    diagonal = sharpness.hessian_diagonal(leaky_chain, params, (X, Y))
    for granularity in ("layer", "node"):
        computed = sharpness.minimum_sharpness(leaky_chain, params, (X, Y), granularity=granularity)
        doubled = sharpness.minimum_sharpness(
            leaky_chain,
            params,
            (X, Y),
            granularity=granularity,
            diagonal=jax.tree.map(lambda d: 2 * d, diagonal),
        )
        # The objective is linear in the diagonal: twice the diagonal, twice the minimum.
        np.testing.assert_allclose(doubled.value, 2 * computed.value, rtol=1e-9)
        np.testing.assert_allclose(doubled.trace, 2 * computed.trace, rtol=1e-12)
    bad = {**diagonal, "Dense_0": {"kernel": diagonal["Dense_0"]["kernel"]}}
    with pytest.raises(ValueError, match="diagonal must have the structure"):
        sharpness.minimum_sharpness(leaky_chain, params, (X, Y), diagonal=bad)


def test_one_shot_iterator_of_batches():
    params = chain_params([4, 5, NUM_CLASSES], seed=3)
    batches = [(X[:7], Y[:7]), (X[7:], Y[7:])]
    one = sharpness.minimum_sharpness(leaky_chain, params, (X, Y))
    once = sharpness.minimum_sharpness(leaky_chain, params, iter(batches))
    np.testing.assert_allclose(once.value, one.value, rtol=1e-9)
    with pytest.raises(ValueError, match="empty"):
        sharpness.minimum_sharpness(leaky_chain, params, iter([]))
