"""sharpjax optimizers with flax.nnx models.

Two ways, both shown here:

* ``nnx.Optimizer``: its ``update(model, grads, **kwargs)`` forwards keyword arguments to
  ``tx.update``, so ``grad_fn`` goes straight through. ``grad_fn`` receives the *pure* param
  state (arrays, not Variables) and rebuilds the model with ``nnx.merge``.
* functional: ``nnx.split`` the model once, train the param state with plain JAX, and
  ``nnx.update`` the model at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sharpjax
from sharpjax.data import load_dataset

LR, RHO = 0.1, 0.05


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 32, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x.reshape((x.shape[0], -1)))))


def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.fixture(scope="module")
def batch():
    ds = load_dataset("digits")
    return jnp.asarray(ds.x_train[:256]), jnp.asarray(ds.y_train[:256])


@nnx.jit
def optimizer_step(model, optimizer, x, y):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def loss_of_params(params):  # params: the pure state nnx.Optimizer hands to tx.update
        return cross_entropy(nnx.merge(graphdef, params, rest)(x), y)

    loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
    optimizer.update(model, grads, grad_fn=jax.grad(loss_of_params))
    return loss


def test_nnx_optimizer_sam_step_by_hand_and_training(batch):
    x, y = batch
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.chain(sharpjax.sam(RHO), optax.sgd(LR)), wrt=nnx.Param)

    # One step against the equations: ε = ρ g/‖g‖, w ← w − lr ∇L(w + ε).
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    w = nnx.as_pure(params)
    loss = lambda p: cross_entropy(nnx.merge(graphdef, p, rest)(x), y)
    grad = jax.jit(jax.grad(loss))
    g = grad(w)
    g_norm = np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree.leaves(g)))
    g2 = grad(jax.tree.map(lambda a, b: np.asarray(a) + RHO * np.asarray(b) / g_norm, w, g))
    expected = jax.tree.map(lambda a, b: np.asarray(a) - LR * np.asarray(b), w, g2)

    first_loss = optimizer_step(model, optimizer, x, y)
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert float(sharpjax.diagnostics(nnx.as_pure(optimizer.opt_state))["rho"]) == pytest.approx(
        RHO
    )

    for _ in range(30):
        last_loss = optimizer_step(model, optimizer, x, y)
    assert float(last_loss) < 0.5 * float(first_loss)


def test_nnx_functional_split_merge(batch):
    x, y = batch
    model = Net(nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.as_pure(params)
    tx = optax.chain(sharpjax.saner(rho=0.1, alpha=0.5), optax.sgd(LR, momentum=0.9))
    opt_state = tx.init(params)

    def loss_fn(p):
        return cross_entropy(nnx.merge(graphdef, p, rest)(x), y)

    @jax.jit
    def step(params, opt_state):
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(g, opt_state, params, grad_fn=jax.grad(loss_fn))
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    assert 0.0 <= float(sharpjax.diagnostics(opt_state)["masked_fraction"]) <= 1.0
    nnx.update(model, params)
    updated = nnx.as_pure(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(updated), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
