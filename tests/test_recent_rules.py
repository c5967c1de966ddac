"""F-SAM, WSAM, late-phase SAM, ρ from the learning rate, Lookbehind-SAM and SAMPa against
their equations written on the flat parameter vector, and their reductions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharpjax
from tests.helpers import flat_loss_grad, tiny_mlp_params, toy_batches
from tests.test_core import LR, MOMENTUM, run_chain, trajectory_atol
from tests.test_variants import RHO, chain, flat_run, keep_g2, sam_eps

STEPS = 6


@pytest.fixture(scope="module")
def setup():
    params = tiny_mlp_params(jax.random.key(0))
    batches = toy_batches(jax.random.key(1), STEPS)
    return params, batches


def close(got, want, steps=STEPS, lr=LR, momentum=MOMENTUM):
    np.testing.assert_allclose(got, want, rtol=0, atol=trajectory_atol(steps, lr, momentum))


# ---------------------------------------------------------------------------------------
# Friendly-SAM.
# ---------------------------------------------------------------------------------------


def fsam_paper_eps(sigma, lmbda):
    """m_t = λ m_{t−1} + (1 − λ) g_t (m_{−1} = 0); d = g − σ m_t; ε = ρ d/‖d‖."""

    def perturb(w, g, m):
        m = (1 - lmbda) * g if m is None else lmbda * m + (1 - lmbda) * g
        d = g - sigma * m
        return RHO * d / jnp.linalg.norm(d), m

    return perturb


def fsam_code_eps(sigma, lmbda):
    """m_0 = g_0, d_0 = g_0; then d = g_t − σ m_{t−1}, m_t = λ m_{t−1} + (1 − λ) g_t."""

    def perturb(w, g, m):
        if m is None:
            return RHO * g / jnp.linalg.norm(g), g
        d = g - sigma * m
        return RHO * d / jnp.linalg.norm(d), lmbda * m + (1 - lmbda) * g

    return perturb


def fsam_code_lambda0_eps(sigma):
    """The code's reading at λ = 0: d_t = g_t − σ g_{t−1}."""

    def perturb(w, g, previous):
        d = g if previous is None else g - sigma * previous
        return RHO * d / jnp.linalg.norm(d), g

    return perturb


@pytest.mark.parametrize(
    "transformation, perturb",
    [
        (sharpjax.fsam(RHO, sigma=0.8, lmbda=0.6), fsam_paper_eps(0.8, 0.6)),
        (sharpjax.fsam(RHO, sigma=0.8, lmbda=0.6, reading="code"), fsam_code_eps(0.8, 0.6)),
        (sharpjax.fsam(RHO, sigma=0.7, lmbda=0.0, reading="code"), fsam_code_lambda0_eps(0.7)),
    ],
    ids=["paper", "code", "code_lambda0"],
)
def test_fsam_equals_its_equation(setup, transformation, perturb):
    params, batches = setup
    got, state = run_chain(chain(transformation), params, batches)
    close(got, flat_run(params, batches, perturb, keep_g2))
    assert float(sharpjax.diagnostics(state)["m_norm"]) > 0


@pytest.mark.parametrize(
    "transformation",
    [
        sharpjax.fsam(RHO, sigma=0.0),
        sharpjax.fsam(RHO, sigma=0.0, reading="code"),
        sharpjax.fsam(RHO, sigma=0.5, lmbda=0.0),  # paper: d = (1 − σ) g
    ],
    ids=["paper_sigma0", "code_sigma0", "paper_lambda0"],
)
def test_fsam_reductions_to_sam(setup, transformation):
    params, batches = setup
    got, _ = run_chain(chain(transformation), params, batches)
    close(got, flat_run(params, batches, sam_eps, keep_g2))


# ---------------------------------------------------------------------------------------
# WSAM.
# ---------------------------------------------------------------------------------------


def wsam_out(gamma):
    return lambda g, g2, step: g + gamma / (1 - gamma) * (g2 - g)


