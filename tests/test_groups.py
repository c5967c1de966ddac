"""Parameter groups against their equations, written on the flat parameter vector."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sharpjax
from tests.helpers import cross_entropy, tiny_mlp_params, toy_batches
from tests.test_core import run_chain, trajectory_atol
from tests.test_variants import RHO, chain, flat_run, gsam_out, keep_g2

# layer0's bias is left alone; layer0's kernel is one group, layer1 (kernel and bias) another.
LABELS = {
    "layer0": {"kernel": "body", "bias": None},
    "layer1": {"kernel": "head", "bias": "head"},
}
SCALES = {"body": 1.0, "head": 0.3}
STEPS = 6  # enough for VaSSO's d to carry over steps; the suite's time is tight


@pytest.fixture(scope="module")
def setup():
    params = tiny_mlp_params(jax.random.key(0))
    batches = toy_batches(jax.random.key(1), STEPS)
    return params, batches


def indicator(params, label):
    """The flat 0/1 vector of the parameters labelled ``label``."""
    tree = jax.tree.map(
        lambda p, lab: jnp.full(p.shape, float(lab == label)),
        params,
        LABELS,
        is_leaf=lambda x: x is None,
    )
    return ravel_pytree(tree)[0]


def masks(params):
    return {name: indicator(params, name) for name in SCALES}


def joint_sam_eps(m, scales):
    """ε_k = s_k ρ g_k / ‖g_S‖ with S all perturbed parameters (SAM-ON's normalisation)."""

    def perturb(w, g, state):
        perturbed = sum(m.values())
        norm = jnp.linalg.norm(g * perturbed)
        return sum(scales[k] * RHO * m[k] * g for k in m) / norm, state

    return perturb


def group_sam_eps(m, scales):
    """ε_k = s_k ρ g_k / ‖g_k‖: every group perturbed by exactly s_k ρ."""

    def perturb(w, g, state):
        return sum(scales[k] * RHO * m[k] * g / jnp.linalg.norm(m[k] * g) for k in m), state

    return perturb


def joint_asam_eps(m, eta):
    def perturb(w, g, state):
        s = sum(m.values())
        t = jnp.abs(w) + eta
        return RHO * s * t**2 * g / jnp.linalg.norm(s * t * g), state

    return perturb


def group_vasso_eps(m, scales, theta):
    """Per group: d_k its own moving average, ε_k = s_k ρ d_k/‖d_k‖."""

    def perturb(w, g, d):
        d = g if d is None else (1 - theta) * d + theta * g
        eps = sum(scales[k] * RHO * m[k] * d / jnp.linalg.norm(m[k] * d) for k in m)
        return eps, d

    return perturb


def test_trajectories_equal_the_group_equations(setup):
    params, batches = setup
    m = masks(params)
    cases = [
        (
            sharpjax.sam(RHO, groups=sharpjax.param_groups(LABELS, rho_scale=SCALES)),
            joint_sam_eps(m, SCALES),
            keep_g2,
        ),
        (
            sharpjax.sam(RHO, groups=sharpjax.param_groups(LABELS, rho_scale=SCALES, norm="group")),
            group_sam_eps(m, SCALES),
            keep_g2,
        ),
        (
            sharpjax.asam(RHO, eta=0.01, groups=sharpjax.param_groups(LABELS)),
            joint_asam_eps(m, 0.01),
            keep_g2,
        ),
        (
            sharpjax.vasso(
                RHO,
                theta=0.4,
                groups=sharpjax.param_groups(LABELS, rho_scale=SCALES, norm="group"),
            ),
            group_vasso_eps(m, SCALES, 0.4),
            keep_g2,
        ),
        # GSAM's combination reads g and g₂ on every parameter; only ε is restricted.
        (
            sharpjax.gsam(RHO, alpha=0.3, groups=sharpjax.param_groups(LABELS)),
            joint_sam_eps(m, {"body": 1.0, "head": 1.0}),
            gsam_out(0.3),
        ),
    ]
    for transformation, perturb, combine in cases:
        got, _ = run_chain(chain(transformation), params, batches)
        want = flat_run(params, batches, perturb, combine)
        np.testing.assert_allclose(got, want, rtol=0, atol=trajectory_atol(STEPS))


def test_unperturbed_parameters_stay_exactly_where_they_are(setup):
    params, batches = setup
    x, y = batches[0]
    seen = {}

    def grad_fn(p):
        seen["point"] = p
        return jax.grad(cross_entropy)(p, x, y)

    tx = sharpjax.saner(RHO, groups=sharpjax.param_groups(LABELS))
    grads = jax.grad(cross_entropy)(params, x, y)
    tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    # layer0's bias is unperturbed: bit-identical; the others moved.
    np.testing.assert_array_equal(seen["point"]["layer0"]["bias"], params["layer0"]["bias"])
    assert not np.allclose(seen["point"]["layer1"]["bias"], params["layer1"]["bias"])


def test_one_group_of_everything_is_sam(setup):
    params, batches = setup
    everything = sharpjax.param_groups(lambda p: jax.tree.map(lambda _: "all", p))
    for norm in ("joint", "group"):
        groups = sharpjax.param_groups(everything.labels, norm=norm)
        got, _ = run_chain(chain(sharpjax.sam(RHO, groups=groups)), params, batches)
        want, _ = run_chain(chain(sharpjax.sam(RHO)), params, batches)
        np.testing.assert_allclose(got, want, rtol=0, atol=trajectory_atol(STEPS))


def resnet_param_shapes():
    import sharpjax.models  # the flax models (not imported by `import sharpjax`)

    model = sharpjax.models.get_model("resnet18", num_classes=10)
    x = jnp.zeros((1, 32, 32, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]


def flat_labels(labels_fn, params):
    tree = labels_fn(params)
    items = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: x is None)
    return {jax.tree_util.keystr(p): lab for p, lab in items}


def test_presets_on_resnet18_paths():
    params = resnet_param_shapes()
    norm = flat_labels(sharpjax.normalization_layers(), params)
    weights = flat_labels(sharpjax.no_bias_or_norm(), params)
    for path, label in norm.items():
        assert label == ("BatchNorm" in path), path
        assert weights[path] == ("BatchNorm" not in path and not path.endswith("['bias']")), path
    assert any(norm.values()) and any(weights.values())
    layers = flat_labels(sharpjax.layerwise(), params)
    assert layers["['Dense_0']['kernel']"] == layers["['Dense_0']['bias']"] == "Dense_0"


def test_mup2_scales_each_layer_by_the_spectral_condition(setup):
    params, batches = setup
    x, y = batches[0]
    seen = {}

    def grad_fn(p):
        seen["eps"] = jax.tree.map(jnp.subtract, p, params)
        return jax.grad(cross_entropy)(p, x, y)

    tx = sharpjax.sam(RHO, groups=sharpjax.mup2())
    grads = jax.grad(cross_entropy)(params, x, y)
    tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    # layer0 kernel (5, 8): √(8/5); layer1 kernel (8, 3): √(3/8); biases of n: √n.
    want = {
        ("layer0", "kernel"): math.sqrt(8 / 5),
        ("layer1", "kernel"): math.sqrt(3 / 8),
        ("layer0", "bias"): math.sqrt(8),
        ("layer1", "bias"): math.sqrt(3),
    }
    for (layer, name), scale in want.items():
        norm = float(jnp.linalg.norm(seen["eps"][layer][name]))
        np.testing.assert_allclose(norm, RHO * scale, rtol=1e-5)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda p: sharpjax.param_groups({"layer0": LABELS["layer0"]}),
            ValueError,
            "labels must have the params' structure",
        ),
        (
            lambda p: sharpjax.param_groups(LABELS, rho_scale={"body": 1.0}),
            ValueError,
            r"rho_scale gives no ρ scale for the group\(s\) \['head'\]",
        ),
        (
            lambda p: sharpjax.param_groups(LABELS, rho_scale={**SCALES, "neck": 1.0}),
            ValueError,
            "no parameter is labelled with",
        ),
        (
            lambda p: sharpjax.param_groups(LABELS, rho_scale={"body": -1.0, "head": 1.0}),
            ValueError,
            r"rho_scale\['body'\] must be finite and lie in \[0.0, inf\)",
        ),
        (
            lambda p: sharpjax.param_groups(LABELS, rho_scale={"body": float("nan"), "head": 1}),
            ValueError,
            r"rho_scale\['body'\] must be finite",
        ),
        (
            lambda p: sharpjax.param_groups(LABELS, rho_scale={"body": optax.constant_schedule(1)}),
            TypeError,
            "give the transformation a ρ schedule instead",
        ),
        (lambda p: sharpjax.param_groups(LABELS, norm="layer"), ValueError, "norm must be one of"),
        (
            lambda p: sharpjax.param_groups(jax.tree.map(lambda _: None, p)),
            ValueError,
            "labels perturb no parameter",
        ),
        (
            lambda p: sharpjax.param_groups(jax.tree.map(lambda _: jnp.ones(2), p)),
            TypeError,
            "a label must be a hashable Python value",
        ),
        (lambda p: sharpjax.param_groups(LABELS, rho_scale=[1.0]), TypeError, "dict"),
    ],
)
def test_bad_groups_raise(setup, make, error, match):
    params, _ = setup
    with pytest.raises(error, match=match):
        groups = make(params)
        sharpjax.sam(RHO, groups=groups).init(params)


