"""Lanczos with full reorthogonalisation: top Hessian eigenvalues and spectral density."""

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sharpjax.sharpness._batches import DatasetLoss, evaluate
from sharpjax.sharpness._validate import positive_int, positive_number
from sharpjax.sharpness.hvp import hvp_rows

PyTree = Any


def _orthogonalise(w: jax.Array, V: jax.Array) -> jax.Array:
    # Twice is enough ("twice is enough", Parlett): one Gram-Schmidt pass loses orthogonality
    # in floating point once w has mostly been cancelled. Unfilled rows of V are zero.
    for _ in range(2):
        w = w - V.T @ (V @ w)
    return w


@jax.jit
def _lanczos_step(i, w, V, alphas, betas, scale):
    """Record ``α_i = v_iᵀ w`` (``w = H v_i``) and append the next basis vector.

    Jitted on its own so that the streaming (Python-loop) path compiles it once.
    On breakdown (an invariant subspace is exhausted) the next vector is the coordinate axis
    least represented in the basis, orthogonalised, with a zero coupling, so ``T`` stays exact
    for the eigenvalues. (While the basis spans fewer than d dimensions, some axis keeps a
    component outside it.)
    """
    v = V[i]
    alpha = jnp.vdot(v, w)
    w = _orthogonalise(w, V)
    beta = jnp.linalg.norm(w)
    scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
    ok = beta > 10 * jnp.finfo(w.dtype).eps * scale

    def restart():
        axis = jnp.argmin(jnp.sum(V**2, axis=0))
        r = _orthogonalise(jnp.zeros_like(w).at[axis].set(1), V)
        return r / jnp.linalg.norm(r)

    v_next = jax.lax.cond(ok, lambda: w / beta, restart)
    return (
        V.at[i + 1].set(v_next, mode="drop"),
        alphas.at[i].set(alpha),
        betas.at[i].set(jnp.where(ok, beta, 0)),
        scale,
    )


def _lanczos(
    matvec: Callable[[jax.Array], jax.Array],
    v0: jax.Array,
    num_iterations: int,
    fori_loop: Callable,
) -> tuple[jax.Array, jax.Array]:
    """``m`` Lanczos steps from ``v0``; returns the tridiagonal ``T`` and the basis ``V`` (m, d)."""
    m, d = num_iterations, v0.shape[0]
    V = jnp.zeros((m, d), v0.dtype).at[0].set(v0 / jnp.linalg.norm(v0))

    def body(i, carry):
        V = carry[0]
        return _lanczos_step(i, matvec(V[i]), *carry)

    zeros = jnp.zeros(m, v0.dtype)
    V, alphas, betas, _ = fori_loop(m, body, (V, zeros, zeros, jnp.zeros((), v0.dtype)))
    T = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    return T, V


def _krylov_size(params: PyTree, num_iterations: int) -> tuple[int, int]:
    positive_int("num_iterations", num_iterations)
    d = ravel_pytree(params)[0].size
    # A Krylov space cannot exceed the dimension.
    return d, min(num_iterations, d)


def _matvec(loss: DatasetLoss, params: PyTree) -> Callable[[jax.Array], jax.Array]:
    return lambda v: loss.accumulate(hvp_rows, params, v[None])[0]


def top_eigenvalues(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    key: jax.Array,
    k: int = 1,
    num_iterations: int = 50,
    return_eigenvectors: bool = False,
    *,
    batches: Iterable | None = None,
) -> jax.Array | tuple[jax.Array, PyTree]:
    """The ``k`` algebraically largest Hessian eigenvalues by Lanczos, descending.

    Lanczos with full reorthogonalisation on the flattened parameter vector
    (``jax.flatten_util.ravel_pytree``): ``num_iterations`` HVPs build the Krylov basis ``V`` and
    tridiagonal ``T = V H Vᵀ``; the Ritz values (eigenvalues of ``T``) converge to the extreme
    eigenvalues of ``H`` first (Golub & Van Loan §10.1; as used by Ghorbani et al., ICML 2019,
    and Yao et al.'s PyHessian, 2020). ``num_iterations`` (default 50) is clipped to the
    parameter count, where Lanczos is exact.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, or ``loss_fn(params, batch)`` with ``batches``.
      params: any pytree.
      key: PRNG key for the starting vector.
      k: number of eigenvalues (default 1); at most the parameter count and ``num_iterations``.
      num_iterations: Lanczos steps = HVPs (default 50).
      return_eigenvectors: also return the unit Ritz vectors.
      batches: optional re-iterable of batches (each Lanczos step reads all of them).

    Returns:
      ``eigenvalues`` of shape ``(k,)``, or ``(eigenvalues, eigenvectors)`` where
      ``eigenvectors`` has the structure of ``params`` with a leading axis of size ``k``.
    """
    positive_int("k", k)
    d, m = _krylov_size(params, num_iterations)
    if k > d:
        raise ValueError(f"k={k} exceeds the number of parameters ({d}); pass a smaller k.")
    if k > m:
        raise ValueError(f"num_iterations={num_iterations} must be >= k={k}; raise num_iterations.")
    return evaluate(
        _top_eigenvalues, loss_fn, batches, params, key, k=k, m=m, vectors=return_eigenvectors
    )


