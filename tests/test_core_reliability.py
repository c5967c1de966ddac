"""The core under misuse and faults: non-finite steps, injected and out-of-range
hyperparameters, float64 and integer params, the perturbed loss, and rules on micro-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sharpjax
from tests.helpers import cross_entropy, flat_loss_grad, tiny_mlp_params, toy_batches
from tests.test_core import trajectory_atol

LR, RHO = 0.1, 0.1

# Every transformation whose state could be poisoned, built with default hyperparameters.
VARIANTS = {
    "sam": lambda: sharpjax.sam(RHO),
    "asam": lambda: sharpjax.asam(0.5),
    "vasso": lambda: sharpjax.vasso(RHO, theta=0.4),
    "saner": lambda: sharpjax.saner(RHO, alpha=0.5),
    "gsam": lambda: sharpjax.gsam(RHO, alpha=0.2),
    "noise_resistant_sam": lambda: sharpjax.noise_resistant_sam(RHO, mu=0.01),
}


@pytest.fixture(scope="module")
def setup():
    return tiny_mlp_params(jax.random.key(0)), toy_batches(jax.random.key(1), 6)


def grads_at(params, batch):
    return jax.grad(cross_entropy)(params, *batch)


def poison(tree, where="first"):
    """The tree with one NaN (or an Inf) in its first leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    bad = jnp.inf if where == "inf" else jnp.nan
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(bad)
    return jax.tree.unflatten(treedef, leaves)


# ---------------------------------------------------------------------------------------
# A non-finite step changes no state.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("which", ["clean", "second", "inf"])
def test_non_finite_step_leaves_the_state_as_it_was(setup, name, which):
    params, batches = setup
    tx = optax.chain(VARIANTS[name](), optax.sgd(LR, momentum=0.9))
    state = tx.init(params)
    update = jax.jit(lambda g, s, p, b: tx.update(g, s, p, grad_fn=lambda q: grads_at(q, b)))
    for batch in batches[:2]:  # some history in VaSSO's d and the integral
        updates, state = update(grads_at(params, batch), state, params, batch)
        params = optax.apply_updates(params, updates)

    batch = batches[2]
    g = grads_at(params, batch)
    if which == "second":
        bad_update = jax.jit(
            lambda g, s, p: tx.update(g, s, p, grad_fn=lambda q: poison(grads_at(q, batch)))
        )
        updates, new_state = bad_update(g, state, params)
    else:
        updates, new_state = update(poison(g, which), state, params, batch)

    finite_updates = all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    if which == "second":
        # A bad g₂ from a finite g, which apply_if_finite cannot see: the output is zeroed
        # (the base optimizer's momentum still moves the params) and counted.
        assert finite_updates
        assert float(sharpjax.diagnostics(new_state)["nonfinite_second_gradients"]) == 1.0
    else:
        # The non-finite clean gradient is passed on (apply_if_finite sees it in its input) ...
        assert not finite_updates

    # ... and no sharpjax state moved (diagnostics aside: they show the step as it was).
    def rule_states(s):
        found = []

        def visit(node):
            if isinstance(node, sharpjax.SharpnessAwareState):
                found.append(node._replace(diagnostics={}))
            elif isinstance(node, sharpjax.NoiseResistantState):
                found.append(node.integral)
            elif isinstance(node, tuple | list):
                for child in node:
                    visit(child)

        visit(s)
        return found

    before, after = rule_states(state), rule_states(new_state)
    assert before
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(np.asarray(old), np.asarray(new))