def test_groups_compose_with_microbatches(setup):
    """m-sharpness with groups: each micro-batch's ε is zero on the unperturbed leaf."""
    params, batches = setup
    x, y = batches[0]
    micro = jax.tree.map(lambda a: a.reshape(2, -1, *a.shape[1:]), (x, y))
    grads = jax.vmap(jax.grad(cross_entropy), in_axes=(None, 0, 0))(params, *micro)
    tx = sharpjax.sam(
        RHO,
        num_microbatches=2,
        microbatch_execution="parallel",
        groups=sharpjax.param_groups(LABELS),
    )
    for pick in range(2):
        # "g₂" = micro-batch `pick`'s ε, zero for the other: the output is ε_pick / 2.
        def grad_fn(p, j, pick=pick):
            return jax.tree.map(lambda q, w: jnp.where(j == pick, q - w, 0.0), p, params)

        out, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
        eps = jax.tree.map(lambda o: 2 * o, out)
        np.testing.assert_array_equal(eps["layer0"]["bias"], 0.0)
        np.testing.assert_allclose(optax.global_norm(eps), RHO, rtol=1e-5)
        # ε_pick is along micro-batch pick's own gradient (joint norm over the labelled leaves)
        g = grads["layer1"]["kernel"][pick]
        cos = jnp.vdot(eps["layer1"]["kernel"], g) / (
            jnp.linalg.norm(eps["layer1"]["kernel"]) * jnp.linalg.norm(g)
        )
        np.testing.assert_allclose(cos, 1.0, rtol=1e-5)
