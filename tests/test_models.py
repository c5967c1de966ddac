"""Models: shapes, parameter counts against published figures, BatchNorm state, dtypes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharpjax.models import MODELS, get_model


def fake_variables(model, x, seed=0):
    """Variables shaped by ``model.init`` (traced only), filled host-side with NumPy.

    Compiling ``model.init`` means compiling threefry for every initializer, which costs
    5-20 s of CPU per model here, far more than the forward pass under test. The fill mirrors
    the initializers: kernels ~ N(0, 1/fan_in), BatchNorm scale/var 1, bias/mean 0.
    """
    rng = np.random.default_rng(seed)

    def fill(path, s):
        leaf = path[-1].key
        if leaf == "kernel":
            fan_in = math.prod(s.shape[:-1])
            return jnp.asarray(rng.normal(size=s.shape) / math.sqrt(fan_in), s.dtype)
        return jnp.ones(s.shape, s.dtype) if leaf in ("scale", "var") else jnp.zeros(s.shape)

    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def n_params(model, shape):
    """Parameter count without running anything (jax.eval_shape traces shapes only)."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
    return sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    ("name", "kwargs", "classes", "expected", "rel"),
    [
        # kuangliu/pytorch-cifar ResNet18: 11,173,962 parameters.
        ("resnet18", {}, 10, 11_173_962, 0.01),
        # Zagoruyko & Komodakis (2016), "Wide Residual Networks": WRN-16-8 11.0M, WRN-28-10 36.5M.
        ("wrn16_8", {}, 10, 11.0e6, 0.01),
        ("wrn28_10", {}, 10, 36.5e6, 0.01),
        # LeNet-5 on 28x28 with SAME padding: conv 156 + 2416, dense 784*120+120,
        # 120*84+84, 84*10+10.
        ("lenet", {}, 10, 156 + 2416 + 784 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10, 0),
    ],
)
def test_parameter_counts(name, kwargs, classes, expected, rel):
    shape = (1, 28, 28, 1) if name == "lenet" else (1, 32, 32, 3)
    assert n_params(get_model(name, classes, **kwargs), shape) == pytest.approx(expected, rel=rel)


def test_mlp_parameter_count_and_layout():
    model = get_model("mlp", 10, hidden_sizes=(32, 16))
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    # Top-level Dense_i holding kernel/bias in forward order (layer-wise measures rely on it).
    assert list(params) == ["Dense_0", "Dense_1", "Dense_2"]
    assert [params[k]["kernel"].shape for k in params] == [(64, 32), (32, 16), (16, 10)]
    assert all(set(v) == {"kernel", "bias"} for v in params.values())


@pytest.mark.parametrize(
    ("name", "kwargs", "shape", "layers"),
    [
        ("mlp", {"hidden_sizes": (16,)}, (3, 8, 8, 1), ["Dense_0", "Dense_1"]),
        ("lenet", {}, (3, 8, 8, 1), ["Conv_0", "Conv_1", "Dense_0", "Dense_1", "Dense_2"]),
        ("lenet", {}, (3, 28, 28, 1), ["Conv_0", "Conv_1", "Dense_0", "Dense_1", "Dense_2"]),
        ("lenet", {}, (3, 32, 32, 3), ["Conv_0", "Conv_1", "Dense_0", "Dense_1", "Dense_2"]),
        ("cnn1d", {}, (3, 40, 1), ["Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1"]),
    ],
)
def test_small_models_forward(name, kwargs, shape, layers):
    model = get_model(name, 7, **kwargs)
    x = jax.random.normal(jax.random.key(0), shape)

    variables = fake_variables(model, x)
    assert list(variables) == ["params"]  # no BatchNorm state
    assert list(variables["params"]) == layers
    # One compiled program rather than op-by-op dispatch: cheaper on a busy CPU.
    logits = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, x)
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
    assert jnp.all(jnp.isfinite(logits))


def test_cnn1d_accepts_2d_sequences():
    model = get_model("cnn1d", 10)
    out = jax.eval_shape(
        lambda x: model.apply(model.init(jax.random.key(0), x), x), jnp.ones((2, 40))
    )
    assert out.shape == (2, 10)