def _top_eigenvalues(
    loss: DatasetLoss, params: PyTree, key: jax.Array, *, k: int, m: int, vectors: bool
) -> jax.Array | tuple[jax.Array, PyTree]:
    flat, unravel = ravel_pytree(params)
    v0 = jax.random.normal(key, flat.shape, flat.dtype)
    T, V = _lanczos(_matvec(loss, params), v0, m, loss.fori_loop)
    theta, Y = jnp.linalg.eigh(T)
    eigenvalues = theta[::-1][:k]
    if not vectors:
        return eigenvalues
    vectors = Y[:, ::-1][:, :k].T @ V
    return eigenvalues, jax.vmap(unravel)(vectors)


def spectral_density(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    key: jax.Array,
    num_iterations: int = 90,
    num_probes: int = 1,
    grid: jax.Array | None = None,
    num_points: int = 1000,
    sigma: float | jax.Array | None = None,
    *,
    batches: Iterable | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ).

    For each Gaussian probe ``v`` (normalised), ``m`` Lanczos steps give Ritz values ``θ_j`` and
    weights ``τ_j = (e_1ᵀ y_j)²``, a Gauss quadrature of ``vᵀ f(H) v``; the density is their
    Gaussian-broadened average (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao, ICML 2019,
    who use m = 90 and one probe, the defaults here):

        ρ(t) = (1/P) Σ_p Σ_j τ_pj N(t; θ_pj, σ²),   ∫ ρ = 1,   E ∫ t ρ(t) dt = tr(H) / d.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, or ``loss_fn(params, batch)`` with ``batches``.
      params: any pytree.
      key: PRNG key for the probes.
      num_iterations: Lanczos steps per probe (default 90, clipped to the parameter count).
      num_probes: number of probes ``P`` (default 1); cost ``P · m`` HVPs.
      grid: points where the density is evaluated; default ``num_points`` equally spaced points
        from ``θ_min − 6σ`` to ``θ_max + 6σ``, so the density integrates to 1 on it. A grid
        that does not cover that range loses the mass outside it.
      num_points: size of the default grid (default 1000).
      sigma: broadening (standard deviation); default 1% of ``θ_max − θ_min``.
      batches: optional re-iterable of batches (each Lanczos step reads all of them).

    Returns:
      ``(grid, density)``, e.g. for ``plt.semilogy(grid, density)``.
    """
    positive_int("num_probes", num_probes)
    positive_int("num_points", num_points)
    if sigma is not None:
        positive_number("sigma", sigma)
    _, m = _krylov_size(params, num_iterations)
    return evaluate(
        _spectral_density,
        loss_fn,
        batches,
        params,
        key,
        grid,
        sigma,
        m=m,
        num_probes=num_probes,
        num_points=num_points,
    )


def _spectral_density(
    loss: DatasetLoss,
    params: PyTree,
    key: jax.Array,
    grid: jax.Array | None,
    sigma: jax.Array | None,
    *,
    m: int,
    num_probes: int,
    num_points: int,
) -> tuple[jax.Array, jax.Array]:
    flat, _ = ravel_pytree(params)
    matvec = _matvec(loss, params)
    probes = jax.random.normal(key, (num_probes, flat.size), flat.dtype)

    def quadrature(v0):
        theta, Y = jnp.linalg.eigh(_lanczos(matvec, v0, m, loss.fori_loop)[0])
        return theta, Y[0] ** 2

    if loss.streaming:
        nodes, weights = map(jnp.stack, zip(*map(quadrature, probes), strict=True))
    else:
        nodes, weights = jax.vmap(quadrature)(probes)
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    if sigma is None:
        spread = hi - lo
        sigma = 0.01 * jnp.where(spread > 0, spread, jnp.maximum(jnp.abs(hi), 1))
    if grid is None:
        grid = jnp.linspace(lo - 6 * sigma, hi + 6 * sigma, num_points)
    grid = jnp.asarray(grid)
    gauss = jnp.exp(-0.5 * ((grid[:, None] - nodes.ravel()[None]) / sigma) ** 2)
    density = gauss @ weights.ravel() / (num_probes * sigma * jnp.sqrt(2 * jnp.pi))
    return grid, density
