"""Efficient variants (LookSAM, RST, AE-SAM, ESAM, Momentum-SAM) against flat equations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sharpjax
from sharpjax import efficient
from tests.helpers import flat_loss_grad, mlp_apply, tiny_mlp_params, toy_batches

LR, MOMENTUM, STEPS, RHO = 0.1, 0.9, 9, 0.1
# float32 trajectories of a few steps of differently ordered sums: ~1e-6 relative per op.
TOL = {"rtol": 2e-5, "atol": 2e-6}


def example_losses(params, x, y):
    logits = mlp_apply(params, x)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def mean_loss(params, x, y):
    return jnp.mean(example_losses(params, x, y))


@pytest.fixture(scope="module")
def setup():
    params = tiny_mlp_params(jax.random.key(0))
    batches = toy_batches(jax.random.key(1), STEPS)
    return params, batches


def make_step(tx, *, with_examples=False, counter=None, second_gradient=None):
    """The unjitted step ``(params, state, batch) -> (params, state)`` of the chained ``tx``:
    the clean gradient, then ``tx.update`` with ``grad_fn`` (``example_loss_fn`` with
    ``with_examples``; ``second_gradient`` passed on when given). ``counter`` gets one entry
    per ``grad_fn`` call, through a host callback."""
    planned = {} if second_gradient is None else {"second_gradient": second_gradient}

    def step(params, state, batch):
        x, y = batch
        grads = jax.grad(mean_loss)(params, x, y)

        def grad_fn(p):
            if counter is not None:
                jax.debug.callback(lambda: counter.append(1))
            return jax.grad(mean_loss)(p, x, y)

        extra = {"grad_fn": grad_fn}
        if with_examples:

            def example_loss_fn(p, indices=None):
                if indices is None:
                    return example_losses(p, x, y)
                return example_losses(p, x[indices], y[indices])

            extra = {"example_loss_fn": example_loss_fn}
        updates, state = tx.update(grads, state, params, **extra, **planned)
        return optax.apply_updates(params, updates), state

    return step


def run(tx, params, batches, *, jit=True, with_examples=False, counter=None):
    """Trains with tx chained before heavy-ball SGD; returns flat params and diagnostics."""
    tx = optax.chain(tx, optax.sgd(LR, momentum=MOMENTUM))
    state = tx.init(params)
    step = make_step(tx, with_examples=with_examples, counter=counter)
    step = jax.jit(step) if jit else step
    trajectory, diags = [], []
    for batch in batches:
        params, state = step(params, state, batch)
        trajectory.append(ravel_pytree(params)[0])
        diags.append({k: float(v) for k, v in sharpjax.diagnostics(state).items()})
    return np.stack(trajectory), diags


def flat_run(params, batches, direction):
    """Heavy-ball SGD on ``direction(w, g, grad_at, step)``, on the flat parameter vector."""
    w, _, grad = flat_loss_grad(params)
    velocity, trajectory = jnp.zeros_like(w), []
    for step, batch in enumerate(batches):
        g = grad(w, batch)
        out = direction(w, g, lambda point, b=batch: grad(point, b), step)
        velocity = MOMENTUM * velocity + out
        w = w - LR * velocity
        trajectory.append(w)
    return np.stack(trajectory)


def sam_gradient(w, g, grad_at):
    return grad_at(w + RHO * g / jnp.linalg.norm(g))


def saner(g, g2, alpha=0.5):
    ratio = g2 / (g + 1e-8)
    mask = (ratio > 0) & (ratio < 1)
    return g2 * jnp.where(mask, alpha, 1.0)


# --------------------------------------------------------------------------------------
# LookSAM.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["sam", "saner"])
def test_looksam_equals_its_equation(setup, inner):
    params, batches = setup
    k, alpha = 3, 0.7
    memory = {}

    def direction(w, g, grad_at, step):
        if step % k == 0:
            g_s = sam_gradient(w, g, grad_at)
            g_s = saner(g, g_s) if inner == "saner" else g_s
            memory["g_v"] = g_s - (g_s @ g) / (g @ g) * g
            return g_s
        g_v = memory["g_v"]
        return g + alpha * jnp.linalg.norm(g) / jnp.linalg.norm(g_v) * g_v

    inner_rule = sharpjax.saner_combination(0.5) if inner == "saner" else None
    got, diags = run(efficient.looksam(RHO, k, alpha, inner=inner_rule), params, batches)
    np.testing.assert_allclose(got, flat_run(params, batches, direction), **TOL)
    assert [d["second_gradient"] for d in diags] == [float(s % k == 0) for s in range(STEPS)]
    assert diags[-1]["second_gradient_fraction"] == pytest.approx(3 / STEPS)


def test_looksam_with_k_1_is_sam(setup):
    params, batches = setup
    got, _ = run(efficient.looksam(RHO, 1, 0.7), params, batches)
    want, _ = run(sharpjax.sam(RHO), params, batches)
    np.testing.assert_allclose(got, want, **TOL)


# --------------------------------------------------------------------------------------
# RST.
# --------------------------------------------------------------------------------------


def test_random_sam_follows_its_decisions(setup):
    """On each step the update is SAM's when the reported decision took g₂, else SGD's."""
    params, batches = setup
    got, diags = run(efficient.random_sam(RHO, 0.5, seed=3), params, batches)
    took = [d["second_gradient"] == 1.0 for d in diags]
    assert 0 < sum(took) < STEPS, "seed 3 must mix both kinds of step for this test to bite"

    def direction(w, g, grad_at, step):
        return sam_gradient(w, g, grad_at) if took[step] else g

    np.testing.assert_allclose(got, flat_run(params, batches, direction), **TOL)


def test_random_policy_takes_about_p_of_the_steps():
    """Bernoulli(p) draws: the count over n steps lies within 5 standard deviations."""
    n = 2000
    for p in (0.1, 0.5, 0.8):
        policy = efficient.random_policy(p, seed=0)

        def body(state, count, policy=policy):
            take, state, _ = policy.decide(jnp.float32(1.0), state, count)
            return state, take

        _, takes = jax.lax.scan(body, policy.init(None), jnp.arange(n))
        assert abs(int(takes.sum()) - n * p) < 5 * math.sqrt(n * p * (1 - p)), p


def test_random_sam_reductions(setup):
    params, batches = setup
    sam, _ = run(sharpjax.sam(RHO), params, batches)
    always, diags = run(efficient.random_sam(RHO, 1.0), params, batches)
    np.testing.assert_allclose(always, sam, **TOL)
    assert diags[-1]["second_gradient_fraction"] == 1.0
    never, diags = run(efficient.random_sam(RHO, 0.0), params, batches)
    base, _ = run(optax.identity(), params, batches)
    np.testing.assert_allclose(never, base, **TOL)
    assert diags[-1]["second_gradient_fraction"] == 0.0


def test_saner_on_rst_equals_its_equation(setup):
    params, batches = setup
    tx = efficient.random_sam(RHO, 0.5, seed=3, combination=sharpjax.saner_combination(0.5))
    got, diags = run(tx, params, batches)
    took = [d["second_gradient"] == 1.0 for d in diags]
    assert 0 < sum(took) < STEPS

    def direction(w, g, grad_at, step):
        return saner(g, sam_gradient(w, g, grad_at)) if took[step] else g

    np.testing.assert_allclose(got, flat_run(params, batches, direction), **TOL)


def test_grst_schedule_grows_linearly():
    schedule = efficient.grst_schedule(100, 0.2, 1.0)
    assert float(schedule(0)) == pytest.approx(0.2)
    assert float(schedule(50)) == pytest.approx(0.6)
    assert float(schedule(200)) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------
# AE-SAM.
# --------------------------------------------------------------------------------------


def test_ae_sam_equals_its_equation(setup):
    params, batches = setup
    c, delta = 0.3, 0.6
    stats = {}

    def direction(w, g, grad_at, step):
        x = float(g @ g)
        if step == 0:
            mean, var = x, 0.0
        else:
            mean = delta * stats["mean"] + (1 - delta) * x
            var = delta * stats["var"] + (1 - delta) * (x - mean) ** 2
        stats.update(mean=mean, var=var)
        threshold = mean + c * math.sqrt(var)
        # A near-tie could flip with rounding; this fixture has none (else change the seed).
        assert step == 0 or abs(x - threshold) > 1e-4 * x
        stats.setdefault("took", []).append(x >= threshold)
        return sam_gradient(w, g, grad_at) if x >= threshold else g

    want = flat_run(params, batches, direction)
    got, diags = run(efficient.ae_sam(RHO, c, delta=delta), params, batches)
    assert [d["second_gradient"] == 1.0 for d in diags] == stats["took"]
    assert 1 < sum(stats["took"]) < STEPS
    np.testing.assert_allclose(got, want, **TOL)


def test_ae_sam_reductions(setup):
    params, batches = setup
    sam, _ = run(sharpjax.sam(RHO), params, batches)
    got, _ = run(efficient.ae_sam(RHO, -math.inf), params, batches)
    np.testing.assert_allclose(got, sam, **TOL)
    base, _ = run(optax.identity(), params, batches)
    got, diags = run(efficient.ae_sam(RHO, math.inf), params, batches)
    np.testing.assert_allclose(got, base, **TOL)
    assert diags[-1]["second_gradient_fraction"] == 0.0


def test_ae_sam_threshold_targets_the_fraction():
    """For normal ‖g‖², the threshold c₀ = Φ⁻¹(1 − r) admits a fraction r; the schedule runs
    from c₀ + spread to c₀ − spread."""
    c0 = efficient.ae_sam_threshold(0.3)
    draws = np.random.default_rng(0).standard_normal(200_000)
    assert np.mean(draws >= c0) == pytest.approx(0.3, abs=0.005)
    schedule = efficient.ae_sam_threshold(0.5, total_steps=100)
    assert float(schedule(0)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(-1.0)


def test_adaptive_policy_statistics_by_hand():
    """AE-SAM's μ, σ², z-score and decision against values worked out by hand, at δ = 0.8
    (so δ and 1 − δ differ) and on a spread where σ and σ² differ (c σ < x − μ < c σ²)."""
    delta, c = 0.8, 1.5
    policy = efficient.adaptive_policy(c, delta)
    xs = [1.0, 6.0, 2.0, 12.0]
    # μ_t = 0.8 μ_{t−1} + 0.2 x_t,  σ²_t = 0.8 σ²_{t−1} + 0.2 (x_t − μ_t)²,  μ_0 = x_0, σ_0 = 0
    means = [1.0, 0.8 * 1 + 0.2 * 6, 0.8 * 2 + 0.2 * 2, 0.8 * 2 + 0.2 * 12]  # 1, 2, 2, 4
    variances = [0.0, 0.2 * 4**2, 0.8 * 3.2, 0.8 * 2.56 + 0.2 * 8**2]  # 0, 3.2, 2.56, 14.848
    zscores = [0.0, 4 / math.sqrt(3.2), 0.0, 8 / math.sqrt(14.848)]  # (x − μ)/σ
    # x ≥ μ + 1.5 σ: 1 ≥ 1; 6 ≥ 2 + 2.68 (not ≥ 2 + 1.5·3.2); 2 < 2 + 2.4; 12 ≥ 4 + 5.78
    takes = [True, True, False, True]
    state = policy.init(None)
    for t, x in enumerate(xs):
        take, state, diag = policy.decide(jnp.float32(x), state, jnp.int32(t))
        assert bool(take) == takes[t], t
        np.testing.assert_allclose(float(state.state.mean), means[t], rtol=1e-6)
        np.testing.assert_allclose(float(state.state.var), variances[t], rtol=1e-6)
        np.testing.assert_allclose(float(diag["grad_sq_zscore"]), zscores[t], rtol=1e-5)
        assert float(diag["threshold"]) == c


def test_adaptive_policy_admits_about_the_target_fraction():
    """On i.i.d. normal ‖g‖², the EMA policy takes SAM on roughly the targeted fraction."""
    policy = efficient.adaptive_policy(efficient.ae_sam_threshold(0.3), delta=0.99)
    xs = 10.0 + jax.random.normal(jax.random.key(0), (4000,))

    def body(state, x):
        take, state, _ = policy.decide(x, state, jnp.int32(0))
        return state, take

    _, takes = jax.lax.scan(body, policy.init(None), xs)
    # The EMA's own noise widens the spread; 0.3 ± 0.05 holds with a wide margin.
    assert float(jnp.mean(takes[500:])) == pytest.approx(0.3, abs=0.05)


# --------------------------------------------------------------------------------------
# ESAM.
# --------------------------------------------------------------------------------------


def test_esam_with_beta_gamma_1_is_sam(setup):
    params, batches = setup
    sam, _ = run(sharpjax.sam(RHO), params, batches)
    got, _ = run(efficient.esam(RHO, 1.0, 1.0), params, batches)
    np.testing.assert_allclose(got, sam, **TOL)
    got, diags = run(efficient.esam(RHO, 1.0, 1.0), params, batches, with_examples=True)
    np.testing.assert_allclose(got, sam, **TOL)
    assert np.isfinite(diags[-1]["perturbed_loss"])


def test_esam_data_selection_equals_its_equation(setup):
    params, batches = setup
    gamma = 0.4
    _, unravel, _ = flat_loss_grad(params)
    selected = math.ceil(gamma * batches[0][0].shape[0])

    def direction(w, g, grad_at, step):
        x, y = batches[step]
        eps = RHO * g / jnp.linalg.norm(g)
        rise = example_losses(unravel(w + eps), x, y) - example_losses(unravel(w), x, y)
        order = np.argsort(-np.asarray(rise))
        gap = float(rise[order[selected - 1]] - rise[order[selected]])
        assert gap > 1e-5, "a near-tie at the cut could flip; change the fixture"
        rows = order[:selected]
        grads = jax.grad(mean_loss)(unravel(w + eps), x[rows], y[rows])
        return ravel_pytree(grads)[0]

    got, _ = run(efficient.esam(RHO, 1.0, gamma), params, batches, with_examples=True)
    np.testing.assert_allclose(got, flat_run(params, batches, direction), **TOL)


def test_esam_backward_pass_sees_only_the_selected_rows(setup):
    params, batches = setup
    seen = []
    x, y = batches[0]

    def example_loss_fn(p, indices=None):
        if indices is None:
            return example_losses(p, x, y)
        seen.append(indices.shape)
        return example_losses(p, x[indices], y[indices])

    tx = efficient.esam(RHO, 0.5, 0.25)
    grads = jax.grad(mean_loss)(params, x, y)
    tx.update(grads, tx.init(params), params, example_loss_fn=example_loss_fn)
    assert seen == [(math.ceil(0.25 * x.shape[0]),)]


def test_stochastic_perturbation_masks_and_rescales(setup):
    params, batches = setup
    beta = 0.5
    rule = efficient.stochastic_perturbation(beta, seed=1)
    g = jax.grad(mean_loss)(params, *batches[0])
    flat_g = ravel_pytree(g)[0]
    full = RHO * flat_g / jnp.linalg.norm(flat_g) / beta
    state, kept = rule.init(params), []
    for _ in range(20):
        eps, state, _ = rule.perturb(g, params, state, jnp.float32(RHO))
        eps = np.asarray(ravel_pytree(eps)[0])
        on = eps != 0
        # Each element is either dropped or SAM's, scaled by 1/β.
        # two programs' norms of ~75 squares: a few eps apart
        np.testing.assert_allclose(eps[on], np.asarray(full)[on], rtol=1e-5)
        kept.append(on.mean())
    n = flat_g.size * 20
    assert abs(np.mean(kept) - beta) < 5 * math.sqrt(beta * (1 - beta) / n)


# --------------------------------------------------------------------------------------
# Momentum-SAM.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedules", [False, True])
def test_momentum_sam_equals_its_equation(setup, schedules):
    """With constants, and with ρ_t and μ_t schedules (the true weights then need ρ_{t+1},
    which momentum_sam_weights reads from the state)."""
    params, batches = setup
    rho_t = (lambda t: 0.1 + 0.05 * t) if schedules else (lambda t: 0.2)
    mu_t = (lambda t: 0.5 + 0.05 * t) if schedules else (lambda t: MOMENTUM)
    w, _, grad = flat_loss_grad(params)
    v = jnp.zeros_like(w)
    if schedules:
        tx = efficient.momentum_sam(
            LR, optax.linear_schedule(0.5, 1.0, 10), optax.linear_schedule(0.1, 0.6, 10)
        )
    else:
        tx = efficient.momentum_sam(LR, MOMENTUM, 0.2)
    held, state = params, tx.init(params)
    for t, batch in enumerate(batches):
        v_hat = v / jnp.linalg.norm(v) if float(jnp.linalg.norm(v)) > 0 else v
        g = grad(w - rho_t(t) * v_hat, batch)
        v = mu_t(t) * v + g
        w = w - LR * v
        # The loop holds the perturbed weights and takes its one gradient there.
        updates, state = tx.update(jax.grad(mean_loss)(held, *batch), state, held)
        held = optax.apply_updates(held, updates)
        np.testing.assert_allclose(
            ravel_pytree(held)[0], w - rho_t(t + 1) * v / jnp.linalg.norm(v), **TOL
        )
        true = efficient.momentum_sam_weights(held, state)
        np.testing.assert_allclose(ravel_pytree(true)[0], w, **TOL)
        assert float(sharpjax.diagnostics(state)["momentum"]) == pytest.approx(mu_t(t))


def test_momentum_sam_clamps_an_injected_momentum(setup):
    """μ = 1.5 injected at run time is used as 1 (its range's end) and reported so."""
    params, batches = setup
    tx = optax.inject_hyperparams(efficient.momentum_sam)(learning_rate=LR, momentum=0.5, rho=0.0)
    state = tx.init(params)
    state.hyperparams["momentum"] = jnp.asarray(1.5)
    g = jax.grad(mean_loss)(params, *batches[0])
    step = jax.jit(lambda s: tx.update(g, s, params))
    _, state = step(state)
    updates, state = step(state)
    # ρ = 0: heavy ball, v₁ = g, v₂ = μ v₁ + g = 2g at μ = 1; the update is −η v₂.
    want = jax.tree.map(lambda x: -LR * 2.0 * x, g)
    np.testing.assert_allclose(ravel_pytree(updates)[0], ravel_pytree(want)[0], **TOL)
    assert float(sharpjax.diagnostics(state)["momentum"]) == 1.0


def test_momentum_sam_with_rho_0_is_heavy_ball(setup):
    params, batches = setup
    tx = efficient.momentum_sam(LR, MOMENTUM, 0.0)
    state, p, traj = tx.init(params), params, []
    sgd = optax.sgd(LR, momentum=MOMENTUM)
    s_state, q, want = sgd.init(params), params, []
    for batch in batches:
        u, state = tx.update(jax.grad(mean_loss)(p, *batch), state, p)
        p = optax.apply_updates(p, u)
        traj.append(ravel_pytree(p)[0])
        u, s_state = sgd.update(jax.grad(mean_loss)(q, *batch), s_state, q)
        q = optax.apply_updates(q, u)
        want.append(ravel_pytree(q)[0])
    np.testing.assert_allclose(np.stack(traj), np.stack(want), **TOL)


# --------------------------------------------------------------------------------------
# The skip really skips; composition; bad input.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "calls"),
    [
        (lambda: efficient.looksam(RHO, 3), 3),
        (lambda: efficient.random_sam(RHO, 0.0), 0),
        (lambda: efficient.random_sam(RHO, 1.0), STEPS),
        (lambda: efficient.ae_sam(RHO, math.inf), 0),
    ],
)
def test_skipped_steps_never_call_grad_fn(setup, make, calls):
    params, batches = setup
    counter = []
    run(make(), params, batches, counter=counter)
    jax.effects_barrier()
    assert len(counter) == calls


