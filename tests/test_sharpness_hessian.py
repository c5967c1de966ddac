"""HVP, trace, Lanczos and adaptive sharpness against dense jax.hessian references."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharpjax import sharpness
from tests.test_sharpness_nets import flatten, net_case, unflatten_like, x64  # noqa: F401


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def case(request, x64):  # noqa: F811
    return net_case(request.param)


@pytest.fixture(scope="module")
def mlp(x64):  # noqa: F811
    return net_case("mlp")


def test_hvp_matches_dense_hessian(case):
    net, loss, H = case.net, case.loss, case.H
    v = np.random.default_rng(1).normal(size=H.shape[0])
    out = flatten(sharpness.hvp(loss, net.params, unflatten_like(net.params, v)))
    np.testing.assert_allclose(out, H @ v, rtol=1e-10, atol=1e-12)


def test_top_eigenvalues_match_eigvalsh(case):
    net, loss, H = case.net, case.loss, case.H
    result = sharpness.top_eigenvalues(
        loss, net.params, jax.random.key(0), k=3, num_iterations=40, return_eigenvectors=True
    )
    values, vectors = result.value, result.eigenvectors
    expected = np.linalg.eigvalsh(H)[::-1][:3]
    np.testing.assert_array_less(np.abs(values - expected) / np.abs(expected), 1e-3)
    assert jax.tree.structure(vectors) == jax.tree.structure(net.params)
    V = np.concatenate([np.asarray(a).reshape(3, -1) for a in jax.tree.leaves(vectors)], axis=1)
    np.testing.assert_allclose(np.linalg.norm(V, axis=1), 1, rtol=1e-8)
    residual = np.linalg.norm(V @ H - values[:, None] * V, axis=1)
    np.testing.assert_array_less(residual, 0.05 * np.abs(values))
    # The residual the recurrence reports (β_m |e_mᵀ s_j|, no product) is the true one: equal
    # in exact arithmetic; in float64 to rounding times ‖H‖ over the ~40 reorthogonalised steps.
    assert result.num_iterations == 40
    np.testing.assert_allclose(result.residual, residual, rtol=1e-6, atol=1e-9 * np.abs(H).max())


def test_hutchinson_converges(mlp):
    net, loss, H = mlp.net, mlp.loss, mlp.H
    exact = np.trace(H)
    errors = {
        m: np.mean(
            [
                abs(sharpness.hessian_trace(loss, net.params, jax.random.key(s), m).value - exact)
                for s in range(8)
            ]
        )
        for m in (12, 600)
    }
    # Hutchinson's standard deviation with m probes is sqrt(2 (‖H‖_F² − Σ H_jj²) / m).
    sd = np.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)) / 600)
    assert errors[600] < errors[12] / 3
    assert errors[600] < 3 * sd


def pair_coupled_quadratic(c, b):
    """``L(w) = ½ Σ_j c_j w_j² + b w_0 w_1``: ``H = diag(c)`` plus ``b`` at (0, 1) and (1, 0).

    For a Rademacher probe, ``vᵀHv = Σ_j c_j v_j² + 2b v_0 v_1 = tr H + 2b s`` with
    ``s = v_0 v_1 = ±1`` exactly (each ``v_j² = 1``), so Hutchinson's per-probe values take
    only the two values ``tr H ± 2b``.
    """
    c = jnp.asarray(c)
    return lambda p: 0.5 * jnp.sum(c * p["w"] ** 2) + b * p["w"][0] * p["w"][1]


@pytest.mark.parametrize("m", [7, 16])
def test_hutchinson_is_exact_on_a_diagonal_hessian(x64, m):  # noqa: F811
    """Every probe gives vᵀHv = tr H: the mean of m equal values is tr H (dividing by m − 1
    would give tr H · m/(m − 1)), and their sample standard deviation is 0."""
    c = np.arange(1.0, 11.0) / 3
    params = {"w": jnp.zeros(10)}
    estimate = sharpness.hessian_trace(pair_coupled_quadratic(c, 0.0), params, jax.random.key(3), m)
    np.testing.assert_allclose(estimate.value, c.sum(), rtol=1e-14)
    assert abs(float(estimate.std_error)) <= 1e-14 * c.sum()


@pytest.mark.parametrize("m", [7, 16])
def test_hutchinson_value_and_std_error_from_two_valued_probes(x64, m):  # noqa: F811
    """With per-probe values tr H + 2b s_i (s_i = ±1), the estimate must be tr H + 2b s̄ with
    m s̄ an integer of m's parity, and the standard error the sample std over √m:
    std_error = 2b √((1 − s̄²)/(m − 1)). A wrong divisor of the mean moves the value off that
    lattice; a population std (ddof=0) gives a factor √((m − 1)/m)."""
    c, b = np.linspace(0.5, 3.0, 10), 0.3
    params = {"w": jnp.zeros(10)}
    estimate = sharpness.hessian_trace(pair_coupled_quadratic(c, b), params, jax.random.key(5), m)
    s_mean = (float(estimate.value) - c.sum()) / (2 * b)
    count = s_mean * m  # Σ s_i = (#agreeing − #disagreeing) probes
    assert abs(count - round(count)) < 1e-9 and round(count) % 2 == m % 2, count
    assert abs(round(count)) < m, "all probes agree: pick a key that mixes both signs"
    s_mean = round(count) / m
    expected = 2 * b * np.sqrt((1 - s_mean**2) / (m - 1))
    np.testing.assert_allclose(estimate.std_error, expected, rtol=1e-12)


def test_hutchpp_is_exact_when_the_sketch_covers_a_low_rank_hessian(x64):  # noqa: F811
    """rank H = 3 ≤ k = m // 3: HS spans range(H), so the deflated residual (I − QQᵀ)H(I − QQᵀ)
    is 0 and tr(QᵀHQ) = tr H, whatever the probes; the residual's std error is 0."""
    d, rank = 20, 3
    U = np.random.default_rng(2).normal(size=(d, rank))
    A = jnp.asarray(U @ np.diag([5.0, 2.0, 0.7]) @ U.T)
    loss = lambda p: 0.5 * p["w"] @ A @ p["w"]
    params = {"w": jnp.zeros(d)}
    for m in (9, 13):  # k = 3 and 4 (a rank-deficient sketch)
        estimate = sharpness.hessian_trace(loss, params, jax.random.key(m), m, "hutch++")
        scale = float(np.sum(np.abs(np.linalg.eigvalsh(np.asarray(A)))))
        np.testing.assert_allclose(estimate.value, np.trace(A), rtol=1e-12)
        assert abs(float(estimate.std_error)) <= 1e-12 * scale