def test_wsam_coupled_equals_its_equation_and_reductions(setup):
    params, batches = setup
    got, state = run_chain(chain(sharpjax.wsam(RHO, gamma=0.7)), params, batches)
    close(got, flat_run(params, batches, sam_eps, wsam_out(0.7)))
    np.testing.assert_allclose(sharpjax.diagnostics(state)["sharpness_weight"], 0.7 / 0.3)
    # γ = 0: the base optimizer; γ = 1/2: SAM.
    base, _ = run_chain(optax.chain(optax.sgd(LR, MOMENTUM)), params, batches)
    got, _ = run_chain(chain(sharpjax.wsam(RHO, gamma=0.0)), params, batches)
    close(got, base)
    got, _ = run_chain(chain(sharpjax.wsam(RHO, gamma=0.5)), params, batches)
    close(got, flat_run(params, batches, sam_eps, keep_g2))


def flat_wsam_decoupled(params, batches, gamma):
    """Heavy-ball on the clean g; then w -= lr γ/(1 − γ) (g₂ − g), outside the momentum."""
    w, _, grad = flat_loss_grad(params)
    velocity, trajectory = jnp.zeros_like(w), []
    for batch in batches:
        g = grad(w, batch)
        g2 = grad(w + RHO * g / jnp.linalg.norm(g), batch)
        velocity = MOMENTUM * velocity + g
        w = w - LR * velocity - LR * gamma / (1 - gamma) * (g2 - g)
        trajectory.append(w)
    return np.stack(trajectory)


def test_wsam_decoupled_equals_its_equation_and_reductions(setup):
    params, batches = setup
    tx = sharpjax.wsam(RHO, gamma=0.7, base_optimizer=optax.sgd(LR, MOMENTUM), learning_rate=LR)
    got, state = run_chain(tx, params, batches)
    close(got, flat_wsam_decoupled(params, batches, 0.7))
    assert "grad_norm" in sharpjax.diagnostics(state)
    # γ = 0: the base optimizer.
    tx = sharpjax.wsam(RHO, gamma=0.0, base_optimizer=optax.sgd(LR, MOMENTUM), learning_rate=LR)
    base, _ = run_chain(optax.chain(optax.sgd(LR, MOMENTUM)), params, batches)
    close(run_chain(tx, params, batches)[0], base)
    # Plain SGD: decoupled and coupled are the same step.
    tx = sharpjax.wsam(RHO, gamma=0.7, base_optimizer=optax.sgd(LR), learning_rate=LR)
    coupled = optax.chain(sharpjax.wsam(RHO, gamma=0.7), optax.sgd(LR))
    close(run_chain(tx, params, batches)[0], run_chain(coupled, params, batches)[0], momentum=0)


# ---------------------------------------------------------------------------------------
# Late-phase SAM and ρ from the learning rate.
# ---------------------------------------------------------------------------------------


def test_late_phase_sam_is_sgd_then_sam(setup):
    params, batches = setup
    tx = sharpjax.late_phase_sam(STEPS, RHO, start_fraction=0.5)  # SAM from step 3 on
    got, state = run_chain(chain(tx), params, batches)
    late = lambda g, g2, step: g2 if step >= STEPS // 2 else g
    close(got, flat_run(params, batches, sam_eps, late))
    assert int(state[0].second_gradients) == STEPS - STEPS // 2
    # From 0 on: SAM.
    got, _ = run_chain(chain(sharpjax.late_phase_sam(STEPS, RHO, 0.0)), params, batches)
    close(got, flat_run(params, batches, sam_eps, keep_g2))


def test_late_phase_decision_is_known_before_the_step(setup):
    params, _ = setup
    tx = sharpjax.late_phase_sam(10, RHO, start_fraction=0.3)
    state = tx.init(params)
    for step in range(5):
        plan = sharpjax.efficient.plan_second_gradient(state._replace(count=jnp.int32(step)))
        assert bool(plan) == (step >= 3)


