"""GGN and empirical-Fisher operators and per-layer measures against dense float64 references.

The references are written out here: ``G = (1/n) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` from the
full Jacobian ``jax.jacobian`` of a tiny ReLU net's logits, ``F = (1/n) Σ_i g_i g_iᵀ`` from
its per-example gradients, and the diagonal blocks of the dense ``jax.hessian``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sharpjax import sharpness
from tests.test_sharpness_nets import flatten, net_case, unflatten_like, x64  # noqa: F401

TOL = 1e-9  # float64, a few hundred operations per entry


class Dense:
    def __init__(self, kind: str):
        case = net_case(kind)
        net = self.net = case.net
        self.H = case.H
        flat, unravel = ravel_pytree(net.params)
        logits = lambda w: net.logits_fn(unravel(w), net.x)
        J = np.asarray(jax.jacobian(logits)(flat))  # (n, K, d)
        p = np.asarray(jax.nn.softmax(logits(flat)))
        H_out = np.stack([np.diag(q) - np.outer(q, q) for q in p])
        n = p.shape[0]
        self.G = np.einsum("nkd,nkl,nle->de", J, H_out, J) / n

        def losses(w):
            log_p = jax.nn.log_softmax(logits(w))
            return -log_p[jnp.arange(n), net.y]

        g = np.asarray(jax.jacobian(losses)(flat))  # (n, d) per-example gradients
        self.F = g.T @ g / n
        self.loss = sharpness.SoftmaxCrossEntropy(net.logits_fn)
        self.batches = [(net.x, net.y)]


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def dense(request, x64):  # noqa: F811
    return Dense(request.param)


@pytest.fixture(scope="module")
def mlp(x64):  # noqa: F811
    return Dense("mlp")


def test_ggn_and_fisher_products_match_dense(dense):
    net = dense.net
    v = np.random.default_rng(0).normal(size=dense.G.shape[0])
    tree = unflatten_like(net.params, v)
    ggn = flatten(sharpness.ggn_vector_product(net.logits_fn, net.params, tree, (net.x, net.y)))
    fisher = flatten(
        sharpness.fisher_vector_product(net.logits_fn, net.params, tree, (net.x, net.y))
    )
    np.testing.assert_allclose(ggn, dense.G @ v, rtol=TOL, atol=TOL * np.abs(dense.G @ v).max())
    np.testing.assert_allclose(fisher, dense.F @ v, rtol=TOL, atol=TOL * np.abs(dense.F @ v).max())
    # The three operators differ on this net: the test could tell them apart.
    assert np.abs(dense.G - dense.F).max() > 1e-3 * np.abs(dense.G).max()
    assert np.abs(dense.G - dense.H).max() > 1e-3 * np.abs(dense.G).max()


def test_ggn_product_over_batches_is_example_weighted(mlp):
    net = mlp.net
    v = unflatten_like(net.params, np.random.default_rng(1).normal(size=mlp.G.shape[0]))
    parts = [(net.x[:5], net.y[:5]), (net.x[5:], net.y[5:])]
    whole = flatten(sharpness.ggn_vector_product(net.logits_fn, net.params, v, (net.x, net.y)))
    split = flatten(sharpness.ggn_vector_product(net.logits_fn, net.params, v, parts))
    np.testing.assert_allclose(split, whole, rtol=TOL, atol=TOL * np.abs(whole).max())


def test_ggn_diagonal_equals_the_exact_hessian_diagonal_on_relu_nets(dense):
    # Two code paths that share nothing: JᵀH_outJ products on unit vectors, and
    # hessian_diagonal's per-example factorisation; on a piecewise-linear net both equal diag H.
    net = dense.net
    d = dense.G.shape[0]
    products = jax.vmap(
        lambda e: flatten_jax(
            sharpness.ggn_vector_product(
                net.logits_fn, net.params, unflatten_jax(net.params, e), (net.x, net.y)
            )
        )
    )(jnp.eye(d))
    ggn_diag = np.diag(np.asarray(products))
    exact = flatten(sharpness.hessian_diagonal(net.logits_fn, net.params, (net.x, net.y)))
    scale = np.abs(exact).max()
    np.testing.assert_allclose(ggn_diag, exact, atol=TOL * scale)
    np.testing.assert_allclose(ggn_diag, np.diag(dense.H), atol=TOL * scale)


def flatten_jax(tree):
    return ravel_pytree(tree)[0]


def unflatten_jax(params, flat):
    return ravel_pytree(params)[1](flat)


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_eigenvalues_trace_and_density_of_ggn_and_fisher(mlp, curvature):
    C = mlp.G if curvature == "ggn" else mlp.F
    net, d = mlp.net, C.shape[0]
    kw = dict(curvature=curvature, batches=mlp.batches)
    values = sharpness.top_eigenvalues(mlp.loss, net.params, jax.random.key(0), 3, d, **kw).value
    expected = np.linalg.eigvalsh(C)[::-1][:3]
    np.testing.assert_allclose(values, expected, rtol=1e-7)
    # Hutch++ is exact once its sketch (num_samples // 3 columns) spans the space.
    trace = sharpness.hessian_trace(mlp.loss, net.params, jax.random.key(1), 3 * d, "hutch++", **kw)
    np.testing.assert_allclose(trace.value, np.trace(C), rtol=1e-8)
    # With d Lanczos steps the Ritz values are C's eigenvalues, and the default grid spans
    # [θ_min − 6σ, θ_max + 6σ]: both operators are positive semi-definite, unlike the Hessian
    # of the same net (so a Hessian product in their place would fail here).
    assert np.linalg.eigvalsh(mlp.H)[0] < -1e-3 * expected[0]
    sigma = 1e-3 * expected[0]
    grid, density, *_ = sharpness.spectral_density(
        mlp.loss, net.params, jax.random.key(2), d, sigma=sigma, num_points=4000, **kw
    )
    np.testing.assert_allclose(grid[-1] - 6 * sigma, expected[0], rtol=1e-6)
    assert grid[0] + 6 * sigma > -1e-8 * expected[0]
    np.testing.assert_allclose(np.trapezoid(density, grid), 1, atol=1e-3)


def _blocks(params) -> dict[str, slice]:
    """Top-level entries as slices of ravel_pytree's vector (dict keys in sorted order)."""
    out, start = {}, 0
    for name in sorted(params):
        size = ravel_pytree(params[name])[0].size
        out[name] = slice(start, start + size)
        start += size
    return out