def test_hutchpp_is_exact_once_the_sketch_spans_the_space(mlp):
    net, loss, H = mlp.net, mlp.loss, mlp.H
    budget = 3 * H.shape[0]  # a sketch of d columns
    estimate = sharpness.hessian_trace(loss, net.params, jax.random.key(0), budget, "hutch++")
    np.testing.assert_allclose(estimate.value, np.trace(H), rtol=1e-9)


def test_hutchpp_beats_hutchinson_on_decaying_spectrum(x64):  # noqa: F811
    d = 60
    Q = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))[0]
    A = jnp.asarray(Q @ np.diag(10 * 0.8 ** np.arange(d)) @ Q.T)
    loss = lambda w: 0.5 * w["w"] @ A @ w["w"]
    params = {"w": jnp.zeros(d)}
    exact = float(np.trace(A))

    def mean_error(method):
        trace = partial(sharpness.hessian_trace, loss, params, num_samples=30, method=method)
        return np.mean([abs(trace(jax.random.key(s)).value - exact) for s in range(20)])

    assert mean_error("hutch++") < 0.5 * mean_error("hutchinson")


def test_spectral_density_integrates_to_one_near_eigenvalues(mlp):
    net, loss, H = mlp.net, mlp.loss, mlp.H
    eigenvalues = np.linalg.eigvalsh(H)
    d = H.shape[0]
    grid, density, *_ = sharpness.spectral_density(
        loss, net.params, jax.random.key(0), num_iterations=d, num_probes=2
    )
    spacing = float(grid[1] - grid[0])
    assert abs(np.sum(density) * spacing - 1) < 1e-3
    # Default broadening: 1% of the spread; with a full Krylov space the nodes are eigenvalues.
    sigma = 0.01 * (eigenvalues[-1] - eigenvalues[0])
    near = np.min(np.abs(np.asarray(grid)[:, None] - eigenvalues[None]), axis=1) < 4 * sigma
    assert np.sum(density[near]) * spacing > 0.99


