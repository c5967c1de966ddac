"""ViT and decoder transformer: a NumPy re-implementation of the forward pass, the patch
embedding as reshape + matmul, causality, published parameter counts from abstract init,
bf16 compute, logical partitioning specs and unboxing, and a few SGD steps lowering the loss."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, Mesh, PartitionSpec
from scipy.special import erf

from sharpjax.data import load_dataset, make_modular_addition, make_synthetic_cifar
from sharpjax.models import get_model
from sharpjax.models import partitioning as part
from sharpjax.models.vit import PatchEmbed

EPS32 = float(np.finfo(np.float32).eps)

# Micro sizes: every code path of the named configs, a fraction of the compile time.
VIT = dict(width=16, depth=2, num_heads=2, mlp_dim=24)
DEC = dict(width=16, depth=2, num_heads=2, mlp_dim=24)


def jittered(variables, seed=0, scale=0.3):
    """Random variables shaped like ``variables`` (abstract, from ``jax.eval_shape``), filled
    with NumPy (compiling ``model.init`` costs more than the tests): kernels N(0, 1/fan_in),
    LayerNorm scales 1 + N(0, scale²), and biases, class token, embeddings N(0, scale²), so
    every term enters non-zero and the reference comparison checks where each one enters."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        leaf = path[-1].key
        if leaf == "kernel":
            value = rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1]))
        elif leaf == "scale":
            value = 1 + scale * rng.standard_normal(s.shape)
        else:
            value = scale * rng.standard_normal(s.shape)
        return jnp.asarray(value, jnp.float32)

    return {"params": jax.tree_util.tree_map_with_path(fill, part.unbox(variables["params"]))}


# ---------------------------------------------------------------------------------------
# A plain NumPy (float64) transformer: the equations, written without flax.
# ---------------------------------------------------------------------------------------