def test_per_layer_eigenvalues_and_trace_match_dense_blocks(mlp):
    net, H = mlp.net, mlp.H
    blocks = _blocks(net.params)
    assert len(blocks) == 3
    largest = max(s.stop - s.start for s in blocks.values())
    values = sharpness.top_eigenvalues(
        net.loss, net.params, jax.random.key(0), 2, largest, True, per_layer=True
    )
    traces = sharpness.hessian_trace(
        net.loss, net.params, jax.random.key(1), 3 * largest, "hutch++", per_layer=True
    )
    assert set(values) == set(traces) == set(blocks)
    for name, s in blocks.items():
        block = H[s, s]
        eig, vec = values[name].value, values[name].eigenvectors
        np.testing.assert_allclose(eig, np.linalg.eigvalsh(block)[::-1][:2], rtol=1e-7)
        assert jax.tree.structure(vec) == jax.tree.structure(net.params[name])
        V = np.concatenate([np.asarray(a).reshape(2, -1) for a in jax.tree.leaves(vec)], 1)
        np.testing.assert_allclose(
            V @ block, np.asarray(eig)[:, None] * V, atol=1e-6 * abs(float(eig[0]))
        )
        np.testing.assert_allclose(traces[name].value, np.trace(block), rtol=1e-8)
    # The blocks are not the whole story: H has off-diagonal blocks.
    off = H[blocks["Dense_0"], blocks["Dense_1"]]
    assert np.abs(off).max() > 1e-3


def test_bad_curvature_arguments_are_clear_errors(mlp):
    net = mlp.net
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="Unknown curvature"):
        sharpness.hessian_trace(net.loss, net.params, key, curvature="kfac")
    with pytest.raises(TypeError, match="SoftmaxCrossEntropy"):
        sharpness.top_eigenvalues(net.loss, net.params, key, curvature="ggn")
    with pytest.raises(TypeError, match="batches="):
        sharpness.spectral_density(mlp.loss, net.params, key, curvature="fisher")
    with pytest.raises(ValueError, match="top-level entries"):
        sharpness.hessian_trace(lambda w: jnp.sum(w**2), jnp.ones(3), key, per_layer=True)
    with pytest.raises(ValueError, match="of block 'Dense_2'"):
        sharpness.top_eigenvalues(net.loss, net.params, key, 20, 40, per_layer=True)


def test_ggn_and_fisher_quadratic_forms_under_jit_in_float32():
    # Regression: XLA:CPU miscompiled an equivalent form of the GGN's pᵀJv reduction under
    # jit for 13+ probes on a trained float32 MLP of digits (rows off by up to 20x). Many
    # probes, float32, jitted, against the same rows computed one probe at a time.
    from sklearn.datasets import load_digits

    from sharpjax.sharpness import _batches
    from sharpjax.sharpness._batches import BatchLoss
    from sharpjax.sharpness.curvature import Operator

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        data = load_digits()
        x = jnp.asarray(data.data[:256] / 16.0, jnp.float32)
        y = jnp.asarray(data.target[:256], jnp.int32)
        rng = np.random.default_rng(0)
        params = {
            "a": {"w": jnp.asarray(rng.normal(size=(64, 32)) / 8, jnp.float32)},
            "b": {"w": jnp.asarray(rng.normal(size=(32, 10)) / 6, jnp.float32)},
        }
        logits_fn = lambda p, x: jax.nn.relu(x @ p["a"]["w"]) @ p["b"]["w"]
        ce = sharpness.SoftmaxCrossEntropy(logits_fn)
        for _ in range(50):  # a partly trained net: confident, unequal softmax outputs
            params = jax.tree.map(lambda w, g: w - 0.5 * g, params, jax.grad(ce)(params, (x, y)))
        V = jax.tree.map(
            lambda w: jax.random.rademacher(jax.random.key(0), (20, *w.shape), jnp.float32), params
        )
        traced = _batches.trace_loss(ce, params, (x, y))
        for curvature in ("ggn", "fisher"):
            op = Operator(curvature, quadratic=True)
            batched = np.asarray(_batches._on_batch_jit(op, *traced, params, (x, y), V))
            probe = lambda i: jax.tree.map(lambda v: v[i : i + 1], V)
            one = np.asarray([op(BatchLoss(ce, (x, y)), params, probe(i))[0] for i in range(20)])
            np.testing.assert_allclose(batched, one, rtol=1e-4)
    finally:
        jax.config.update("jax_enable_x64", previous)