def test_diagnostics_report_fraction_and_policy_values(setup):
    params, batches = setup
    _, diags = run(efficient.random_sam(RHO, efficient.grst_schedule(STEPS)), params, batches)
    took = np.cumsum([d["second_gradient"] for d in diags])
    np.testing.assert_allclose(
        [d["second_gradient_fraction"] for d in diags], took / np.arange(1, STEPS + 1), rtol=1e-6
    )
    assert diags[0]["probability"] == 0.0
    assert diags[-1]["probability"] == pytest.approx((STEPS - 1) / STEPS)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: efficient.looksam(k=0), "k must be an int >= 1"),
        (lambda: efficient.random_sam(probability=1.5), "probability must"),
        (lambda: efficient.random_sam(seed=1.5), "seed must be a Python int"),
        (lambda: efficient.ae_sam(target_fraction=1.0), "target_fraction must be < 1"),
        (lambda: efficient.ae_sam(delta=2.0), "delta must"),
        (lambda: efficient.esam(beta=0.0), "beta must"),
        (lambda: efficient.esam(gamma=1.5), "gamma must"),
        (lambda: efficient.momentum_sam(0.1, momentum=-0.1), "momentum must"),
        (lambda: efficient.esam(beta=optax.linear_schedule(0.5, 1.0, 9)), "beta must be a nu"),
        (lambda: efficient.esam(gamma=optax.linear_schedule(0.5, 1.0, 9)), "gamma must be a"),
        (lambda: efficient.grst_schedule(0), "total_steps must"),
    ],
)
def test_bad_input_raises(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_esam_refuses_grad_fn_beside_example_loss_fn(setup, gamma):
    params, batches = setup
    x, y = batches[0]
    tx = efficient.esam(RHO, 1.0, gamma)
    g = jax.grad(mean_loss)(params, x, y)
    example_loss_fn = lambda p, indices=None: example_losses(p, x, y)
    with pytest.raises(TypeError, match="both example_loss_fn and grad_fn"):
        tx.update(g, tx.init(params), params, example_loss_fn=example_loss_fn, grad_fn=lambda p: g)


def test_esam_example_loss_fn_without_indices_says_how(setup):
    params, batches = setup
    x, y = batches[0]
    tx = efficient.esam(RHO, 1.0, 0.5)
    g = jax.grad(mean_loss)(params, x, y)
    with pytest.raises(TypeError, match=r"example_loss_fn\(p\) cannot be called with 2 .*indices"):
        tx.update(g, tx.init(params), params, example_loss_fn=lambda p: example_losses(p, x, y))


def test_esam_without_example_losses_says_how(setup):
    params, batches = setup
    tx = efficient.esam(RHO, 1.0, 0.5)
    g = jax.grad(mean_loss)(params, *batches[0])
    with pytest.raises(TypeError, match="example_loss_fn"):
        tx.update(g, tx.init(params), params, grad_fn=lambda p: g)
    with pytest.raises(ValueError, match="exactly one momentum_sam"):
        efficient.momentum_sam_weights(params, tx.init(params))


@pytest.mark.parametrize(
    "make",
    [
        lambda: efficient.looksam(RHO),
        lambda: efficient.random_sam(RHO),
        lambda: efficient.ae_sam(RHO),
        lambda: efficient.esam(RHO),
        lambda: efficient.momentum_sam(LR),
    ],
)
def test_fresh_states_can_be_donated(setup, make):
    """No buffer appears twice in a fresh state (a jitted step donating it would fail)."""
    params, _ = setup
    state = make().init(params)
    jax.block_until_ready(jax.jit(lambda s: s, donate_argnums=0)(state))


# --------------------------------------------------------------------------------------
# Deciding ahead: two programs chosen on the host equal the lax.cond step.
# --------------------------------------------------------------------------------------


def run_planned(tx, params, batches, counter=None):
    """As :func:`run`, with ``planned_step``: the decision is read before each step."""
    tx = optax.chain(tx, optax.sgd(LR, momentum=MOMENTUM))
    state = tx.init(params)
    built = []

    def build(second_gradient):
        built.append(second_gradient)
        return jax.jit(make_step(tx, counter=counter, second_gradient=second_gradient))

    step = efficient.planned_step(build, lambda params, state, batch: state)
    trajectory, plans, diags = [], [], []
    for batch in batches:
        plans.append(bool(efficient.plan_second_gradient(state)))
        params, state = step(params, state, batch)
        trajectory.append(ravel_pytree(params)[0])
        diags.append({k: float(v) for k, v in sharpjax.diagnostics(state).items()})
    return np.stack(trajectory), plans, diags, built


@pytest.mark.parametrize(
    "make",
    [
        lambda: efficient.looksam(RHO, 3),
        lambda: efficient.random_sam(RHO, 0.5, seed=7),
        lambda: efficient.random_sam(RHO, efficient.grst_schedule(STEPS)),
        lambda: efficient.random_sam(RHO, 0.5, combination=sharpjax.saner_combination(0.5)),
    ],
)
def test_planned_step_equals_the_in_step_decision(setup, make):
    params, batches = setup
    want, want_diags = run(make(), params, batches)
    counter = []
    got, plans, diags, built = run_planned(make(), params, batches, counter)
    jax.effects_barrier()
    took = [bool(d["second_gradient"]) for d in want_diags]
    # The decision read before each step is the one the policy takes in the lax.cond step.
    assert plans == took
    assert [bool(d["second_gradient"]) for d in diags] == took
    assert len(counter) == sum(took)  # a skipped step never calls grad_fn
    assert set(built) == set(took) and None not in built
    np.testing.assert_allclose(got, want, **TOL)
    for d, w in zip(diags, want_diags, strict=True):
        np.testing.assert_allclose(list(d.values()), list(w.values()), **TOL)
        assert d.keys() == w.keys()


@pytest.mark.parametrize("num_microbatches", [1, 2])
def test_split_step_equals_the_in_step_decision(setup, num_microbatches):
    """AE-SAM's decision needs this step's ‖g‖²: the clean gradient and the decision in one
    program (plan_second_gradient with the gradient), the update in one of two others."""
    params, batches = setup
    m = num_microbatches
    # c and δ of test_ae_sam_equals_its_equation, whose fixture has no near-tie at them.
    make = lambda: efficient.ae_sam(RHO, 0.3, delta=0.6, num_microbatches=m if m > 1 else None)
    tx = optax.chain(make(), optax.sgd(LR, momentum=MOMENTUM))
    batch_loss = lambda p, b: mean_loss(p, *b)

    def gradients(p, batch):
        if m == 1:
            return jax.grad(batch_loss)(p, batch), lambda q: jax.grad(batch_loss)(q, batch)
        _, grads, grad_fn = sharpjax.microbatch_value_and_grad(batch_loss, p, batch, m)
        return grads, grad_fn

    def step(params, state, batch, second_gradient=None):
        grads, grad_fn = gradients(params, batch)
        updates, state = tx.update(
            grads, state, params, grad_fn=grad_fn, second_gradient=second_gradient
        )
        return optax.apply_updates(params, updates), state

    def clean(params, state, batch):
        grads, _ = gradients(params, batch)
        return grads, efficient.plan_second_gradient(state, grads)

    in_step, clean = jax.jit(step), jax.jit(clean)
    update = jax.jit(step, static_argnames="second_gradient")
    p_cond = p_split = params
    s_cond = s_split = tx.init(params)
    assert efficient.plan_second_gradient(s_split) is None  # it needs the gradient
    if m > 1:  # the state knows the gradients come stacked, and says so when they do not
        flat_grads = jax.grad(batch_loss)(params, batches[0])
        with pytest.raises(ValueError, match="num_microbatches=2, so grads must be the m clean"):
            efficient.plan_second_gradient(s_split, flat_grads)
    took = []
    for batch in batches:
        p_cond, s_cond = in_step(p_cond, s_cond, batch)
        _, plan = clean(p_split, s_split, batch)
        p_split, s_split = update(p_split, s_split, batch, second_gradient=bool(plan))
        want, got = sharpjax.diagnostics(s_cond), sharpjax.diagnostics(s_split)
        took.append(bool(want["second_gradient"]))
        # No near-tie: the nearest is |z − c| = 0.2, against float32 rounding of z (~1e-6).
        assert len(took) == 1 or abs(float(want["grad_sq_zscore"]) - 0.3) > 1e-2
        assert bool(plan) == took[-1] == bool(got["second_gradient"])
        np.testing.assert_allclose(ravel_pytree(p_split)[0], ravel_pytree(p_cond)[0], **TOL)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], **TOL, err_msg=k)
    assert 0 < sum(took) < len(took)