@pytest.mark.parametrize("name", ["vasso", "noise_resistant_sam"])
def test_a_run_recovers_from_a_skipped_bad_step(setup, name):
    """The user's own check drops the update; VaSSO and the integral stay finite afterwards."""
    params, batches = setup
    tx = optax.chain(VARIANTS[name](), optax.sgd(LR, momentum=0.9))
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch, bad):
        g = grads_at(params, batch)
        g = jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x), g)
        updates, new_state = tx.update(g, state, params, grad_fn=lambda q: grads_at(q, batch))
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)]))
        # the user's check throws the update away but keeps the new optimizer state
        params = jax.tree.map(lambda p, u: jnp.where(finite, p + u, p), params, updates)
        return params, new_state

    for i in range(30):
        params, state = step(params, state, batches[i % len(batches)], i == 3)
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_apply_if_finite_skips_the_bad_step(setup, name):
    """optax.apply_if_finite around a sharpjax chain: the bad step is a no-op, as if skipped."""
    params, batches = setup
    sequence = [batches[0], batches[1], None, batches[2], batches[3]]  # None: a NaN step

    def run(tx, steps):
        state, p = tx.init(params), params
        for batch in steps:
            b = batches[0] if batch is None else batch
            g = grads_at(p, b)
            if batch is None:
                g = poison(g)
            updates, state = tx.update(g, state, p, grad_fn=lambda q, b=b: grads_at(q, b))
            p = optax.apply_updates(p, updates)
        return ravel_pytree(p)[0]

    make = lambda: optax.chain(VARIANTS[name](), optax.sgd(LR, momentum=0.9))
    guarded = optax.apply_if_finite(make(), max_consecutive_errors=3)
    got = run(guarded, sequence)
    want = run(make(), [b for b in sequence if b is not None])
    # Two programs (guarded and plain chains): float32 rounding carried by momentum.
    np.testing.assert_allclose(got, want, rtol=0, atol=trajectory_atol(len(sequence)))


# ---------------------------------------------------------------------------------------
# Hyperparameters: inject_hyperparams, schedules out of range, non-finite constants.
# ---------------------------------------------------------------------------------------

INJECTABLE = [
    (sharpjax.sam, {"rho": 0.05}),
    (sharpjax.asam, {"rho": 0.5, "eta": 0.01}),
    (sharpjax.vasso, {"rho": 0.1, "theta": 0.9}),
    (sharpjax.saner, {"rho": 0.1, "alpha": 0.5}),
    (sharpjax.gsam, {"rho": 0.05, "alpha": 0.1}),
    (sharpjax.noise_resistant_sam, {"rho": 0.05, "mu": 0.01}),
    (sharpjax.msam, {"rho": 0.05}),
]