def test_spectral_density_first_moment_is_trace_over_dimension(mlp):
    net, loss, H = mlp.net, mlp.loss, mlp.H
    d, probes = H.shape[0], 24
    grid, density, *_ = sharpness.spectral_density(
        loss, net.params, jax.random.key(1), num_iterations=20, num_probes=probes
    )
    spacing = float(grid[1] - grid[0])
    mean = float(np.sum(grid * density) * spacing)
    # vᵀHv/‖v‖² for Gaussian v has variance ≈ 2 Σ(λ − λ̄)² / d²; average of `probes` of them.
    eigenvalues = np.linalg.eigvalsh(H)
    sd = np.sqrt(2 * np.sum((eigenvalues - eigenvalues.mean()) ** 2) / (d**2 * probes))
    assert abs(mean - np.trace(H) / d) < 4 * sd


N_AVERAGE = 2000  # one compilation for both adaptive tests


def test_adaptive_average_matches_plain_monte_carlo(mlp):
    net, loss = mlp.net, mlp.loss
    rho, n = 0.1, N_AVERAGE
    result = sharpness.adaptive_sharpness(
        loss, net.params, rho, "average", key=jax.random.key(0), num_samples=N_AVERAGE
    )
    flat = flatten(net.params)
    noise = np.random.default_rng(1).normal(size=(n, flat.size))
    perturbed = mlp.losses(np.concatenate([flat[None], flat + rho * np.abs(flat) * noise]))
    diffs = np.asarray(perturbed[1:]) - float(perturbed[0])
    assert abs(result.value - diffs.mean()) < 4 * np.hypot(
        result.std_error, diffs.std() / np.sqrt(n)
    )
    assert result.delta is None


def test_adaptive_worst_case_bounds_and_constraint(mlp):
    net, loss = mlp.net, mlp.loss
    rho = 0.1
    worst = sharpness.adaptive_sharpness(loss, net.params, rho, "worst")
    flat = flatten(net.params)
    scale = np.abs(flat)
    delta = flatten(worst.delta)
    assert np.linalg.norm(delta[scale > 0] / scale[scale > 0]) <= rho * (1 + 1e-9)
    assert np.all(delta[scale == 0] == 0)
    # Random feasible perturbations on the boundary of the ball.
    u = np.random.default_rng(0).normal(size=(64, flat.size))
    gammas = rho * u / np.linalg.norm(u, axis=1, keepdims=True)
    values = np.asarray(mlp.losses(np.concatenate([[flat, flat + delta], flat + scale * gammas])))
    np.testing.assert_allclose(worst.value, values[1] - values[0])
    assert worst.value >= np.max(values[2:] - values[0])
    # A Gaussian of the same expected squared radius (std rho/√d in the rescaled variable).
    radius = rho / np.sqrt(flat.size)
    average = sharpness.adaptive_sharpness(
        loss, net.params, radius, "average", key=jax.random.key(1), num_samples=N_AVERAGE
    )
    assert worst.value >= average.value + 3 * average.std_error