def test_plan_is_none_without_a_policy_that_decides_ahead(setup):
    params, _ = setup
    for tx in (sharpjax.sam(RHO), efficient.ae_sam(RHO), optax.sgd(LR)):
        assert efficient.plan_second_gradient(tx.init(params)) is None
    two = optax.chain(efficient.looksam(RHO), efficient.random_sam(RHO))
    assert efficient.plan_second_gradient(two.init(params)) is None
    # Under jit, at a traced count: LookSAM's k = 3 takes steps 0 and 3.
    state = optax.chain(efficient.looksam(RHO, 3), optax.sgd(LR)).init(params)
    plan = jax.jit(efficient.plan_second_gradient)
    counts = [plan(jax.tree.map(lambda x: x, state))]
    for c in (1, 2, 3):
        counts.append(plan((state[0]._replace(count=jnp.int32(c)), state[1])))
    assert [bool(c) for c in counts] == [True, False, False, True]


def test_second_gradient_must_be_a_python_bool(setup):
    params, batches = setup
    g = jax.grad(mean_loss)(params, *batches[0])
    grad_fn = lambda p: g
    tx = efficient.looksam(RHO)
    with pytest.raises(TypeError, match="second_gradient must be a Python bool"):
        jax.jit(
            lambda t: tx.update(g, tx.init(params), params, grad_fn=grad_fn, second_gradient=t)
        )(True)
    sam = sharpjax.sam(RHO)
    with pytest.raises(ValueError, match="needs a SecondGradientPolicy"):
        sam.update(g, sam.init(params), params, grad_fn=grad_fn, second_gradient=False)