@pytest.mark.parametrize("make, hyperparams", INJECTABLE, ids=lambda x: getattr(x, "__name__", ""))
def test_every_constructor_works_under_inject_hyperparams(setup, make, hyperparams):
    params, batches = setup
    micro = make is sharpjax.msam
    static = ("num_microbatches",) if micro else ()  # an int that fixes the program's shape
    tx = optax.chain(optax.inject_hyperparams(make, static)(**hyperparams), optax.sgd(LR))
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        if micro:
            _, g, grad_fn = sharpjax.microbatch_value_and_grad(
                lambda p, b: cross_entropy(p, *b), params, batch, 1
            )
        else:
            g, grad_fn = grads_at(params, batch), lambda q: grads_at(q, batch)
        updates, state = tx.update(g, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    exact_norm = make is not sharpjax.asam  # ASAM's ε has norm ρ only in the rescaled space
    params, state = step(params, state, batches[0])
    diag = sharpjax.diagnostics(state)
    np.testing.assert_allclose(diag["rho"], hyperparams["rho"], rtol=1e-6)
    if exact_norm:
        np.testing.assert_allclose(diag["perturbation_norm"], hyperparams["rho"], rtol=1e-5)
    # Change ρ during training: the next step perturbs at the new radius, no recompilation.
    state[0].hyperparams["rho"] = jnp.full_like(state[0].hyperparams["rho"], 0.2)
    params, state = step(params, state, batches[1])
    compiled = step._cache_size()
    diag = sharpjax.diagnostics(state)
    np.testing.assert_allclose(diag["rho"], 0.2, rtol=1e-6)
    if exact_norm:
        np.testing.assert_allclose(diag["perturbation_norm"], 0.2, rtol=1e-5)
    state[0].hyperparams["rho"] = jnp.full_like(state[0].hyperparams["rho"], 0.3)
    params, state = step(params, state, batches[2])
    np.testing.assert_allclose(sharpjax.diagnostics(state)["rho"], 0.3, rtol=1e-6)
    assert step._cache_size() == compiled  # a new ρ is a new value, not a new program


def test_injected_saner_alpha_takes_effect(setup):
    params, batches = setup
    tx = optax.inject_hyperparams(sharpjax.saner)(rho=RHO, alpha=0.5)
    state = tx.init(params)
    state.hyperparams["alpha"] = jnp.asarray(0.25)
    g, grad_fn = grads_at(params, batches[0]), lambda q: grads_at(q, batches[0])
    out, state = tx.update(g, state, params, grad_fn=grad_fn)
    w, _, grad = flat_loss_grad(params)
    gf = grad(w, batches[0])
    g2 = grad(w + RHO * gf / jnp.linalg.norm(gf), batches[0])
    ratio = g2 / (gf + 1e-8)
    want = g2 * jnp.where((ratio > 0) & (ratio < 1), 0.25, 1.0)
    # ~30 eps of a gradient of scale ≲ 1 (two programs' sums)
    np.testing.assert_allclose(ravel_pytree(out)[0], want, rtol=1e-5, atol=1e-6)


def test_schedules_out_of_range_are_clamped_and_reported(setup):
    params, batches = setup
    rho = lambda count: jnp.where(count < 1, 0.05, -0.3)  # goes negative after step 0
    alpha = lambda count: jnp.where(count < 1, 0.5, 5.0)  # SANER's α must be ≤ 1
    tx = sharpjax.saner(rho, alpha)
    state = tx.init(params)
    g, grad_fn = grads_at(params, batches[0]), lambda q: grads_at(q, batches[0])
    for _ in range(2):
        out, state = tx.update(g, state, params, grad_fn=grad_fn)
    diag = sharpjax.diagnostics(state)
    assert float(diag["rho"]) == 0.0 and float(diag["perturbation_norm"]) == 0.0
    assert float(diag["alpha"]) == 1.0
    # ρ = 0 and α = 1: the output is the clean gradient itself, not a step downhill.
    flat = ravel_pytree(g)[0]
    np.testing.assert_allclose(
        ravel_pytree(out)[0], flat, rtol=1e-6, atol=1e-7 * float(jnp.max(jnp.abs(flat)))
    )


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: sharpjax.sam(rho=float("inf")), "rho must be finite"),
        (lambda: sharpjax.sam(rho=float("nan")), "rho must be finite"),
        (lambda: sharpjax.gsam(alpha=float("inf")), "alpha must be finite"),
        (lambda: sharpjax.vasso(theta=float("inf")), "theta must be finite"),
        (lambda: sharpjax.noise_resistant(mu=float("inf")), "mu must be finite"),
        (lambda: sharpjax.sam(rho=lambda t: -0.1 + 0 * t), "value at step 0"),
        (lambda: sharpjax.saner(alpha=lambda t: 2.0 + 0 * t), "value at step 0"),
        (lambda: sharpjax.sam(rho="0.05"), "rho must be a float"),
        (lambda: sharpjax.sam(rho=lambda: 0.1), "schedule must be a function"),
        (lambda: sharpjax.vasso(theta=lambda t: 0.5), "theta must be a number"),
    ],
)
def test_bad_hyperparameters_are_rejected_at_construction(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


# ---------------------------------------------------------------------------------------
# Precision and dtypes.
# ---------------------------------------------------------------------------------------


def test_float64_params_are_computed_in_float64():
    with jax.enable_x64(True):
        key = jax.random.key(0)
        params = jax.tree.map(lambda x: x.astype(jnp.float64), tiny_mlp_params(key))
        x = jax.random.normal(jax.random.key(1), (16, 5), jnp.float64)
        y = jax.random.randint(jax.random.key(2), (16,), 0, 3)
        g = jax.grad(cross_entropy)(params, x, y)
        alpha = 0.3
        tx = sharpjax.gsam(RHO, alpha)
        out, _ = tx.update(
            g, tx.init(params), params, grad_fn=lambda q: jax.grad(cross_entropy)(q, x, y)
        )
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(out))
        # the same equations in numpy float64
        flat, unravel = ravel_pytree(params)
        gf = np.asarray(ravel_pytree(g)[0])
        eps = RHO * gf / np.linalg.norm(gf)
        g2 = np.asarray(ravel_pytree(jax.grad(cross_entropy)(unravel(flat + eps), x, y))[0])
        orth = gf - (gf @ g2) / (g2 @ g2) * g2
        want = g2 - alpha * orth
        # float32 arithmetic anywhere would show as ~1e-7; float64 rounding is ~1e-13 per op
        np.testing.assert_allclose(np.asarray(ravel_pytree(out)[0]), want, rtol=1e-9, atol=0)


