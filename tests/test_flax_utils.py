"""sharpjax.flax_utils.TrainState against the plain optax loop it stands for."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

import sharpjax
from sharpjax.flax_utils import TrainState


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))


def _problem():
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (16, 4))
    y = jax.random.randint(ky, (16,), 0, 3)
    model = _MLP()
    params = model.init(kp, x)["params"]

    def loss_fn(params):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return model, params, loss_fn


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optax.chain(sharpjax.sam(0.1), optax.sgd(0.1, momentum=0.9)),
        lambda: optax.chain(sharpjax.saner(0.1, alpha=0.5), optax.adam(1e-2)),
    ],
    ids=["sam-sgd", "saner-adam"],
)
def test_apply_gradients_equals_the_plain_optax_loop(make_tx):
    model, params, loss_fn = _problem()
    tx = make_tx()

    # The reference: the optax loop of the README, grad_fn passed to tx.update by hand.
    ref_params, ref_opt = params, tx.init(params)
    for _ in range(3):
        grads = jax.grad(loss_fn)(ref_params)
        updates, ref_opt = tx.update(grads, ref_opt, ref_params, grad_fn=jax.grad(loss_fn))
        ref_params = optax.apply_updates(ref_params, updates)

    @jax.jit
    def train_step(state):
        grads = jax.grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads, grad_fn=jax.grad(loss_fn))

    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    for _ in range(3):
        state = train_step(state)

    assert int(state.step) == 3
    # Same arithmetic, jitted vs eager: float32 rounding over 3 steps of a tiny net.
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # ... and the second gradient really was taken: SAM's diagnostics are filled in.
    assert float(sharpjax.diagnostics(state.opt_state)["perturbation_norm"]) > 0.0
    # The step moved the parameters (the comparison above is not between two no-ops).
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True))  # fmt: skip
    assert moved > 1e-3


def test_field_keywords_replace_fields_and_the_rest_go_to_update():
    class StateWithStats(TrainState):
        batch_stats: dict = struct.field(default_factory=dict)

    model, params, loss_fn = _problem()
    tx = optax.chain(sharpjax.sam(0.1), optax.sgd(0.1))
    state = StateWithStats.create(
        apply_fn=model.apply, params=params, tx=tx, batch_stats={"mean": jnp.zeros(2)}
    )
    grads = jax.grad(loss_fn)(params)
    new = state.apply_gradients(
        grads=grads, grad_fn=jax.grad(loss_fn), batch_stats={"mean": jnp.ones(2)}
    )
    np.testing.assert_array_equal(new.batch_stats["mean"], np.ones(2))
    with pytest.raises(TypeError, match="need a `grad_fn`"):  # sharpjax's message reaches us
        state.apply_gradients(grads=grads)
    with pytest.raises(ValueError, match=r"state\.replace"):
        state.apply_gradients(grads=grads, grad_fn=jax.grad(loss_fn), params=params)