def test_cnn1d_batch_norm_normalises_and_sam_on_finds_it():
    import sharpjax

    model = get_model("cnn1d", 10, features=(4,), hidden_sizes=(), batch_norm=True)
    x = 3.0 + 5.0 * jax.random.normal(jax.random.key(0), (16, 40, 1))
    variables = model.init(jax.random.key(1), x)
    params = variables["params"]
    assert set(params) == {"Conv_0", "BatchNorm_0", "Dense_0"}
    assert set(params["Conv_0"]) == {"kernel"}  # BatchNorm's shift replaces the conv bias
    # In train mode the conv output is standardised per channel over batch and length (scale 1,
    # shift 0 at init): checked through the running statistics it feeds, (1 - 0.9) x batch's.
    _, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    h = jax.lax.conv_general_dilated(
        x, params["Conv_0"]["kernel"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
    )
    stats = state["batch_stats"]["BatchNorm_0"]
    assert jnp.allclose(stats["mean"], 0.1 * h.mean((0, 1)), rtol=1e-4, atol=1e-5)
    assert jnp.allclose(stats["var"], 0.9 + 0.1 * h.var((0, 1)), rtol=1e-4)
    # SAM-ON's preset labels the BatchNorm scale and bias, nothing else.
    labels = sharpjax.sam_on().labels(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(labels)}
    assert {k for k, v in flat.items() if v not in (None, False)} == {
        "['BatchNorm_0']['bias']",
        "['BatchNorm_0']['scale']",
    }


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("resnet18", {"width": 1 / 16}), ("wrn16_8", {"depth": 10, "widen_factor": 1})],
)
def test_batchnorm_models_train_and_eval(name, kwargs):
    # Narrow variants on 8x8 inputs: same code paths (strided stages, projection
    # shortcuts), a fraction of the CPU cost.
    model = get_model(name, 10, **kwargs)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))

    variables = fake_variables(model, x)

    @jax.jit  # one compilation for train and eval: keeps the test set fast on CPU
    def run(variables, x):
        logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, updates, model.apply(variables, x, train=False)

    logits, updates, eval_logits = run(variables, x)
    assert set(variables) == {"params", "batch_stats"}
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    old, new = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates["batch_stats"])
    assert len(old) == len(new) and any(
        not jnp.allclose(a, b) for a, b in zip(old, new, strict=False)
    )
    assert eval_logits.shape == (4, 10)
    # Eval uses running averages, train the batch statistics: outputs differ.
    assert not jnp.allclose(eval_logits, logits)


def test_resnet_width_multiplier():
    narrow = get_model("resnet18", 10, width=0.125)
    params = jax.eval_shape(lambda: narrow.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert params["params"]["Dense_0"]["kernel"].shape == (64, 10)  # 512 * 1/8 channels


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("mlp", {"hidden_sizes": (8,)}, (2, 8, 8, 1)),
        ("lenet", {}, (2, 8, 8, 1)),
        ("cnn1d", {}, (2, 40, 1)),
        ("resnet18", {"width": 1 / 16}, (2, 8, 8, 3)),
        ("wrn16_8", {"depth": 10, "widen_factor": 1}, (2, 8, 8, 3)),
    ],
)
def test_bfloat16_compute_float32_params_and_logits(name, kwargs, shape):
    # Traced, not run (eval_shape / make_jaxpr): dtypes are decided at trace time.
    model = get_model(name, 10, dtype=jnp.bfloat16, **kwargs)
    x = jnp.ones(shape)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    logits = jax.eval_shape(model.apply, variables, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    # The computation itself runs in bfloat16: the convs/matmuls take bf16 operands.
    jaxpr = jax.make_jaxpr(model.apply)(variables, x)
    dots = [e for e in jaxpr.eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


def test_bn_axis_name_averages_across_devices():
    # vmap with an axis name stands in for pmap/shard_map: with bn_axis_name set, the batch
    # statistics are averaged over the mapped axis, so both "devices" get identical updates.
    model = get_model("resnet18", 4, width=1 / 32, stage_sizes=(1,), bn_axis_name="dev")
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 3))  # 2 "devices" x 3 examples
    variables = fake_variables(model, x[0])

    @jax.jit
    def stats_per_device(variables, x):
        step = lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"])[1]
        return jax.vmap(step, axis_name="dev")(x)["batch_stats"]

    stats = stats_per_device(variables, x)
    for leaf in jax.tree.leaves(stats):
        assert jnp.allclose(leaf[0], leaf[1], atol=1e-6)


def test_get_model_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="unknown model") as err:
        get_model("vgg16", 10)
    assert all(name in str(err.value) for name in MODELS)