def test_integer_params_are_rejected():
    params = {"w": jnp.ones(3), "step": jnp.zeros([], jnp.int32)}
    with pytest.raises(TypeError, match=r"floating-point params.*'step'"):
        sharpjax.sam().init(params)


# ---------------------------------------------------------------------------------------
# The perturbed loss in the diagnostics.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [sharpjax.sam, sharpjax.gsam])
def test_perturbed_loss_and_sharpness(setup, make):
    params, batches = setup
    batch = batches[0]
    loss, g = jax.value_and_grad(cross_entropy)(params, *batch)
    tx = make(RHO)
    vg = lambda q: jax.value_and_grad(cross_entropy)(q, *batch)
    _, state = tx.update(g, tx.init(params), params, value_and_grad_fn=vg, loss=loss)
    diag = sharpjax.diagnostics(state)
    w, unravel, grad = flat_loss_grad(params)
    gf = grad(w, batch)
    perturbed = cross_entropy(unravel(w + RHO * gf / jnp.linalg.norm(gf)), *batch)
    np.testing.assert_allclose(diag["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(diag["perturbed_loss"], perturbed, rtol=1e-5)
    np.testing.assert_allclose(diag["sharpness"], perturbed - loss, rtol=1e-3, atol=1e-6)
    assert float(diag["sharpness"]) > 0  # a step of ρ along the gradient goes uphill
    if make is sharpjax.gsam:
        np.testing.assert_allclose(diag["surrogate_gap"], diag["sharpness"], rtol=1e-6)


def test_grad_fn_and_value_and_grad_fn_are_exclusive(setup):
    params, batches = setup
    g = grads_at(params, batches[0])
    tx = sharpjax.sam()
    with pytest.raises(TypeError, match="not both"):
        tx.update(g, tx.init(params), params, grad_fn=lambda q: g, value_and_grad_fn=lambda q: g)
    with pytest.raises(ValueError, match=r"must return \(loss, grads\)"):
        tx.update(g, tx.init(params), params, value_and_grad_fn=lambda q: g)


# ---------------------------------------------------------------------------------------
# Every rule on micro-batches (m-sharpness), against its equation.
# ---------------------------------------------------------------------------------------


def micro_parts(batch, m):
    x, y = batch
    size = x.shape[0] // m
    return [(x[j * size : (j + 1) * size], y[j * size : (j + 1) * size]) for j in range(m)]


def run_micro(tx, params, batches, m):
    state, trajectory = tx.init(params), []

    @jax.jit
    def step(params, state, batch):
        _, g, grad_fn = sharpjax.microbatch_value_and_grad(
            lambda p, b: cross_entropy(p, *b), params, batch, m
        )
        updates, state = tx.update(g, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    for batch in batches:
        params, state = step(params, state, batch)
        trajectory.append(ravel_pytree(params)[0])
    return np.stack(trajectory), state


EXECUTIONS = ("sequential", "parallel")


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_saner_on_msam_equals_its_equation(setup, execution):
    params, batches = setup
    m, alpha = 4, 0.5
    saner = sharpjax.saner(RHO, alpha, num_microbatches=m, microbatch_execution=execution)
    got, state = run_micro(
        optax.chain(saner, optax.sgd(LR)),
        params,
        batches[:3],
        m,
    )
    w, _, grad = flat_loss_grad(params)
    want, fractions = [], []
    for batch in batches[:3]:
        outs, masked = [], []
        for part in micro_parts(batch, m):
            g = grad(w, part)
            g2 = grad(w + RHO * g / jnp.linalg.norm(g), part)
            ratio = g2 / (g + 1e-8)
            mask = (ratio > 0) & (ratio < 1)
            outs.append(g2 * jnp.where(mask, alpha, 1.0))
            masked.append(jnp.mean(mask))
        w = w - LR * sum(outs) / m
        want.append(w)
        fractions.append(np.mean(masked))
    np.testing.assert_allclose(got, np.stack(want), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(
        sharpjax.diagnostics(state)["masked_fraction"], fractions[-1], atol=0.02
    )


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_vasso_on_msam_keeps_one_d_per_microbatch(setup, execution):
    params, batches = setup
    m, theta = 2, 0.4
    vasso = sharpjax.vasso(RHO, theta, num_microbatches=m, microbatch_execution=execution)
    got, _ = run_micro(
        optax.chain(vasso, optax.sgd(LR)),
        params,
        batches[:3],
        m,
    )
    w, _, grad = flat_loss_grad(params)
    d = [None] * m
    want = []
    for batch in batches[:3]:
        outs = []
        for j, part in enumerate(micro_parts(batch, m)):
            g = grad(w, part)
            d[j] = g if d[j] is None else (1 - theta) * d[j] + theta * g
            outs.append(grad(w + RHO * d[j] / jnp.linalg.norm(d[j]), part))
        w = w - LR * sum(outs) / m
        want.append(w)
    np.testing.assert_allclose(got, np.stack(want), rtol=2e-5, atol=2e-6)


def test_microbatches_need_per_device_mode():
    with pytest.raises(ValueError, match="per_device"):
        sharpjax.sam(num_microbatches=2, axis_name="batch", perturbation_mode="synced")
    with pytest.raises(ValueError, match="microbatch_execution"):
        sharpjax.sam(num_microbatches=2, microbatch_execution="vmap")


# ---------------------------------------------------------------------------------------
# The cosine diagnostic: opt-in where it costs a parameter copy, free where g is alive anyway.
# ---------------------------------------------------------------------------------------


def test_cosine_is_opt_in_for_sam_and_free_for_saner(setup):
    params, batches = setup
    batch = batches[0]
    g = grads_at(params, batch)
    w, unravel = ravel_pytree(params)
    gf = ravel_pytree(g)[0]
    g2 = ravel_pytree(grads_at(unravel(w + RHO * gf / jnp.linalg.norm(gf)), batch))[0]
    expected = float(gf @ g2 / (jnp.linalg.norm(gf) * jnp.linalg.norm(g2)))

    def step(tx):
        state = tx.init(params)
        updates, state = tx.update(g, state, params, grad_fn=lambda q: grads_at(q, batch))
        return ravel_pytree(updates)[0], sharpjax.diagnostics(state)

    plain_updates, plain = step(sharpjax.sam(RHO))
    measured_updates, measured = step(sharpjax.sam(RHO, cosine=True))
    assert "cosine" not in plain  # known at construction not to be measured: left out
    np.testing.assert_allclose(measured["cosine"], expected, rtol=1e-5)
    # Measuring changes nothing else: both output g₂ (float32, one gradient: rtol 1e-5).
    np.testing.assert_allclose(plain_updates, measured_updates, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(plain["second_grad_norm"], measured["second_grad_norm"], rtol=1e-5)
    # SANER reads g anyway: its cosine is reported by default and is SAM's (same g₂).
    _, saner = step(sharpjax.saner(RHO, alpha=0.5))
    np.testing.assert_allclose(saner["cosine"], expected, rtol=1e-5)
    # ... unless the core is told not to.
    off = sharpjax.core.sharpness_aware(
        sharpjax.sam_perturbation(), sharpjax.saner_combination(0.5), rho=RHO, cosine=False
    )
    assert "cosine" not in step(off)[1]
    with pytest.raises(TypeError, match="cosine"):
        sharpjax.core.sharpness_aware(sharpjax.sam_perturbation(), cosine="yes")


def test_trainer_measure_cosine_is_passed_to_the_optimizer(setup):
    from sharpjax.train import TrainConfig, make_optimizer

    params, batches = setup
    batch = batches[0]
    for measure in (True, False):
        config = TrainConfig(optimizer="sam", measure_cosine=measure)
        tx = make_optimizer(config, steps_per_epoch=10)
        state = tx.init(params)
        g = grads_at(params, batch)
        _, state = tx.update(g, state, params, grad_fn=lambda q: grads_at(q, batch))
        assert ("cosine" in sharpjax.diagnostics(state)) == measure


# ---------------------------------------------------------------------------------------
# A non-finite second gradient from a finite clean one (issue 19): apply_if_finite cannot
# see it, so the transformation's output is zero, its state stays, and it is counted.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("guarded", [False, True], ids=["plain", "apply_if_finite"])
@pytest.mark.parametrize("source", ["rho_nan", "second_nan"])
def test_a_nonfinite_second_gradient_leaves_the_params_where_they_were(setup, guarded, source):
    params, batches = setup
    # Plain SGD: a zero output from the sharpjax stage is exactly "params unchanged".
    chain = optax.chain(optax.inject_hyperparams(sharpjax.vasso)(rho=RHO, theta=0.4), optax.sgd(LR))
    tx = optax.apply_if_finite(chain, max_consecutive_errors=3) if guarded else chain
    inner = (lambda s: s.inner_state) if guarded else (lambda s: s)

    @jax.jit
    def step(params, state, batch, bad):
        g = grads_at(params, batch)
        grad_fn = lambda q: grads_at(q, batch)
        if source == "second_nan":
            grad_fn = lambda q: jax.tree.map(
                lambda x: jnp.where(bad, jnp.nan, x), grads_at(q, batch)
            )
        updates, state = tx.update(g, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    params, state = step(params, state, batches[0], False)
    if source == "rho_nan":
        inner(state)[0].hyperparams["rho"] = jnp.asarray(jnp.nan)
    before_params, before = params, inner(state)[0].inner_state
    params, state = step(params, state, batches[1], True)

    for old, new in zip(jax.tree.leaves(before_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(old, new)  # not a NaN, not a step: unchanged
    after = inner(state)[0].inner_state
    assert int(after.count) == int(before.count) == 1  # the rule state did not move ...
    np.testing.assert_array_equal(
        after.perturbation_state.d["layer0"]["kernel"],
        before.perturbation_state.d["layer0"]["kernel"],
    )
    diag = sharpjax.diagnostics(state)
    assert float(diag["nonfinite_second_gradients"]) == 1.0  # ... and the step is counted
    if guarded:
        assert int(state.notfinite_count) == 0  # its input was finite: documented
    # The run goes on: the next good step moves the params and counts.
    if source == "rho_nan":
        inner(state)[0].hyperparams["rho"] = jnp.asarray(RHO)
    params, state = step(params, state, batches[2], False)
    assert int(inner(state)[0].inner_state.count) == 2
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
    assert float(sharpjax.diagnostics(state)["nonfinite_second_gradients"]) == 1.0


def test_multisteps_is_refused_with_the_pointer_to_num_micro_steps(setup):
    params, _ = setup
    for inner in (sharpjax.sam(RHO), optax.chain(sharpjax.saner(RHO), optax.sgd(LR))):
        with pytest.raises(ValueError, match=r"MultiSteps.*num_micro_steps"):
            optax.MultiSteps(inner, every_k_schedule=2).init(params)


def test_updates_of_another_structure_or_shape_name_updates(setup):
    params, batches = setup
    g = grads_at(params, batches[0])
    grad_fn = lambda q: grads_at(q, batches[0])
    tx = sharpjax.sam(RHO)
    missing = {"layer0": g["layer0"]}
    with pytest.raises(ValueError, match=r"updates must be a pytree with the structure"):
        tx.update(missing, tx.init(params), params, grad_fn=grad_fn)
    wrong = {**g, "layer1": {**g["layer1"], "bias": g["layer1"]["bias"][:2]}}
    with pytest.raises(ValueError, match=r"updates has a leaf \['layer1'\]\['bias'\] of shape"):
        tx.update(wrong, tx.init(params), params, grad_fn=grad_fn)
    micro = sharpjax.msam(RHO, 2)
    with pytest.raises(ValueError, match=r"updates has a leaf .* num_microbatches=2"):
        micro.update(g, micro.init(params), params, grad_fn=lambda q, j: grad_fn(q))


# ---------------------------------------------------------------------------------------
# Diagnostics: what a step did not measure is carried, what is never measured is left out.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["looksam", "saner_on_looksam", "random_sam"])
def test_a_skipped_step_carries_the_last_measured_values(setup, name):
    params, batches = setup
    if name == "looksam":
        tx = sharpjax.looksam(RHO, k=2)
    elif name == "saner_on_looksam":  # the inner rule's masked_fraction is carried too
        tx = sharpjax.looksam(RHO, k=2, inner=sharpjax.saner_combination(0.5))
    else:  # takes g₂ on step 0 (p = 1), never after (p = 0)
        tx = sharpjax.random_sam(RHO, lambda t: jnp.where(t < 1, 1.0, 0.0), cosine=True)
    state = tx.init(params)
    diags = []
    for i, batch in enumerate(batches[:2]):
        loss, g = jax.value_and_grad(cross_entropy)(params, *batch)
        vg = lambda q, b=batch: jax.value_and_grad(cross_entropy)(q, *b)
        _, state = tx.update(g, state, params, value_and_grad_fn=vg, loss=loss if i == 0 else None)
        diags.append({k: float(v) for k, v in sharpjax.diagnostics(state).items()})
    took, skipped = diags
    assert took["second_gradient"] == 1.0 and skipped["second_gradient"] == 0.0
    carried = ("perturbation_norm", "second_grad_norm", "cosine", "perturbed_loss", "sharpness")
    carried += ("loss",)  # no loss= on the second step
    if name == "saner_on_looksam":
        carried += ("masked_fraction",)
    for key in carried:
        assert skipped[key] == took[key] and np.isfinite(took[key]), key
    # measured on the skipped step too: its own clean gradient's norm
    w, _, grad = flat_loss_grad(params)
    np.testing.assert_allclose(skipped["grad_norm"], jnp.linalg.norm(grad(w, batches[1])), 1e-5)


def test_never_measured_values_are_nan_and_a_static_cosine_is_absent(setup):
    params, batches = setup
    for tx, has_cosine in ((sharpjax.sam(RHO), False), (sharpjax.saner(RHO), True)):
        state = tx.init(params)
        _, state = tx.update(
            grads_at(params, batches[0]), state, params, grad_fn=lambda q: grads_at(q, batches[0])
        )
        diag = sharpjax.diagnostics(state)
        assert ("cosine" in diag) == has_cosine
        for key in ("loss", "perturbed_loss", "sharpness"):  # no loss=, no value_and_grad_fn=
            assert np.isnan(diag[key]), key
        assert all(
            np.isfinite(v)
            for k, v in diag.items()
            if k not in {"loss", "perturbed_loss", "sharpness"}
        )


# ---------------------------------------------------------------------------------------
# Planted-bug survivors of issue 19, each with the test that catches it.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [sharpjax.sam, sharpjax.asam, sharpjax.vasso, sharpjax.saner, sharpjax.gsam]
)
def test_zero_gradient_at_a_minimum_with_a_grad_fn_that_reads_its_argument(make):
    """L(w) = ½‖w − c‖² at w = c: g = 0, so ε must be 0 (a norm without its epsilon gives
    0/0 = NaN, and g₂ = ∇L(w + ε) = ε would be NaN)."""
    c = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.25, -1.0])}
    grad_fn = lambda p: jax.tree.map(lambda x, y: x - y, p, c)
    tx = make()
    updates, state = tx.update(grad_fn(c), tx.init(c), c, grad_fn=grad_fn)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    assert int(state.count) == 1  # a finite step: the state moved
    diag = sharpjax.diagnostics(state)
    assert float(diag["perturbation_norm"]) == 0.0 and float(diag["second_grad_norm"]) == 0.0
    assert float(diag["nonfinite_second_gradients"]) == 0.0


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_msam_diagnostics_are_the_microbatch_means(setup, execution):
    params, batches = setup
    m, batch = 4, batches[0]
    tx = sharpjax.msam(RHO, m, cosine=True, microbatch_execution=execution)
    loss_fn = lambda p, b: cross_entropy(p, *b)
    losses, g, _ = sharpjax.microbatch_value_and_grad(loss_fn, params, batch, m)
    micro = sharpjax.split_microbatches(batch, m)
    vg = lambda q, j: jax.value_and_grad(loss_fn)(q, jax.tree.map(lambda a: a[j], micro))
    _, state = jax.jit(lambda g, s, p, ls: tx.update(g, s, p, value_and_grad_fn=vg, loss=ls))(
        g, tx.init(params), params, losses
    )
    diag = sharpjax.diagnostics(state)

    w, unravel, grad = flat_loss_grad(params)
    rows = {k: [] for k in ("loss", "perturbed_loss", "grad_norm", "second_grad_norm", "cosine")}
    for part in micro_parts(batch, m):
        gj = grad(w, part)
        perturbed = w + RHO * gj / jnp.linalg.norm(gj)
        g2 = grad(perturbed, part)
        rows["loss"].append(cross_entropy(unravel(w), *part))
        rows["perturbed_loss"].append(cross_entropy(unravel(perturbed), *part))
        rows["grad_norm"].append(jnp.linalg.norm(gj))
        rows["second_grad_norm"].append(jnp.linalg.norm(g2))
        rows["cosine"].append(gj @ g2 / (jnp.linalg.norm(gj) * jnp.linalg.norm(g2)))
    for key, values in rows.items():
        np.testing.assert_allclose(diag[key], np.mean(values), rtol=2e-5, err_msg=key)
    want_sharpness = np.mean(rows["perturbed_loss"]) - np.mean(rows["loss"])
    np.testing.assert_allclose(diag["sharpness"], want_sharpness, rtol=1e-3, atol=1e-6)


def test_diagnostics_are_device_means_under_a_named_axis(setup):
    """vmap with axis_name runs the same collectives as pmap: per-device SAM on 4 "devices",
    each with its own batch; every device reports the mean over devices."""
    params, batches = setup
    tx = sharpjax.sam(RHO, axis_name="dev", cosine=True)
    xs = jnp.stack([b[0] for b in batches[:4]])
    ys = jnp.stack([b[1] for b in batches[:4]])

    def device(x, y):
        loss, g = jax.value_and_grad(cross_entropy)(params, x, y)
        vg = lambda q: jax.value_and_grad(cross_entropy)(q, x, y)
        _, state = tx.update(g, tx.init(params), params, value_and_grad_fn=vg, loss=loss)
        return sharpjax.diagnostics(state)

    diag = jax.vmap(device, axis_name="dev")(xs, ys)
    w, unravel, grad = flat_loss_grad(params)
    norms, norms2, perturbed = [], [], []
    for x, y in zip(xs, ys, strict=True):
        gd = grad(w, (x, y))
        p = w + RHO * gd / jnp.linalg.norm(gd)
        norms.append(jnp.linalg.norm(gd))
        perturbed.append(cross_entropy(unravel(p), x, y))
        norms2.append(jnp.linalg.norm(grad(p, (x, y))))  # per device: each its own g₂
    for key, want in (
        ("grad_norm", np.mean(norms)),
        ("second_grad_norm", np.mean(norms2)),
        ("perturbed_loss", np.mean(perturbed)),
    ):
        np.testing.assert_allclose(diag[key], np.full(4, want), rtol=1e-5, err_msg=key)