def np_layer_norm(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def np_attention(x, p, causal):
    """x (T, W); kernels (W, H, D) for q/k/v and (H, D, W) for the output."""
    q, k, v = (np.einsum("tw,whd->thd", x, p[n]["kernel"]) + p[n]["bias"] for n in "qkv")
    heads, dim = q.shape[1], q.shape[2]
    out = np.zeros_like(q)
    for h in range(heads):
        s = q[:, h] @ k[:, h].T / math.sqrt(dim)
        if causal:
            s = np.where(np.tri(len(x), dtype=bool), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (w / w.sum(-1, keepdims=True)) @ v[:, h]
    return np.einsum("thd,hdw->tw", out, p["o"]["kernel"]) + p["o"]["bias"]


def np_block(x, p, causal):
    attn = {"q": p["attn"]["query"], "k": p["attn"]["key"], "v": p["attn"]["value"]}
    attn["o"] = p["attn"]["out"]
    x = x + np_attention(np_layer_norm(x, p["ln1"]), attn, causal)
    h = np_layer_norm(x, p["ln2"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    h = 0.5 * h * (1 + erf(h / math.sqrt(2)))  # exact GELU
    return x + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


def np_patches(x, patch):
    """(B, H, W, C) → (B, H/p * W/p, p*p*C), patches in row-major order, pixels (row, col, c)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def np_vit(params, x, patch, depth):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    kernel = p["patch_embed"]["kernel"]
    tokens = np_patches(np.asarray(x, np.float64), patch) @ kernel.reshape(-1, kernel.shape[-1])
    tokens = tokens + p["patch_embed"]["bias"]
    out = []
    for t in tokens:
        t = np.concatenate([p["cls_token"][None], t]) + p["pos_embed"]
        for i in range(depth):
            t = np_block(t, p[f"block{i}"], causal=False)
        out.append(np_layer_norm(t, p["ln_final"])[0] @ p["head"]["kernel"] + p["head"]["bias"])
    return np.stack(out)


def np_decoder(params, tokens, depth):
    """Per-position logits (B, T, K)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    out = []
    for seq in np.asarray(tokens):
        t = p["embed"]["embedding"][seq] + p["pos_embed"][: len(seq)]
        for i in range(depth):
            t = np_block(t, p[f"block{i}"], causal=True)
        out.append(np_layer_norm(t, p["ln_final"]) @ p["head"]["kernel"] + p["head"]["bias"])
    return np.stack(out)


def assert_close_to_reference(got, ref):
    # float32 against float64 through ~10 matmul/normalise stages with sums of <= 48 terms:
    # each stage adds a relative rounding of a few hundred eps at most.
    tol = 500 * EPS32 * (1 + np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=0, atol=tol)


def test_vit_forward_equals_numpy_reference():
    model = get_model("vit_micro", 5, **VIT, patch_size=4)
    x = jax.random.normal(jax.random.key(1), (2, 8, 12, 3))  # non-square: 2x3 patches
    variables = jittered(jax.eval_shape(model.init, jax.random.key(0), x))
    got = jax.jit(model.apply)(variables, x)
    assert got.shape == (2, 5) and got.dtype == jnp.float32
    assert_close_to_reference(got, np_vit(variables["params"], x, patch=4, depth=2))


def test_decoder_forward_equals_numpy_reference_at_every_position():
    model = get_model("transformer_tiny", 7, **DEC)  # vocab 8: tokens 0..7
    tokens = jax.random.randint(jax.random.key(1), (3, 5), 0, 8)
    variables = jittered(jax.eval_shape(model.init, jax.random.key(0), tokens))

    @jax.jit
    def run(variables, tokens):
        return model.apply(variables, tokens), model.apply(variables, tokens, all_positions=True)

    last, every = run(variables, tokens)
    ref = np_decoder(variables["params"], tokens, depth=2)
    assert last.shape == (3, 7) and every.shape == (3, 5, 7)
    assert_close_to_reference(every, ref)
    # The classification interface is the last position's logits (up to the rounding of a
    # differently shaped head matmul: 16-term dot products).
    tol = 16 * EPS32 * (1 + np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(last), np.asarray(every[:, -1]), rtol=0, atol=tol)


@pytest.mark.parametrize(("shape", "patch"), [((2, 8, 8, 1), 2), ((2, 32, 32, 3), 4)])
def test_patch_embedding_is_reshape_and_matmul(shape, patch):
    model = get_model("vit_micro", 10, **VIT)
    x = jax.random.normal(jax.random.key(2), shape)
    params = jittered(jax.eval_shape(model.init, jax.random.key(0), x))["params"]["patch_embed"]
    # The ViT's default patch for the image: 2 for 8x8 digits, 4 for 32x32 CIFAR.
    assert params["kernel"].shape == (patch, patch, shape[-1], VIT["width"])
    got = jax.jit(PatchEmbed(VIT["width"], patch).apply)({"params": params}, x)
    patches = np_patches(np.asarray(x, np.float64), patch)
    w = np.asarray(params["kernel"], np.float64).reshape(-1, VIT["width"])
    ref = patches @ w + np.asarray(params["bias"])
    assert got.shape == ref.shape  # (B, patches in row-major order, width)
    # A K-term float32 dot product errs by at most K eps sum|a_i b_i| (plus the bias add).
    bound = (patches.shape[-1] + 1) * EPS32 * (np.abs(patches) @ np.abs(w) + 1)
    assert np.all(np.abs(np.asarray(got, np.float64) - ref) <= bound)


def test_decoder_is_causal():
    model = get_model("transformer_tiny", 11, **DEC)
    tokens = jnp.array([[1, 2, 3, 4, 5, 11]], jnp.int32)
    variables = jittered(jax.eval_shape(model.init, jax.random.key(0), tokens))
    changed = tokens.at[0, 3].set(9)  # position 3 changes
    per_position = jax.jit(lambda t: model.apply(variables, t, all_positions=True))
    a, b = np.asarray(per_position(tokens)), np.asarray(per_position(changed))
    # Earlier positions' masked attention weights are exact zeros: bit-identical outputs.
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    # Position 3 and every later one sees the change.
    assert all(np.abs(a[0, t] - b[0, t]).max() > 1e-3 for t in range(3, 6))


@pytest.mark.parametrize(
    ("dataset", "model", "options"),
    [
        ("digits", "vit_micro", None),
        ("synthetic_cifar", "vit_micro", {"num_train": 20, "num_test": 10}),
        ("modular_addition", "transformer_tiny", {"p": 7}),
    ],
)
def test_models_read_the_offline_datasets(dataset, model, options):
    # The dataset gives the rank the model reads (images NHWC, int tokens (N, T)), and the
    # model maps it to num_classes float32 logits; traced only.
    ds = load_dataset(dataset, options=options)
    net = get_model(model, ds.num_classes)
    x = ds.x_train[:2]
    out = jax.eval_shape(lambda x: net.apply(net.init(jax.random.key(0), x), x), x)
    assert out.shape == (2, ds.num_classes) and out.dtype == jnp.float32


def test_decoder_refuses_float_inputs_and_long_sequences():
    net = get_model("transformer_tiny", 7)
    with pytest.raises(TypeError, match="int tokens"):
        jax.eval_shape(net.init, jax.random.key(0), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="max_len=64"):
        jax.eval_shape(net.init, jax.random.key(0), jnp.ones((1, 65), jnp.int32))


def test_vit_refuses_a_patch_that_does_not_divide_the_image():
    net = get_model("vit_micro", 7, patch_size=3)
    with pytest.raises(ValueError, match="patch_size=3 must divide the image sides 8x8"):
        jax.eval_shape(net.init, jax.random.key(0), jnp.ones((1, 8, 8, 1)))


def test_dropout_only_in_train_mode():
    tokens = jnp.array([[1, 2, 3, 7], [4, 5, 6, 7]], jnp.int32)
    one_block = {**DEC, "depth": 1}
    plain = get_model("transformer_tiny", 7, **one_block)
    drop = get_model("transformer_tiny", 7, **one_block, dropout_rate=0.5)
    variables = jittered(jax.eval_shape(plain.init, jax.random.key(0), tokens))

    @jax.jit
    def run(v, t):
        rng = lambda i: {"dropout": jax.random.key(i)}
        return (
            plain.apply(v, t),
            drop.apply(v, t, train=False),
            drop.apply(v, t, train=True, rngs=rng(1)),
            drop.apply(v, t, train=True, rngs=rng(2)),
        )

    reference, evaluated, train1, train2 = map(np.asarray, run(variables, tokens))
    np.testing.assert_array_equal(evaluated, reference)  # eval: dropout is the identity
    assert np.abs(train1 - train2).max() > 1e-3 and np.abs(train1 - reference).max() > 1e-3


def test_vit_gap_pooling_has_no_class_token():
    model = get_model("vit_micro", 4, **VIT, pool="gap")
    x = jnp.ones((2, 8, 8, 1))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    params = part.unbox(variables["params"])
    assert "cls_token" not in params and params["pos_embed"].shape == (16, VIT["width"])
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 4)


def vit_count(width, depth, mlp, patch, image, channels, classes):
    """ViT parameters from the architecture, term by term."""
    tokens = (image // patch) ** 2 + 1  # patches + class token
    block = (
        2 * (2 * width)  # two LayerNorms (scale, bias)
        + 4 * (width * width + width)  # query, key, value, out projections
        + (width * mlp + mlp)  # MLP in
        + (mlp * width + width)  # MLP out
    )
    return (
        patch * patch * channels * width
        + width  # patch embedding conv
        + width  # class token
        + tokens * width  # position embeddings
        + depth * block
        + 2 * width  # final LayerNorm
        + width * classes
        + classes  # head
    )


def decoder_count(width, depth, mlp, vocab, max_len, classes):
    block = 2 * (2 * width) + 4 * (width * width + width) + (width * mlp + mlp)
    block += mlp * width + width
    return vocab * width + max_len * width + depth * block + 2 * width + width * classes + classes


def n_params(model, x):
    """Parameter count from abstract init: traced shapes only, nothing allocated."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return sum(math.prod(p.shape) for p in jax.tree.leaves(part.unbox(shapes)))


@pytest.mark.parametrize(
    ("name", "arch", "published"),
    [
        # timm vit_{tiny,small,base}_patch16_224, 1000 classes.
        ("vit_ti", (192, 12, 768), 5_717_416),
        ("vit_s", (384, 12, 1536), 22_050_664),
        ("vit_b", (768, 12, 3072), 86_567_656),  # "86M" of Dosovitskiy et al., Table 1
    ],
)
def test_vit_parameter_counts_at_224(name, arch, published):
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    count = n_params(get_model(name, 1000), x)
    width, depth, mlp = arch
    assert count == vit_count(width, depth, mlp, 16, 224, 3, 1000) == published


def test_vit_s_on_cifar_and_decoder_counts():
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    assert n_params(get_model("vit_s", 10), x) == vit_count(384, 12, 1536, 4, 32, 3, 10)
    tokens = jax.ShapeDtypeStruct((1, 3), jnp.int32)
    small = n_params(get_model("transformer_small", 97), tokens)
    assert small == decoder_count(128, 2, 512, vocab=98, max_len=64, classes=97)
    big = n_params(get_model("transformer_1b", 32000), tokens)
    assert big == decoder_count(2048, 18, 8192, vocab=32000, max_len=2048, classes=32000)
    assert 1.0e9 < big < 1.1e9


@pytest.mark.parametrize("name", ["vit_micro", "transformer_tiny"])
def test_bfloat16_compute_float32_params_and_logits(name):
    model = get_model(name, 10, dtype=jnp.bfloat16)
    x = jnp.ones((2, 8, 8, 1)) if name.startswith("vit") else jnp.ones((2, 3), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(part.unbox(variables)))
    logits = jax.eval_shape(model.apply, variables, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    jaxpr = jax.make_jaxpr(model.apply)(variables, x)
    kinds = ("dot_general", "conv_general_dilated")
    dots = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name in kinds]
    # Every matmul and the patch conv, the head included, takes bf16 operands.
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


def _all_eqns(jaxpr):
    """Equations of ``jaxpr`` and of the jaxprs nested in it (jnp.einsum is a jitted call)."""
    for e in jaxpr.eqns:
        yield e
        for value in e.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


# ---------------------------------------------------------------------------------------
# Partitioning.
# ---------------------------------------------------------------------------------------


def boxed_params(name, x, **kwargs):
    return jax.eval_shape(get_model(name, 10, **kwargs).init, jax.random.key(0), x)["params"]


def test_every_parameter_is_annotated_with_one_name_per_dimension():
    for name, x in [
        ("vit_micro", jnp.ones((1, 8, 8, 1))),
        ("transformer_tiny", jnp.ones((1, 3), jnp.int32)),
    ]:
        boxed = boxed_params(name, x)
        leaves = jax.tree.leaves(boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
        assert leaves and all(isinstance(b, nn.LogicallyPartitioned) for b in leaves)
        assert all(len(b.names) == b.value.ndim for b in leaves)


def test_partition_specs_name_the_intended_mesh_axes():
    vit = part.param_partition_specs(boxed_params("vit_micro", jnp.ones((1, 8, 8, 1))))
    block = vit["block0"]
    assert block["mlp"]["fc1"]["kernel"] == PartitionSpec("fsdp", "model")
    assert block["mlp"]["fc1"]["bias"] == PartitionSpec("model")
    assert block["mlp"]["fc2"]["kernel"] == PartitionSpec("model", "fsdp")
    for qkv in ("query", "key", "value"):
        assert block["attn"][qkv]["kernel"] == PartitionSpec("fsdp", "model", None)
    assert block["attn"]["out"]["kernel"] == PartitionSpec("model", None, "fsdp")
    assert block["ln1"]["scale"] == PartitionSpec("fsdp")
    assert vit["patch_embed"]["kernel"] == PartitionSpec(None, None, None, "fsdp")
    assert vit["pos_embed"] == PartitionSpec(None, "fsdp")
    assert vit["head"]["kernel"] == PartitionSpec("fsdp", None)
    dec = part.param_partition_specs(boxed_params("transformer_tiny", jnp.ones((1, 3), "int32")))
    assert dec["embed"]["embedding"] == PartitionSpec("model", "fsdp")
    # The batch is split over every axis but `model`.
    assert nn.logical_to_mesh_axes(("batch", "embed"), part.LOGICAL_AXIS_RULES) == PartitionSpec(
        ("data", "fsdp"), None
    )


def test_specs_follow_the_mesh_axes_and_replicate_what_does_not_divide():
    boxed = boxed_params("vit_micro", jnp.ones((1, 8, 8, 1)), num_heads=2, width=12)
    # heads=2 on model=4 does not divide; width 12 on fsdp=2 does.
    mesh = AbstractMesh((1, 2, 4), part.MESH_AXES)
    specs = part.param_partition_specs(boxed, mesh)
    assert specs["block0"]["attn"]["query"]["kernel"] == PartitionSpec("fsdp", None, None)
    assert specs["block0"]["mlp"]["fc1"]["kernel"] == PartitionSpec("fsdp", "model")  # 64 / 4
    notes = part.undivided_dimensions(boxed, mesh)
    assert notes and all("not divisible" in n for n in notes)
    assert any("['block0']['attn']['query']['kernel']" in n for n in notes)
    # A data-only mesh replicates every parameter.
    data_only = part.param_partition_specs(boxed, AbstractMesh((8,), ("data",)))
    assert all(
        s == PartitionSpec(*[None] * len(s))
        for s in jax.tree.leaves(data_only, is_leaf=lambda s: isinstance(s, PartitionSpec))
    )
    with pytest.raises(ValueError, match="mesh axes \\['tp'\\] are not known"):
        part.param_partition_specs(boxed, AbstractMesh((2,), ("tp",)))


def test_init_params_on_a_mesh_equal_model_init_unboxed():
    model = get_model("transformer_tiny", 7, **{**DEC, "depth": 1})
    tokens = jnp.array([[1, 2, 7], [3, 0, 7]], jnp.int32)
    key = jax.random.key(3)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), part.MESH_AXES)
    params, specs = part.init_params(model, key, tokens, mesh)
    boxed = jax.jit(model.init)(key, tokens)["params"]  # flax's own init, boxed
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    assert not any(is_box(x) for x in jax.tree.leaves(params, is_leaf=is_box))
    jax.tree.map(np.testing.assert_array_equal, params, part.unbox(boxed))
    assert specs == part.param_partition_specs(boxed, mesh)
    # Each array is laid out as its spec says.
    is_spec = lambda x: isinstance(x, PartitionSpec)
    jax.tree.map(
        lambda p, s: p.sharding.spec == s or pytest.fail(f"{p.sharding} != {s}"),
        params,
        specs,
        is_leaf=is_spec,
    )


# ---------------------------------------------------------------------------------------
# Learning: a few SGD steps on the generated tasks lower the loss.
# ---------------------------------------------------------------------------------------


def sgd_losses(model, x, y, steps, lr):
    # Filled host-side from abstract init (compiling init would cost more than the steps).
    params = jittered(jax.eval_shape(model.init, jax.random.key(0), x[:1]), scale=0.02)["params"]
    tx = optax.sgd(lr, momentum=0.9)

    def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    # steps + 1 calls: the last loss is the one after `steps` updates (one compiled step).
    state, losses = tx.init(params), []
    for _ in range(steps + 1):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return losses


def test_sgd_lowers_the_loss_on_modular_addition():
    x, y, _, _ = make_modular_addition(p=11, train_fraction=0.5)
    losses = sgd_losses(get_model("transformer_tiny", 11, width=32, mlp_dim=64), x, y, 15, 0.1)
    assert losses[-1] < losses[0]


def test_sgd_lowers_the_loss_on_synthetic_cifar():
    x, y, _, _ = make_synthetic_cifar(num_train=64, num_test=1, max_shift=0, noise_std=1.0)
    x = (x - x.mean()) / x.std()
    losses = sgd_losses(get_model("vit_micro", 10, **VIT), x, jnp.asarray(y), 10, 0.05)
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------
# Rematerialised and scanned blocks: the same function of the same parameters.
# ---------------------------------------------------------------------------------------


def stack_blocks(p, depth):
    """The plain tree with block0..block{depth-1} stacked along a leading `layers` axis."""
    rest = {k: v for k, v in p.items() if not k.startswith("block")}
    blocks = [p[f"block{i}"] for i in range(depth)]
    return {**rest, "blocks": jax.tree.map(lambda *b: jnp.stack(b), *blocks)}


@pytest.mark.parametrize(
    "name, variants",
    [
        (
            "vit_micro",
            [{"remat": True}, {"scan_blocks": True}, {"scan_blocks": True, "remat": True}],
        ),
        ("transformer_tiny", [{"scan_blocks": True, "remat": True}]),
    ],
)
def test_remat_and_scanned_blocks_give_the_plain_loss_and_gradients(name, variants):
    if name == "vit_micro":
        sizes, x = {**VIT, "patch_size": 4}, jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
    else:
        sizes, x = DEC, jax.random.randint(jax.random.key(1), (3, 5), 0, 6)
    y = jnp.array([0, 4, 2])
    plain = get_model(name, 5, **sizes)
    params = jittered(jax.eval_shape(plain.init, jax.random.key(0), x))["params"]

    def loss_and_grad(model, p):
        def loss(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return jax.jit(jax.value_and_grad(loss))(p)

    ref_loss, ref_grad = loss_and_grad(plain, params)
    for options in variants:
        model = get_model(name, 5, **sizes, **options)
        scan = options.get("scan_blocks", False)
        p = stack_blocks(params, sizes["depth"]) if scan else params
        # The scanned tree is the plain one stacked: same leaves, one leading axis of `depth`.
        boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
        assert jax.tree.map(jnp.shape, part.unbox(boxed)) == jax.tree.map(jnp.shape, p), options
        loss, grad = loss_and_grad(model, p)
        # The same float32 operations in the same order, only fused or scheduled differently
        # (and recomputed under remat): each side is within the reference test's bound of the
        # exact value (500 eps relative to the largest magnitude), so they are within twice it.
        np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1000 * EPS32 * (1 + abs(ref_loss)))
        want = stack_blocks(ref_grad, sizes["depth"]) if scan else ref_grad
        for g, w in zip(jax.tree.leaves(grad), jax.tree.leaves(want), strict=True):
            tol = 1000 * EPS32 * (1 + float(jnp.abs(w).max()))
            np.testing.assert_allclose(g, w, rtol=0, atol=tol, err_msg=str(options))
        # Under scan each block's annotations gain the `layers` axis, which no rule splits.
        if scan:
            specs = part.param_partition_specs(boxed)
            assert specs["blocks"]["mlp"]["fc1"]["kernel"] == PartitionSpec(None, "fsdp", "model")
