"""The core two-gradient transformation: SAM and ASAM against flat equations and optax."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from jax.flatten_util import ravel_pytree

import sharpjax
from tests.helpers import cross_entropy, flat_loss_grad, tiny_mlp_params, toy_batches

LR, MOMENTUM, STEPS = 0.1, 0.9, 12
EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7


def trajectory_atol(steps: int, lr: float = LR, momentum: float = MOMENTUM) -> float:
    """How far two float32 programs' trajectories of the tiny MLP may drift apart.

    Two programs (jit vs eager, pytree vs flat vector, another fusion or CPU) sum in other
    orders: a gradient accumulates ≲ 30 terms (16 examples, 8 + 3 units), so they differ by
    ≲ 30 eps of its scale (≲ 1). Heavy-ball carries step k's error into the params with
    weight lr (1 − μ^(k+1)) / (1 − μ) summed over the steps; ×3 for the dynamics feeding it
    back (lr ‖H‖ ≲ 0.1 per step). 12 steps: 6e-5; a wrong factor, sign or step is ≳ 1e-3.
    """
    weight = sum(lr * (1 - momentum ** (k + 1)) / (1 - momentum) for k in range(steps))
    return 3 * 30 * EPS32 * weight


def run_chain(tx, params, batches, jit=True):
    """Trains with tx; returns the flat params after every step."""
    state = tx.init(params)

    def step(params, state, batch):
        grads = jax.grad(cross_entropy)(params, *batch)
        grad_fn = lambda p: jax.grad(cross_entropy)(p, *batch)
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    trajectory = []
    for batch in batches:
        params, state = step(params, state, batch)
        trajectory.append(ravel_pytree(params)[0])
    return np.stack(trajectory), state


def flat_reference(params, batches, perturb):
    """Heavy-ball SGD on ∇L(w + ε(w, g)), written on the flat vector."""
    w, _, grad = flat_loss_grad(params)
    velocity = jnp.zeros_like(w)
    trajectory = []
    for batch in batches:
        g = grad(w, batch)
        g_sam = grad(w + perturb(w, g), batch)
        velocity = MOMENTUM * velocity + g_sam
        w = w - LR * velocity
        trajectory.append(w)
    return np.stack(trajectory)


@pytest.fixture
def setup():
    params = tiny_mlp_params(jax.random.key(0))
    batches = toy_batches(jax.random.key(1), STEPS)
    return params, batches


def test_sam_trajectory_equals_flat_equation(setup):
    params, batches = setup
    rho = 0.05
    got, _ = run_chain(optax.chain(sharpjax.sam(rho), optax.sgd(LR, MOMENTUM)), params, batches)
    want = flat_reference(params, batches, lambda w, g: rho * g / jnp.linalg.norm(g))
    np.testing.assert_allclose(got, want, rtol=0, atol=trajectory_atol(STEPS))


def test_asam_trajectory_equals_flat_equation(setup):
    params, batches = setup
    rho, eta = 0.5, 0.01

    def perturb(w, g):
        t = jnp.abs(w) + eta
        return rho * t**2 * g / jnp.linalg.norm(t * g)

    tx = optax.chain(sharpjax.asam(rho, eta=eta), optax.sgd(LR, MOMENTUM))
    got, _ = run_chain(tx, params, batches)
    want = flat_reference(params, batches, perturb)
    np.testing.assert_allclose(got, want, rtol=0, atol=trajectory_atol(STEPS))


def test_sam_matches_optax_contrib_opaque_sam(setup):
    params, batches = setup
    rho = 0.05
    ours = optax.chain(sharpjax.sam(rho), optax.sgd(LR, MOMENTUM))
    theirs = optax.contrib.sam(
        optax.sgd(LR, MOMENTUM),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        opaque_mode=True,
    )
    got, _ = run_chain(ours, params, batches)

    state = theirs.init(params)
    want = []
    for x, y in batches:
        grads = jax.grad(cross_entropy)(params, x, y)
        grad_fn = lambda p, _, x=x, y=y: jax.grad(cross_entropy)(p, x, y)
        updates, state = theirs.update(grads, state, params, grad_fn=grad_fn)
        params = optax.apply_updates(params, updates)
        want.append(ravel_pytree(params)[0])
    np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=trajectory_atol(STEPS))


def test_rho_zero_is_exactly_the_base_optimizer(setup):
    params, batches = setup
    tx = optax.chain(sharpjax.sam(0.0), optax.sgd(LR, MOMENTUM))
    got, _ = run_chain(tx, params, batches[:4], jit=False)
    base = optax.sgd(LR, MOMENTUM)
    state, want = base.init(params), []
    for batch in batches[:4]:
        updates, state = base.update(jax.grad(cross_entropy)(params, *batch), state, params)
        params = optax.apply_updates(params, updates)
        want.append(ravel_pytree(params)[0])
    # w + 0·ε = w, so the arithmetic is the base optimizer's; but SAM's update is its own
    # program (its ops may be fused or jitted inside), so only rounding-equal, not bitwise.
    np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=trajectory_atol(4))


def test_grad_fn_called_once_per_step(setup):
    params, batches = setup
    tx = optax.chain(sharpjax.sam(0.05), optax.sgd(LR))
    state = tx.init(params)
    calls = []

    def grad_fn(p):
        calls.append(1)
        return jax.grad(cross_entropy)(p, *batches[0])

    for step in range(3):
        grads = jax.grad(cross_entropy)(params, *batches[0])
        _, state = tx.update(grads, state, params, grad_fn=grad_fn)
        assert len(calls) == step + 1


def test_rho_schedule_uses_the_step_count(setup):
    params, batches = setup
    schedule = optax.linear_schedule(0.0, 0.3, 5)
    _, state = run_chain(optax.chain(sharpjax.sam(schedule), optax.sgd(LR)), params, batches[:3])
    diag = sharpjax.diagnostics(state)
    # the third step (count 2) used rho = schedule(2), and ‖ε‖ = rho
    np.testing.assert_allclose(diag["rho"], 0.12, rtol=1e-6)
    np.testing.assert_allclose(diag["perturbation_norm"], 0.12, rtol=1e-5)


def test_diagnostics_equal_their_definitions(setup):
    params, batches = setup
    rho = 0.05
    sam = sharpjax.sam(rho, cosine=True)
    tx = optax.chain(sam, optax.inject_hyperparams(optax.sgd)(learning_rate=LR))
    _, state = run_chain(tx, params, batches[:1])
    w, _, grad = flat_loss_grad(params)
    g = grad(w, batches[0])
    g2 = grad(w + rho * g / jnp.linalg.norm(g), batches[0])
    diag = sharpjax.diagnostics(state)
    np.testing.assert_allclose(diag["grad_norm"], jnp.linalg.norm(g), rtol=1e-5)
    np.testing.assert_allclose(diag["second_grad_norm"], jnp.linalg.norm(g2), rtol=1e-5)
    cosine = g @ g2 / (jnp.linalg.norm(g) * jnp.linalg.norm(g2))
    np.testing.assert_allclose(diag["cosine"], cosine, rtol=1e-5)
    np.testing.assert_allclose(diag["perturbation_norm"], rho, rtol=1e-5)


@pytest.mark.parametrize("make", [sharpjax.sam, sharpjax.asam, sharpjax.vasso, sharpjax.saner])
def test_zero_gradient_gives_zero_perturbation_and_finite_updates(make):
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = optax.chain(make() if make is sharpjax.saner else make(cosine=True), optax.sgd(LR))
    updates, state = tx.update(zeros, tx.init(params), params, grad_fn=lambda p: zeros)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    diag = sharpjax.diagnostics(state)
    assert diag["perturbation_norm"] == 0
    # the loss diagnostics are NaN ("not measured") without loss= and value_and_grad_fn=
    unmeasured = {"loss", "perturbed_loss", "sharpness"}
    assert all(bool(jnp.isnan(diag[k])) for k in unmeasured)
    assert all(bool(jnp.isfinite(v)) for k, v in diag.items() if k not in unmeasured)


def test_bfloat16_params_keep_their_dtype(setup):
    params, batches = setup
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    x, y = batches[0]
    loss = lambda p: cross_entropy(p, x.astype(jnp.bfloat16), y).astype(jnp.float32)
    tx = optax.chain(sharpjax.sam(0.05), optax.sgd(LR))
    update = jax.jit(functools.partial(tx.update, grad_fn=jax.grad(loss)))
    updates, _ = update(jax.grad(loss)(params), tx.init(params), params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert all(bool(jnp.all(jnp.isfinite(u.astype(jnp.float32)))) for u in jax.tree.leaves(updates))


# ---------------------------------------------------------------------------------------
# BatchNorm: the clean pass's statistics are kept, the perturbed pass's are dropped.
# ---------------------------------------------------------------------------------------


class TinyBNCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_batchnorm_cnn_trains_on_digits_with_clean_pass_statistics():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = jnp.asarray(digits.images[:256, :, :, None] / 16.0, jnp.float32)
    y = jnp.asarray(digits.target[:256], jnp.int32)
    model = TinyBNCNN()
    variables = model.init(jax.random.key(0), x[:2])
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.chain(sharpjax.sam(0.05), optax.sgd(0.1, momentum=0.9))
    opt_state = tx.init(params)

    def loss_fn(params, batch_stats):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state):
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        grad_fn = lambda p: jax.grad(loss_fn, has_aux=True)(p, batch_stats)[0]
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    losses = []
    for _ in range(8):
        before = (params, batch_stats)
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
        losses.append(float(loss))
        # Independent check: the statistics of the clean pass, computed by hand from the
        # conv activations at the pre-step params.
        conv = nn.Conv(8, (3, 3)).apply({"params": before[0]["Conv_0"]}, x)
        mean = conv.mean(axis=(0, 1, 2))
        want = 0.9 * before[1]["BatchNorm_0"]["mean"] + 0.1 * mean
        np.testing.assert_allclose(batch_stats["BatchNorm_0"]["mean"], want, rtol=1e-4, atol=1e-5)
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------


def test_negative_rho_and_eta_raise():
    with pytest.raises(ValueError, match="rho"):
        sharpjax.sam(-0.1)
    with pytest.raises(ValueError, match="eta"):
        sharpjax.asam(0.5, eta=-0.01)
    with pytest.raises(TypeError, match="rho"):
        sharpjax.sam("big")


def test_missing_grad_fn_shows_the_call_pattern(setup):
    params, _ = setup
    tx = optax.chain(sharpjax.sam(0.05), optax.sgd(LR))
    with pytest.raises(TypeError, match=r"grad_fn=grad_fn"):
        tx.update(params, tx.init(params), params)


def test_grad_fn_with_other_structure_raises(setup):
    params, batches = setup
    tx = optax.chain(sharpjax.sam(0.05), optax.sgd(LR))
    grads = jax.grad(cross_entropy)(params, *batches[0])
    value_and_grad = lambda p: jax.value_and_grad(cross_entropy)(p, *batches[0])
    with pytest.raises(ValueError, match="structure of the params"):
        tx.update(grads, tx.init(params), params, grad_fn=value_and_grad)
    wrong_shape = lambda p: jax.tree.map(lambda x: x[..., :1], p)
    with pytest.raises(ValueError, match="shape"):
        tx.update(grads, tx.init(params), params, grad_fn=wrong_shape)


def test_unknown_perturbation_mode_and_lonely_group_size_raise():
    with pytest.raises(ValueError, match="perturbation_mode"):
        sharpjax.sam(0.05, axis_name="batch", perturbation_mode="sometimes")
    with pytest.raises(ValueError, match="group_size"):
        sharpjax.sam(0.05, axis_name="batch", perturbation_mode="grouped")
    with pytest.raises(ValueError, match="axis_name"):
        sharpjax.sam(0.05, perturbation_mode="synced")


# ---------------------------------------------------------------------------------------
# The pieces of the update, each called alone against its equation written plainly.
# ---------------------------------------------------------------------------------------


def test_decide_averages_the_microbatch_squared_norms_and_obeys_a_plan():
    from sharpjax.core import SecondGradientPolicy, _decide

    seen = []

    def decide(sq, state, count):
        seen.append(sq)
        return sq > 10.0, state + 1, {"sq": sq}

    policy = SecondGradientPolicy(lambda p: 0, decide)
    # three micro-batch gradients of one leaf with ‖g_j‖² = 1, 4, 25: the mean is 10
    g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])}
    take, state, diag = _decide(policy, g, 0, jnp.int32(0), micro=True)
    assert float(diag["sq"]) == 10.0 and not bool(take) and state == 1
    take, _, _ = _decide(policy, {"w": jnp.array([3.0, 4.0])}, 0, jnp.int32(0))
    assert bool(take)  # ‖g‖² = 25 on one batch
    take, state, _ = _decide(policy, g, 0, jnp.int32(0), micro=True, planned=True)
    assert bool(take) and state == 1  # the plan decides; the policy still moves its state
    take, state, diag = _decide(None, g, (), jnp.int32(0))
    assert bool(take) and state == () and diag == {}


@pytest.mark.parametrize("form", ["_single", "_vmapped", "_scanned"])
def test_execution_forms_equal_the_mean_of_the_microbatch_equations(form):
    """Quadratic losses L_j(w) = ½ Σ a_j w², so g₂ = a_j (w + ρ g_j/‖g_j‖) exactly."""
    from sharpjax import core

    m, rho = 3, 0.1
    w = jnp.array([1.0, -2.0, 0.5])
    a = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.5, 4.0], [2.0, 1.0, 1.0]])
    micro = form != "_single"
    setup = core._Setup(
        sharpjax.sam_perturbation(),
        core.use_second_gradient(),
        num_microbatches=m if micro else None,
        measure_cosine=True,
    )
    if micro:
        second_pass = lambda p, j: (None, a[j] * p)
        g = a * w
        p_state, c_state = (
            jax.vmap(lambda _: ())(jnp.arange(m)),
            jax.vmap(lambda _: ())(jnp.arange(m)),
        )
    else:
        second_pass = lambda p: (None, a[0] * p)
        g, p_state, c_state = a[0] * w, (), ()
    previous = core._initial_diagnostics(setup.diagnostic_names)
    step = core._Step(setup, w, jnp.int32(0), jnp.float32(rho), second_pass, previous)
    out, _, _, diag, finite = getattr(core, form)(step, g, p_state, c_state)

    rows = range(m) if micro else range(1)
    g2s = [a[j] * (w + rho * a[j] * w / jnp.linalg.norm(a[j] * w)) for j in rows]
    np.testing.assert_allclose(out, sum(g2s) / len(g2s), rtol=1e-6)
    want_g2_norm = np.mean([np.linalg.norm(x) for x in g2s])
    want_grad_norm = np.mean([np.linalg.norm(a[j] * w) for j in rows])
    want_cos = np.mean(
        [
            (a[j] * w) @ g2s[i] / np.linalg.norm(a[j] * w) / np.linalg.norm(g2s[i])
            for i, j in enumerate(rows)
        ]
    )
    np.testing.assert_allclose(diag["second_grad_norm"], want_g2_norm, rtol=1e-6)
    np.testing.assert_allclose(diag["grad_norm"], want_grad_norm, rtol=1e-6)
    np.testing.assert_allclose(diag["perturbation_norm"], rho, rtol=1e-6)
    np.testing.assert_allclose(diag["cosine"], want_cos, rtol=1e-6)
    assert bool(jnp.all(finite))


def test_guard_zeroes_a_bad_second_gradient_and_passes_a_bad_clean_one_on():
    from sharpjax.core import SharpnessAwareState, _guard

    def state(value):
        return SharpnessAwareState(jnp.int32(value), jnp.float32(value), (), {"d": value})

    old, new = state(0), state(1)
    out = {"w": jnp.array([1.0, jnp.nan])}
    for clean, second in [(True, True), (True, False), (False, True), (False, False)]:
        got_out, got = _guard(jnp.array([clean, second]), out, new, old)
        ok = clean and second
        # the state moves only on a finite step; the diagnostics always show the step
        assert int(got.count) == int(ok) and float(got.perturbation_state) == float(ok)
        assert got.diagnostics == {"d": 1}
        if clean and not second:  # apply_if_finite cannot see a bad g₂: zeros, selected
            np.testing.assert_array_equal(got_out["w"], [0.0, 0.0])
        else:  # passed on as it came (a bad clean g is apply_if_finite's to see)
            np.testing.assert_array_equal(got_out["w"], out["w"])
