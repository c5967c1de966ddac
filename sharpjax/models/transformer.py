"""Transformer blocks (pre-LN) shared by the ViT and a small decoder-only transformer.

Every parameter is created through :func:`flax.linen.with_logical_partitioning`, so
``model.init`` returns :class:`flax.linen.LogicallyPartitioned` boxes that name each array
dimension with a *logical* axis; :mod:`sharpjax.models.partitioning` maps those names to the
mesh axes (``data``, ``fsdp``, ``model``) and unboxes the params into plain arrays. The
logical axes used here:

``embed``  the residual width          ``mlp``    the MLP hidden width
``heads``  attention heads             ``kv``     the per-head width
``vocab``  input-token vocabulary      ``classes`` output logits (classes or answer tokens)
``seq``    positions (position embeddings)
``patch_h``, ``patch_w``, ``channels``  the ViT's patch-embedding conv kernel's input dimensions

Blocks are pre-LN (Xiong et al., 2020, "On layer normalization in the transformer
architecture"; the layout of ViT and GPT-2): ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``, with a
final LayerNorm after the last block. Computation runs in ``dtype`` (``jnp.bfloat16`` for mixed
precision); the attention softmax and the LayerNorm statistics run in float32, and parameters
are ``param_dtype`` (float32).

:class:`Decoder` is the decoder-only model. The trainer's interface is classification
``(x, train=False) -> (B, num_classes)`` float32 logits: the decoder reads int tokens ``x`` of
shape ``(B, T)`` and returns the logits of the **last position** (the prediction that follows
the whole sequence, e.g. the answer after ``[a, b, =]`` in modular arithmetic);
``all_positions=True`` returns every position's logits ``(B, T, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# Xavier-uniform kernels and zero biases, as in the ViT reference code (big_vision), for both
# models; token and position embeddings N(0, 0.02²) as in ViT, BERT and GPT-2.
kernel_init = nn.initializers.xavier_uniform()
embed_init = nn.initializers.normal(stddev=0.02)
zeros = nn.initializers.zeros


def partitioned(init: Initializer, *names: str | None) -> Initializer:
    """``init`` whose output carries the logical axis ``names`` (one per array dimension)."""
    return nn.with_logical_partitioning(init, names)


def layer_norm(dtype: Any, param_dtype: Any, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm (ε = 1e-6 as in ViT) with ``embed``-annotated scale and bias."""
    return nn.LayerNorm(
        epsilon=1e-6,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(nn.initializers.ones, "embed"),
        bias_init=partitioned(zeros, "embed"),
        name=name,
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``query``/``key``/``value`` projections.

    ``query``/``key``/``value`` kernels are ``(embed, heads, kv)``, the output kernel
    ``(heads, kv, embed)``: tensor parallelism splits ``heads`` (Megatron's layout, Shoeybi et
    al., 2019), so each device holds whole heads and the only communication is the reduction
    after the output projection. Scores are ``q·k / sqrt(kv)``; with ``causal`` position ``i``
    attends to positions ``≤ i`` only.

    Attributes:
      num_heads: number of heads; must divide the input width.
      causal: mask future positions (decoder) or not (ViT encoder).
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    num_heads: int
    causal: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide the width {width}; choose a width that "
                f"is a multiple of num_heads (or num_heads a divisor of {width})."
            )
        head_dim = width // self.num_heads

        def project(name: str) -> jax.Array:
            return nn.DenseGeneral(
                (self.num_heads, head_dim),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=partitioned(kernel_init, "embed", "heads", "kv"),
                bias_init=partitioned(zeros, "heads", "kv"),
                name=name,
            )(x)

        q, k, v = project("query"), project("key"), project("value")  # (B, T, H, D)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
        # Softmax in float32: bf16 has 8 bits of mantissa, too few for exp/normalise of scores.
        scores = scores.astype(jnp.float32)
        if self.causal:
            t = x.shape[-2]
            mask = jnp.tril(jnp.ones((t, t), dtype=bool))
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return nn.DenseGeneral(
            width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=partitioned(kernel_init, "heads", "kv", "embed"),
            bias_init=partitioned(zeros, "embed"),
            name="out",
        )(out)