def test_rho_from_lr_follows_big_vision_equation():
    lr = optax.warmup_cosine_decay_schedule(0.0, 0.4, 10, 100, end_value=0.01)
    rho = sharpjax.rho_from_lr(lr, rho_max=0.2, rho_min=0.05, lr_max=0.4, lr_min=0.01)
    for t in [0, 5, 10, 50, 99, 100]:
        want = 0.05 + (0.2 - 0.05) * (float(lr(t)) - 0.01) / (0.4 - 0.01)
        np.testing.assert_allclose(float(rho(t)), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(rho(10)), 0.2, rtol=1e-6)  # the peak gives rho_max


# ---------------------------------------------------------------------------------------
# Lookbehind-SAM.
# ---------------------------------------------------------------------------------------


def flat_lookbehind(params, batches, k, alpha):
    """k ascent steps from the last ascent point, heavy-ball fast weights, slow interpolation."""
    w, _, grad = flat_loss_grad(params)
    velocity, trajectory = jnp.zeros_like(w), []
    for batch in batches:
        d, ascent, fast = grad(w, batch), w, w
        for _ in range(k):
            ascent = ascent + RHO * d / jnp.linalg.norm(d)
            d = grad(ascent, batch)
            velocity = MOMENTUM * velocity + d
            fast = fast - LR * velocity
        w = w + alpha * (fast - w)
        trajectory.append(w)
    return np.stack(trajectory)


def test_lookbehind_equals_its_equation(setup):
    params, batches = setup
    tx = sharpjax.lookbehind_sam(optax.sgd(LR, MOMENTUM), RHO, k=3, alpha=0.5)
    got, state = run_chain(tx, params, batches)
    close(got, flat_lookbehind(params, batches, 3, 0.5), steps=3 * STEPS)
    # Three ascents of ρ each, not all aligned: between ρ and 3ρ from w.
    assert RHO < float(sharpjax.diagnostics(state)["perturbation_norm"]) <= 3 * RHO + 1e-6


def test_lookbehind_with_one_step_and_alpha_one_is_sam(setup):
    params, batches = setup
    tx = sharpjax.lookbehind_sam(optax.sgd(LR, MOMENTUM), RHO, k=1, alpha=1.0)
    got, _ = run_chain(tx, params, batches)
    close(got, flat_run(params, batches, sam_eps, keep_g2))


# ---------------------------------------------------------------------------------------
# SAMPa.
# ---------------------------------------------------------------------------------------


def flat_sampa(params, batches, rho, lam):
    """x̃ = x + ρ g_y/‖g_y‖, y' = x − η g_y, x ← x − η [(1 − λ) ∇f(x̃) + λ ∇f(y')]."""
    x, _, grad = flat_loss_grad(params)
    g_y, trajectory = None, []
    for batch in batches:
        g_y = grad(x, batch) if g_y is None else g_y
        g_tilde = grad(x + rho * g_y / (jnp.linalg.norm(g_y) + 1e-12), batch)
        g_y = grad(x - LR * g_y, batch)
        x = x - LR * ((1 - lam) * g_tilde + lam * g_y)
        trajectory.append(x)
    return np.stack(trajectory)


@pytest.mark.parametrize("execution", ["sequential", "vmap", "parallel"])
def test_sampa_equals_its_equation(setup, execution):
    """ "parallel" on this one device: sampa_mesh() is (pair, batch) = (1, 1), the sequential
    form (the 8-device split is tests/test_parallel.py's)."""
    params, batches = setup
    mesh = sharpjax.sampa_mesh() if execution == "parallel" else None
    assert execution != "parallel" or dict(mesh.shape) == {"pair": 1, "batch": 1}
    tx = sharpjax.sampa(LR, RHO, lam=0.2, execution=execution, mesh=mesh)
    got, _ = run_chain(optax.chain(tx, optax.sgd(LR)), params, batches)
    close(got, flat_sampa(params, batches, RHO, 0.2), momentum=0)


def test_sampa_with_lambda_one_ignores_rho(setup):
    """λ = 1: x_{t+1} = x_t − η ∇f(x_t − η ∇f(y_t)), the equation at ρ = 0."""
    params, batches = setup
    tx = optax.chain(sharpjax.sampa(LR, 3 * RHO, lam=1.0), optax.sgd(LR))
    close(run_chain(tx, params, batches)[0], flat_sampa(params, batches, 0.0, 1.0), momentum=0)


