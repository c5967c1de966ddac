"""Drop-in mode: plain ``update(grads, state, params)`` calls alternating ascent and descent
equal the ``grad_fn`` form, step for step, for every kind of rule (and with a policy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sharpjax
from tests.helpers import cross_entropy, mlp_apply, tiny_mlp_params, toy_batches
from tests.test_core import trajectory_atol

LR, MOMENTUM, STEPS, RHO = 0.1, 0.9, 6, 0.1

RULES = {
    "sam": lambda: sharpjax.sam(RHO),
    "vasso": lambda: sharpjax.vasso(RHO, theta=0.4),
    "saner": lambda: sharpjax.saner(RHO, alpha=0.5),
    "gsam": lambda: sharpjax.gsam(RHO, alpha=0.2),
    "looksam": lambda: sharpjax.looksam(RHO, k=2),  # skips g₂ on odd steps
    "random_sam": lambda: sharpjax.random_sam(RHO, 0.5, seed=1),
}


@pytest.fixture(scope="module")
def setup():
    return tiny_mlp_params(jax.random.key(0)), toy_batches(jax.random.key(1), STEPS)


def grads_at(params, batch):
    return jax.grad(cross_entropy)(params, *batch)


def chain(name):
    return optax.chain(RULES[name](), optax.sgd(LR, momentum=MOMENTUM))


def run_grad_fn_form(tx, params, batches):
    state, out = tx.init(params), []

    @jax.jit
    def step(params, state, batch):
        g = grads_at(params, batch)
        updates, state = tx.update(g, state, params, grad_fn=lambda q: grads_at(q, batch))
        return optax.apply_updates(params, updates), state

    for batch in batches:
        params, state = step(params, state, batch)
        out.append(ravel_pytree(params)[0])
    return np.stack(out), state


def run_drop_in(tx, params, batches):
    """Each step feeds the same batch to successive calls until the step is done (two calls,
    or one on a step the policy skips); returns the params after each step and the calls."""
    state, out, calls = tx.init(params), [], []

    @jax.jit
    def call(params, state, batch):
        updates, state = tx.update(grads_at(params, batch), state, params)
        return optax.apply_updates(params, updates), state

    for batch in batches:
        n = 0
        while n == 0 or bool(state.ascended):
            params, state = call(params, state, batch)
            n += 1
        out.append(ravel_pytree(params)[0])
        calls.append(n)
    return np.stack(out), state, calls


@pytest.mark.parametrize("name", sorted(RULES))
def test_drop_in_steps_equal_the_grad_fn_form(setup, name):
    params, batches = setup
    want, want_state = run_grad_fn_form(chain(name), params, batches)
    got, state, calls = run_drop_in(sharpjax.drop_in(chain(name)), params, batches)
    # (w + ε) − ε rounds once per step in the params' precision, carried by the momentum:
    # within the drift of two float32 programs.
    np.testing.assert_allclose(got, want, rtol=0, atol=trajectory_atol(STEPS))
    took = sharpjax.diagnostics(want_state).get("second_gradient_fraction", 1.0)
    # two calls per step that takes g₂, one per skipped step
    assert sum(calls) == STEPS + round(float(took) * STEPS)
    if name == "looksam":
        assert calls == [2, 1] * (STEPS // 2)
    # The inner chain counted sharpness-aware steps, and its diagnostics are the same.
    inner = state.inner[0]
    assert int(inner.count) == STEPS
    got_diag, want_diag = sharpjax.diagnostics(state), sharpjax.diagnostics(want_state)
    assert got_diag.keys() == want_diag.keys()
    for key in ("grad_norm", "perturbation_norm", "second_grad_norm", "rho"):
        np.testing.assert_allclose(got_diag[key], want_diag[key], rtol=1e-4, err_msg=key)


def test_drop_in_with_flax_stock_train_state(setup):
    from flax.training import train_state

    params, batches = setup
    want, _ = run_grad_fn_form(chain("sam"), params, batches[:3])
    state = train_state.TrainState.create(
        apply_fn=mlp_apply, params=params, tx=sharpjax.drop_in(chain("sam"))
    )

    @jax.jit
    def train_step(state, x, y):
        def loss_fn(p):
            logits = state.apply_fn(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

    got = []
    for x, y in batches[:3]:
        state = train_step(train_step(state, x, y), x, y)  # ascent, then descent
        got.append(ravel_pytree(state.params)[0])
    np.testing.assert_allclose(np.stack(got), want, rtol=0, atol=trajectory_atol(3))
    assert int(state.step) == 6  # TrainState counts update calls: two per SAM step
    assert float(sharpjax.diagnostics(state.opt_state)["perturbation_norm"]) == pytest.approx(
        RHO, rel=1e-5
    )


def test_the_ascent_moves_the_params_by_eps(setup):
    params, batches = setup
    tx = sharpjax.drop_in(chain("sam"))
    g = grads_at(params, batches[0])
    updates, state = tx.update(g, tx.init(params), params)
    flat_g = ravel_pytree(g)[0]
    np.testing.assert_allclose(
        ravel_pytree(updates)[0], RHO * flat_g / jnp.linalg.norm(flat_g), rtol=1e-5, atol=1e-8
    )
    assert bool(state.ascended) and int(state.inner[0].count) == 0  # nothing else moved


def test_a_nonfinite_second_gradient_returns_to_w(setup):
    params, batches = setup
    tx = sharpjax.drop_in(optax.chain(sharpjax.sam(RHO), optax.sgd(LR)))
    state = tx.init(params)
    up, state = tx.update(grads_at(params, batches[0]), state, params)
    perturbed = optax.apply_updates(params, up)
    bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
    down, state = tx.update(bad, state, perturbed)
    back = optax.apply_updates(perturbed, down)
    np.testing.assert_allclose(ravel_pytree(back)[0], ravel_pytree(params)[0], atol=1e-6)
    assert float(sharpjax.diagnostics(state)["nonfinite_second_gradients"]) == 1.0


def test_bad_input_names_the_argument_and_the_fix(setup):
    params, batches = setup
    tx = sharpjax.drop_in(chain("sam"))
    g = grads_at(params, batches[0])
    with pytest.raises(TypeError, match=r"takes no `grad_fn`.*without drop_in"):
        tx.update(g, tx.init(params), params, grad_fn=lambda q: g)
    with pytest.raises(TypeError, match=r"takes no `value_and_grad_fn`"):
        tx.update(g, tx.init(params), params, value_and_grad_fn=lambda q: (0.0, g))
    plain = sharpjax.drop_in(optax.sgd(LR))
    with pytest.raises(ValueError, match="exactly one sharpjax transformation"):
        plain.update(g, plain.init(params), params)
    micro = sharpjax.drop_in(sharpjax.msam(RHO, 2))
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), g)
    with pytest.raises(ValueError, match="num_microbatches"):
        micro.update(stacked, micro.init(params), params)