class MlpBlock(nn.Module):
    """``Dense(mlp_dim) → GELU → Dense(width)``; kernels ``(embed, mlp)`` and ``(mlp, embed)``."""

    mlp_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(
            self.mlp_dim,
            kernel_init=partitioned(kernel_init, "embed", "mlp"),
            bias_init=partitioned(zeros, "mlp"),
            name="fc1",
            **kw,
        )(x)
        # Exact GELU (erf), as in ViT and BERT; flax's default is the tanh approximation.
        h = nn.gelu(h, approximate=False)
        return nn.Dense(
            x.shape[-1],
            kernel_init=partitioned(kernel_init, "mlp", "embed"),
            bias_init=partitioned(zeros, "embed"),
            name="fc2",
            **kw,
        )(h)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``.

    Dropout (``dropout_rate``, default 0) after the attention and MLP outputs, active only
    with ``train=True`` (it draws from the ``"dropout"`` rng).
    """

    num_heads: int
    mlp_dim: int
    causal: bool = False
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        h = layer_norm(name="ln1", **kw)(x)
        x = x + drop(SelfAttention(self.num_heads, self.causal, name="attn", **kw)(h))
        h = layer_norm(name="ln2", **kw)(x)
        return x + drop(MlpBlock(self.mlp_dim, name="mlp", **kw)(h))


class _ScannedBlock(Block):
    """:class:`Block` in the ``(carry, x) -> (carry, y)`` form that ``nn.scan`` steps over.

    Its parameters are the block's own (``ln1``, ``attn``, ``ln2``, ``mlp``), so the scanned
    stack holds them with one leading ``layers`` axis. ``train`` is a field rather than an
    argument: ``nn.scan`` would trace an argument, and dropout needs a Python bool.
    """

    train: bool = False

    def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:  # type: ignore[override]
        return super().__call__(x, self.train), None


def run_blocks(
    x: jax.Array,
    train: bool,
    *,
    depth: int,
    num_heads: int,
    mlp_dim: int,
    causal: bool = False,
    dropout_rate: float = 0.0,
    remat: bool = False,
    scan: bool = False,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> jax.Array:
    """``depth`` :class:`Block` s applied to ``x``, created in the calling module (compact).

    ``scan=False``: blocks ``block0`` … ``block{depth-1}``, unrolled. ``scan=True``: one
    ``nn.scan`` named ``blocks`` over a stack of identical blocks, each parameter with a leading
    ``layers`` axis of size ``depth`` (``metadata_params`` adds it to the logical names; no
    partitioning rule splits it). ``remat=True`` rematerialises each block (``nn.remat``): its
    activations, and on a sharded mesh its gathered weights, are recomputed in the backward
    pass instead of kept. The function of the parameters is the same in every layout; dropout
    draws differ between the unrolled and the scanned stack (the rng is split per layer).
    """
    kw = dict(causal=causal, dropout_rate=dropout_rate, dtype=dtype, param_dtype=param_dtype)
    if not scan:
        block = nn.remat(Block, static_argnums=(2,)) if remat else Block
        for i in range(depth):
            x = block(num_heads, mlp_dim, name=f"block{i}", **kw)(x, train)
        return x
    # prevent_cse=False: the scan already keeps XLA from merging the recomputation with the
    # forward pass (flax's advice for remat inside scan).
    stage = nn.remat(_ScannedBlock, prevent_cse=False) if remat else _ScannedBlock
    stack = nn.scan(
        stage,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        length=depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = stack(num_heads, mlp_dim, train=train, name="blocks", **kw)(x, None)
    return x


def check_config(width: int, depth: int, num_heads: int, mlp_dim: int) -> None:
    """Clear errors for sizes that would otherwise fail deep inside flax or silently differ."""
    for name, value in (
        ("width", width),
        ("depth", depth),
        ("num_heads", num_heads),
        ("mlp_dim", mlp_dim),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if width % num_heads:
        raise ValueError(
            f"num_heads={num_heads} must divide width={width} (each head gets width/num_heads)."
        )


def dense_logits(
    x: jax.Array, num_classes: int, *, dtype: Any, param_dtype: Any, name: str = "head"
) -> jax.Array:
    """The output layer: ``Dense(num_classes)`` with an ``(embed, classes)`` kernel; float32."""
    logits = nn.Dense(
        num_classes,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(nn.initializers.lecun_normal(), "embed", "classes"),
        bias_init=partitioned(zeros, "classes"),
        name=name,
    )(x)
    return logits.astype(jnp.float32)


class Decoder(nn.Module):
    """Decoder-only (GPT-style) transformer over int tokens, for next-token classification.

    ``tokens (B, T)`` → token embedding + learned position embedding → ``depth`` causal pre-LN
    blocks → final LayerNorm → an **untied** output layer ``(embed, classes)`` → logits of the
    last position ``(B, num_classes)`` (or of every position with ``all_positions=True``).

    The output layer is untied from the token embedding because the two vocabularies differ in
    the classification interface: the inputs hold operand tokens plus separators (``=``), the
    outputs only the ``num_classes`` answers; Nanda et al. (2023, "Progress measures for
    grokking via mechanistic interpretability") also use separate embed/unembed matrices.
    Power et al. (2022, "Grokking") train a 2-layer, width-128, 4-head decoder: the
    ``transformer_small`` config.

    Attributes:
      num_classes: number of output logits (answer tokens).
      vocab_size: input vocabulary; ``None`` means ``num_classes + 1``: the answer tokens plus
        one separator, the layout of :func:`sharpjax.data.synthetic.make_modular_addition`
        (operands ``0..p-1``, ``=`` is token ``p``). Tokens outside ``[0, vocab_size)`` embed
        as NaN (``jnp.take``'s fill), so a mismatch shows up as a NaN loss, never silently.
      width: residual width (``embed``).
      depth: number of blocks.
      num_heads: attention heads.
      mlp_dim: MLP hidden width.
      max_len: number of learned positions; longer inputs raise.
      dropout_rate: dropout after attention/MLP (train mode only).
      remat: rematerialise each block (:func:`run_blocks`).
      scan_blocks: one ``nn.scan`` over stacked blocks (:func:`run_blocks`); with ``remat``,
        the layout for params sharded over ``fsdp`` (see :mod:`sharpjax.models.vit`).
      dtype: computation dtype (``jnp.bfloat16`` for mixed precision).
      param_dtype: parameter dtype.
    """

    num_classes: int
    vocab_size: int | None = None
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 512
    max_len: int = 64
    dropout_rate: float = 0.0
    remat: bool = False
    scan_blocks: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, all_positions: bool = False) -> jax.Array:
        check_config(self.width, self.depth, self.num_heads, self.mlp_dim)
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
            raise TypeError(
                f"Decoder reads int tokens of shape (batch, length), got dtype {x.dtype}; "
                "use a token dataset such as 'modular_addition' (or cast the tokens to int32)."
            )
        if x.ndim != 2:
            raise ValueError(f"Decoder reads tokens of shape (batch, length), got {x.shape}.")
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(
                f"sequence length {length} exceeds max_len={self.max_len}; pass a larger max_len."
            )
        vocab = self.num_classes + 1 if self.vocab_size is None else self.vocab_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Embed(
            vocab,
            self.width,
            embedding_init=partitioned(embed_init, "vocab", "embed"),
            name="embed",
            **kw,
        )(x)
        pos = self.param(
            "pos_embed", partitioned(embed_init, "seq", "embed"), (self.max_len, self.width)
        )
        h = h + pos[:length].astype(self.dtype)
        h = run_blocks(
            h,
            train,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            causal=True,
            dropout_rate=self.dropout_rate,
            remat=self.remat,
            scan=self.scan_blocks,
            **kw,
        )
        h = layer_norm(name="ln_final", **kw)(h)
        if not all_positions:
            h = h[:, -1]
        return dense_logits(h, self.num_classes, **kw)


# name → Decoder fields.
TRANSFORMER_CONFIGS: dict[str, dict[str, int]] = {
    # One block (Nanda et al. 2023 grok modular addition with one layer): CPU-sized.
    "transformer_tiny": {"width": 64, "depth": 1, "num_heads": 4, "mlp_dim": 256},
    # Power et al. (2022, "Grokking"): 2 layers, width 128, 4 heads.
    "transformer_small": {"width": 128, "depth": 2, "num_heads": 4, "mlp_dim": 512},
    # About 1.04e9 parameters with a 32,000-token vocabulary (num_classes=32000): for
    # ahead-of-time compilation from abstract shapes, not for running on a CPU.
    "transformer_1b": {
        "width": 2048,
        "depth": 18,
        "num_heads": 16,
        "mlp_dim": 8192,
        "max_len": 2048,
        "vocab_size": 32000,
    },
}
