"""SAM variants (VaSSO, SANER, GSAM, mSAM, noise-resistant) against flat equations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sharpjax
from tests.helpers import cross_entropy, flat_loss_grad, tiny_mlp_params, toy_batches
from tests.test_core import LR, MOMENTUM, STEPS, run_chain, trajectory_atol

RHO = 0.1


@pytest.fixture(scope="module")
def setup():
    params = tiny_mlp_params(jax.random.key(0))
    batches = toy_batches(jax.random.key(1), STEPS)
    return params, batches


def flat_run(params, batches, perturb, combine):
    """Heavy-ball SGD on combine(g, ∇L(w + ε)), all on flat vectors; rule state explicit."""
    w, _, grad = flat_loss_grad(params)
    velocity, state, trajectory = jnp.zeros_like(w), None, []
    for step, batch in enumerate(batches):
        g = grad(w, batch)
        eps, state = perturb(w, g, state)
        out = combine(g, grad(w + eps, batch), step)
        velocity = MOMENTUM * velocity + out
        w = w - LR * velocity
        trajectory.append(w)
    return np.stack(trajectory)


def sam_eps(w, g, state):
    return RHO * g / jnp.linalg.norm(g), state


def vasso_eps(theta):
    def perturb(w, g, d):
        d = g if d is None else (1 - theta) * d + theta * g
        return RHO * d / jnp.linalg.norm(d), d

    return perturb


def asam_eps(eta):
    def perturb(w, g, state):
        t = jnp.abs(w) + eta
        return RHO * t**2 * g / jnp.linalg.norm(t * g), state

    return perturb


def keep_g2(g, g2, step):
    return g2


# SANER's mask is a threshold on g2/g. Two programs' gradients differ by rounding, so a
# masked element with |g2| within rounding of |g| could flip and move the trajectory by a
# whole masked step. Sign flips move it by ≲ rounding (the element is ~0). On this fixture
# the closest same-sign |g2| vs |g| gap of an element > 1e-4 is ~4e-7 (saner_on_asam), ~40
# times the observed rounding (~1e-8): a residual, data-dependent risk, not removable by a
# tolerance.
def saner_out(alpha_of_step):
    def combine(g, g2, step):
        ratio = g2 / (g + 1e-8)
        mask = (ratio > 0) & (ratio < 1)
        return jnp.where(mask, alpha_of_step(step) * g2, g2)

    return combine


def gsam_out(alpha):
    def combine(g, g2, step):
        g_perp = g - (g @ g2) / (g2 @ g2) * g2
        return g2 - alpha * g_perp

    return combine


def chain(transformation):
    return optax.chain(transformation, optax.sgd(LR, MOMENTUM))


# ---------------------------------------------------------------------------------------
# Trajectories against the equations.
# ---------------------------------------------------------------------------------------

warmup = optax.linear_schedule(1.0, 0.5, 6)
CASES = {
    "vasso": (sharpjax.vasso(RHO, theta=0.4), vasso_eps(0.4), keep_g2),
    "saner": (sharpjax.saner(RHO, alpha=0.3), sam_eps, saner_out(lambda t: 0.3)),
    "saner_warmup": (sharpjax.saner(RHO, alpha=warmup), sam_eps, saner_out(warmup)),
    "gsam": (sharpjax.gsam(RHO, alpha=0.3), sam_eps, gsam_out(0.3)),
    "saner_on_vasso": (
        sharpjax.saner(RHO, alpha=0.5, perturbation=sharpjax.vasso_perturbation(0.4)),
        vasso_eps(0.4),
        saner_out(lambda t: 0.5),
    ),
    "saner_on_asam": (
        sharpjax.saner(RHO, alpha=0.5, perturbation=sharpjax.adaptive_perturbation(0.01)),
        asam_eps(0.01),
        saner_out(lambda t: 0.5),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_trajectory_equals_flat_equations(setup, name):
    params, batches = setup
    transformation, perturb, combine = CASES[name]
    got, _ = run_chain(chain(transformation), params, batches)
    want = flat_run(params, batches, perturb, combine)
    np.testing.assert_allclose(got, want, rtol=0, atol=trajectory_atol(STEPS))


def test_saner_masks_elements_in_the_trajectory(setup):
    """The SANER cases above must actually exercise the mask, or they test nothing."""
    params, batches = setup
    _, state = run_chain(chain(sharpjax.saner(RHO, alpha=0.3)), params, batches)
    fraction = float(sharpjax.diagnostics(state)["masked_fraction"])
    assert 0.05 < fraction < 0.95


@pytest.mark.parametrize(
    "variant",
    [
        sharpjax.vasso(RHO, theta=1.0),
        sharpjax.saner(RHO, alpha=1.0),
        sharpjax.gsam(RHO, alpha=0.0),
    ],
    ids=["vasso_theta1", "saner_alpha1", "gsam_alpha0"],
)
def test_reductions_to_sam(setup, variant):
    params, batches = setup
    got, _ = run_chain(chain(variant), params, batches)
    want, _ = run_chain(chain(sharpjax.sam(RHO)), params, batches)
    # The same equations (θ = 1: d = g; α = 1: no mask; α = 0: no g_perp) in another program.
    np.testing.assert_allclose(got, want, rtol=0, atol=trajectory_atol(STEPS))


# ---------------------------------------------------------------------------------------
# SANER's mask.
# ---------------------------------------------------------------------------------------


def test_saner_mask_on_crafted_vectors():
    g = jnp.array([1.0, 1.0, 1.0, -2.0, -2.0, 0.0, 0.0, 0.0, 1.0])
    g2 = jnp.array([0.5, 2.0, -1.0, -1.0, -3.0, 0.3, -0.3, 0.0, 1.0])
    # same sign & smaller (+), same sign & larger (+), opposite sign, same sign & smaller (-),
    # same sign & larger (-), zero clean gradient (three ways), equal
    want = [True, False, False, True, False, False, False, False, False]
    np.testing.assert_array_equal(sharpjax.saner_mask(g, g2), want)

    params = {"w": jnp.zeros(9)}
    tx = sharpjax.saner(RHO, alpha=0.25)
    out, state = tx.update({"w": g}, tx.init(params), params, grad_fn=lambda p: {"w": g2})
    np.testing.assert_allclose(out["w"], np.where(want, 0.25, 1.0) * np.asarray(g2))
    # float32 2/9: a sum and a division, ≤ 2 roundings
    np.testing.assert_allclose(sharpjax.diagnostics(state)["masked_fraction"], 2 / 9, rtol=1e-6)


def test_saner_warmup_schedule():
    schedule = sharpjax.saner_warmup(0.5, warmup_steps=10)
    np.testing.assert_allclose(
        [schedule(0), schedule(5), schedule(10), schedule(50)], [1.0, 0.75, 0.5, 0.5]
    )


# ---------------------------------------------------------------------------------------
# mSAM.
# ---------------------------------------------------------------------------------------


def msam_step_inputs(params, batch, m):
    microbatches = sharpjax.split_microbatches(batch, m)
    grads = jax.vmap(jax.grad(cross_entropy), in_axes=(None, 0, 0))(params, *microbatches)

    def grad_fn(p, j):
        x, y = jax.tree.map(lambda a: a[j], microbatches)
        return jax.grad(cross_entropy)(p, x, y)

    return grads, grad_fn


def run_msam(params, batches, m, rho=RHO):
    tx = chain(sharpjax.msam(rho, num_microbatches=m))
    state, trajectory = tx.init(params), []

    @jax.jit
    def step(params, state, batch):
        grads, grad_fn = msam_step_inputs(params, batch, m)
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    for batch in batches:
        params, state = step(params, state, batch)
        trajectory.append(ravel_pytree(params)[0])
    return np.stack(trajectory), state


def test_msam_equals_hand_written_microbatch_loop(setup):
    params, batches = setup
    m = 4
    got, _ = run_msam(params, batches, m)

    w, _, grad = flat_loss_grad(params)
    velocity, want = jnp.zeros_like(w), []
    for x, y in batches:
        size = x.shape[0] // m
        sam_grads = []
        for j in range(m):
            part = (x[j * size : (j + 1) * size], y[j * size : (j + 1) * size])
            g_j = grad(w, part)
            sam_grads.append(grad(w + RHO * g_j / jnp.linalg.norm(g_j), part))
        velocity = MOMENTUM * velocity + sum(sam_grads) / m
        w = w - LR * velocity
        want.append(w)
    np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=trajectory_atol(STEPS))


def test_msam_with_one_microbatch_is_sam(setup):
    params, batches = setup
    got, _ = run_msam(params, batches, 1)
    want, _ = run_chain(chain(sharpjax.sam(RHO)), params, batches)
    # Same equations, another program (a vmap over one micro-batch, its sum): rounding only.
    np.testing.assert_allclose(got, want, rtol=0, atol=trajectory_atol(STEPS))


def test_msam_rejects_unstacked_gradients(setup):
    params, batches = setup
    tx = sharpjax.msam(RHO, num_microbatches=4)
    grads = jax.grad(cross_entropy)(params, *batches[0])
    with pytest.raises(ValueError, match="stacked on axis 0"):
        tx.update(grads, tx.init(params), params, grad_fn=lambda p, j: grads)


# ---------------------------------------------------------------------------------------
# Noise-resistant feedback: the integral term cancels a constant disturbance.
# ---------------------------------------------------------------------------------------

CURVATURE = jnp.array([1.0, 2.0, 4.0])
NR_LR, BIAS, MU, NR_STEPS = 0.1, 0.01, 0.05, 2000


def quadratic(p):
    return 0.5 * jnp.sum(CURVATURE * p["w"] ** 2)


def settle(tx, bias=BIAS):
    """Trains on the quadratic with ``bias`` added to the params after every step."""
    params = {"w": jnp.array([1.0, -1.0, 0.5])}

    def step(carry, _):
        params, state = carry
        grads = jax.grad(quadratic)(params)
        updates, state = tx.update(grads, state, params, grad_fn=jax.grad(quadratic))
        params = jax.tree.map(lambda w: w + bias, optax.apply_updates(params, updates))
        return (params, state), jnp.max(jnp.abs(params["w"]))

    _, distance = jax.lax.scan(step, (params, tx.init(params)), length=NR_STEPS)
    return np.asarray(distance[-200:])  # distance to the minimum over the last steps


def test_integral_feedback_returns_to_the_minimum_under_constant_bias():
    sgd = settle(optax.sgd(NR_LR))
    sam = settle(optax.chain(sharpjax.sam(RHO), optax.sgd(NR_LR)))
    integral = settle(optax.chain(sharpjax.noise_resistant(MU), optax.sgd(NR_LR)))
    # SGD settles where ∇L = bias/lr: w_i = bias / (lr h_i); SAM settles away from 0 too.
    np.testing.assert_allclose(sgd[-1], BIAS / (NR_LR * CURVATURE[0]), rtol=1e-3)
    assert sam.min() > 1e-2
    assert integral.max() < 1e-3

    # Noise-resistant SAM returns to within SAM's own oscillation without any bias.
    sam_oscillation = settle(optax.chain(sharpjax.sam(RHO), optax.sgd(NR_LR)), bias=0.0).max()
    nr_sam = settle(optax.chain(sharpjax.noise_resistant_sam(RHO, MU), optax.sgd(NR_LR)))
    assert nr_sam.max() < 1.5 * sam_oscillation < sam.min()


def test_integral_feedback_has_the_sign_that_cancels_a_bias():
    """The sign that makes the property above hold: with a constant gradient g for k steps the
    output is g (1 + μ k), growing against a persistent error (the opposite sign, g (1 − μ k),
    never returns to the minimum under a bias)."""
    tx = sharpjax.noise_resistant(MU)
    g = {"w": jnp.array([1.0, -2.0, 0.5])}
    state = tx.init(g)
    for k in range(1, 6):
        out, state = tx.update(g, state)
        np.testing.assert_allclose(out["w"], g["w"] * (1 + MU * k), rtol=1e-6)


def test_noise_resistant_equals_its_equation(setup):
    params, batches = setup
    tx = optax.chain(sharpjax.noise_resistant(MU), optax.sgd(LR))
    got, state = run_chain(tx, params, batches[:5])
    w, _, grad = flat_loss_grad(params)
    integral, want = jnp.zeros_like(w), []
    for batch in batches[:5]:
        g = grad(w, batch)
        integral = integral + g
        w = w - LR * (g + MU * integral)
        want.append(w)
    # 5 plain SGD steps, the integral term adding ≤ μ·5 = 25% to each step's weight.
    atol = 1.25 * trajectory_atol(5, momentum=0.0)
    np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=atol)
    np.testing.assert_allclose(
        sharpjax.diagnostics(state)["integral_norm"], jnp.linalg.norm(integral), rtol=1e-5
    )


# ---------------------------------------------------------------------------------------
# Diagnostics and bad input.
# ---------------------------------------------------------------------------------------


def test_vasso_reports_the_norm_of_d(setup):
    params, batches = setup
    theta = 0.4
    _, state = run_chain(chain(sharpjax.vasso(RHO, theta=theta)), params, batches[:3])
    w_traj, _ = run_chain(chain(sharpjax.vasso(RHO, theta=theta)), params, batches[:2])
    _, _unravel, grad = flat_loss_grad(params)
    # d after three steps, from the gradients at the params each step started from
    starts = [ravel_pytree(params)[0], w_traj[0], w_traj[1]]
    d = None
    for start, batch in zip(starts, batches[:3], strict=True):
        g = grad(jnp.asarray(start), batch)
        d = g if d is None else (1 - theta) * d + theta * g
    np.testing.assert_allclose(sharpjax.diagnostics(state)["d_norm"], jnp.linalg.norm(d), rtol=1e-4)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: sharpjax.vasso(theta=0.0), "theta"),
        (lambda: sharpjax.vasso(theta=1.5), "theta"),
        (lambda: sharpjax.saner(alpha=0.0), "alpha"),
        (lambda: sharpjax.saner(alpha=1.2), "alpha"),
        (lambda: sharpjax.gsam(alpha=-0.1), "alpha"),
        (lambda: sharpjax.msam(num_microbatches=0), "num_microbatches"),
        (lambda: sharpjax.noise_resistant(mu=-0.1), "mu"),
        (lambda: sharpjax.noise_resistant_sam(mu=-0.1), "mu"),
        (lambda: sharpjax.split_microbatches(jnp.zeros((10, 2)), 4), "divide"),
    ],
)
def test_bad_input_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()