def test_sampa_without_radius_and_lambda_is_sgd(setup):
    params, batches = setup
    tx = optax.chain(sharpjax.sampa(LR, 0.0, lam=0.0), optax.sgd(LR))
    base, _ = run_chain(optax.chain(optax.sgd(LR)), params, batches)
    close(run_chain(tx, params, batches)[0], base, momentum=0)


# ---------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: sharpjax.wsam(gamma=1.0), ValueError, r"gamma must lie in \[0, 1\)"),
        (lambda: sharpjax.wsam(gamma=-0.1), ValueError, "gamma must be finite"),
        (lambda: sharpjax.wsam(gamma=optax.constant_schedule(0.5)), TypeError, "not a schedule"),
        (
            lambda: sharpjax.wsam(base_optimizer=optax.sgd(0.1)),
            ValueError,
            "needs learning_rate",
        ),
        (lambda: sharpjax.wsam(learning_rate=0.1), ValueError, "pass base_optimizer too"),
        (lambda: sharpjax.fsam(sigma=1.5), ValueError, "sigma must be finite and lie in"),
        (lambda: sharpjax.fsam(lmbda=-1.0), ValueError, "lmbda must be finite and lie in"),
        (lambda: sharpjax.fsam(reading="pytorch"), ValueError, "reading must be one of"),
        (lambda: sharpjax.lookbehind_sam(optax.sgd(0.1), k=0), ValueError, "k must be an int"),
        (lambda: sharpjax.lookbehind_sam(optax.sgd(0.1), k=1.5), ValueError, "k must be an int"),
        (lambda: sharpjax.lookbehind_sam(optax.sgd(0.1), alpha=0.0), ValueError, "alpha"),
        (lambda: sharpjax.lookbehind_sam(optax.sgd(0.1), alpha=1.5), ValueError, "alpha"),
        (lambda: sharpjax.lookbehind_sam("sgd"), TypeError, "base_optimizer must be"),
        (lambda: sharpjax.sampa(0.1, lam=1.5), ValueError, "lam must be finite and lie in"),
        (lambda: sharpjax.sampa(-0.1), ValueError, "learning_rate must be finite"),
        (lambda: sharpjax.sampa(0.1, execution="mesh"), ValueError, "execution must be one of"),
        (lambda: sharpjax.sampa(0.1, execution="parallel"), ValueError, "needs mesh"),
        (
            lambda: sharpjax.sampa(0.1, mesh=sharpjax.sampa_mesh()),
            ValueError,
            'mesh is for execution="parallel"',
        ),
        (
            lambda: sharpjax.sampa(0.1, execution="parallel", mesh=sharpjax.parallel.make_mesh()),
            ValueError,
            "pair_axis='pair' is not an axis of the mesh",
        ),
        (lambda: sharpjax.late_phase_sam(100, start_fraction=1.5), ValueError, "start_fraction"),
        (lambda: sharpjax.late_phase_sam(0), ValueError, "total_steps must be an int"),
        (
            lambda: sharpjax.rho_from_lr(optax.constant_schedule(0.1), 0.1, lr_max=0.1, lr_min=0.1),
            ValueError,
            "lr_max .* must exceed lr_min",
        ),
        (
            lambda: sharpjax.rho_from_lr(optax.constant_schedule(0.1), 0.1, 0.2, lr_max=0.1),
            ValueError,
            "rho_min .* must not exceed rho_max",
        ),
    ],
)
def test_bad_input_raises(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_new_rules_work_under_inject_hyperparams(setup):
    """A traced γ, σ, λ (optax.inject_hyperparams under jit) gives the constant's step."""
    params, batches = setup
    for make, kwargs in [
        (sharpjax.wsam, {"rho": RHO, "gamma": 0.7}),
        (sharpjax.fsam, {"rho": RHO, "sigma": 0.8, "lmbda": 0.6}),
    ]:
        injected, _ = run_chain(chain(optax.inject_hyperparams(make)(**kwargs)), params, batches)
        direct, _ = run_chain(chain(make(**kwargs)), params, batches)
        close(injected, direct)
