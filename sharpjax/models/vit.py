"""Vision Transformer (Dosovitskiy et al., ICLR 2021, "An image is worth 16x16 words").

``image (B, H, W, C)`` → patch embedding (a ``patch_size`` × ``patch_size`` conv with stride
``patch_size``: one linear map per non-overlapping patch) → prepend a learned class token → add
learned position embeddings → ``depth`` pre-LN blocks (:class:`~sharpjax.models.transformer.Block`)
→ final LayerNorm → the class token's features → a linear head → float32 logits.

Pooling: the **class token**, as in ViT and DeiT, so that ``vit_ti``/``vit_s``/``vit_b`` at
224 px with 1000 classes have exactly the published parameter counts (5,717,416 / 22,050,664 /
86,567,656, e.g. timm's ``vit_*_patch16_224``) and the sharpness results on ViTs (Chen et al.,
ICLR 2022, "When vision transformers outperform ResNets without pre-training or strong data
augmentations") are for this architecture. ``pool="gap"`` (global average of the patch tokens,
no class token; Beyer et al., 2022, "Better plain ViT baselines for ImageNet-1k") is offered as
well. The head is one Dense layer (the "MLP head" of fine-tuning; the pre-training tanh layer
is not used, as in DeiT and timm).

The configs (``get_model`` names) follow Dosovitskiy et al. / DeiT (Touvron et al., 2021):

=========  =====  =====  =====  ====
name       width  depth  heads  MLP
=========  =====  =====  =====  ====
vit_micro  32     2      2      64     (tests and CPU smoke runs)
vit_ti     192    12     3      768
vit_s      384    12     6      1536
vit_b      768    12     12     3072
=========  =====  =====  =====  ====

``patch_size=None`` (the default) picks the patch from the image side: 16 for images of at
least 128 px (ViT-*/16 at 224: 14×14 = 196 patches), 4 from 16 px (32×32 CIFAR: 8×8 = 64
patches), 2 below (8×8 digits: 4×4 = 16 patches, each 2×2 pixels; a 16-pixel token is about
as much as a small image can give one token while leaving the attention a sequence to work
on). ``model_kwargs`` override it (``{"patch_size": 8}``). Both image sides must be multiples
of the patch size.

**Parameters sharded over ``fsdp``: use** ``scan_blocks=True, remat=True`` (trainer:
``--model_kwargs='{"scan_blocks": true, "remat": true}'``). GSPMD gathers each sharded weight
where it is used; with the blocks unrolled it keeps every gathered weight alive from the forward
to the backward pass, so a device holds about one whole parameter copy in temporaries whatever
the shard count. Inside a scan each iteration works on one block's slice of the stacked
weights, and with remat the backward iteration recomputes that block's forward instead of
keeping it, so only one block's gathered values are alive at a time (the layout of MaxText and
other JAX FSDP trainers). Which values GSPMD gathers is its own choice: in the step below no
kernel is ever whole on a device; it gathers each block's activations over the batch instead
(8 × 65 tokens, less than a 384 × 1536 kernel). XLA's per-device
plan (``memory_analysis``, arguments + temporaries) of the SAM step of ViT-S (depth 12, 32×32
images, batch 8) on 8 devices, in parameter copies (1 = 85.4 MB):

==================  ===========  =========  =====
blocks              ``data=8``   ``fsdp=8``  ratio
==================  ===========  =========  =====
unrolled (default)  4.01         1.84       0.46
remat               4.00         2.42       0.60
scan                5.01         1.92       0.38
scan + remat        4.34         0.73       0.17
==================  ===========  =========  =====

Remat alone does not help (GSPMD still holds the gathered weights); it takes both. The
ratio depends on the batch: at batch 64 (8 images per device) scan + remat gives 0.50, with
whole-batch activations in the temporaries (2.11 copies); a sharding constraint holding each
block's input split over the batch brings it to 0.24 in the same measurement, but it needs the
step traced under ``jax.set_mesh``, which the trainer does not do yet, so it is not here. Both
default to ``False``: with replicated params the scan only adds temporaries (4.34 against 4.01
copies above) and remat adds a forward pass per step, and the unrolled ``block{i}`` tree is the
layout of the checkpoints saved so far (a checkpoint loads only into the layout it was saved
from). Loss and gradients are the same function of the same parameters in every layout
(``tests/test_models_transformer.py``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sharpjax.models.transformer import (
    check_config,
    dense_logits,
    embed_init,
    layer_norm,
    partitioned,
    run_blocks,
)

POOLS = ("cls", "gap")


def auto_patch_size(side: int) -> int:
    """The default patch for an image side: 16 from 128 px, 4 from 16 px, 2 below."""
    return 16 if side >= 128 else 4 if side >= 16 else 2


class PatchEmbed(nn.Module):
    """Images ``(B, H, W, C)`` → tokens ``(B, H/p · W/p, width)``, patches in row-major order.

    A ``p × p`` conv with stride ``p`` and no padding: one linear map of each non-overlapping
    patch's ``p·p·C`` pixels (kernel ``(p, p, C, width)``, flattened in (row, column, channel)
    order) plus a bias.

    Attributes:
      width: token width (``embed``).
      patch_size: ``p``; must divide both image sides (checked by :class:`ViT`).
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    width: int
    patch_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        kernel = self.param(
            "kernel",
            partitioned(nn.initializers.lecun_normal(), "patch_h", "patch_w", "channels", "embed"),
            (p, p, x.shape[-1], self.width),
            self.param_dtype,
        )
        bias = self.param(
            "bias", partitioned(nn.initializers.zeros, "embed"), (self.width,), self.param_dtype
        )
        y = jax.lax.conv_general_dilated(
            jnp.asarray(x, self.dtype),
            kernel.astype(self.dtype),
            window_strides=(p, p),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = y + bias.astype(self.dtype)
        return y.reshape(y.shape[0], y.shape[1] * y.shape[2], self.width)


class ViT(nn.Module):
    """Vision Transformer with a class token (or global average pooling) and pre-LN blocks.

    Attributes:
      num_classes: number of output logits.
      width: token width (``embed``).
      depth: number of transformer blocks.
      num_heads: attention heads (must divide ``width``).
      mlp_dim: hidden width of each block's MLP.
      patch_size: side of the square patches; ``None`` picks it from the image
        (:func:`auto_patch_size`).
      pool: ``"cls"`` (class token, ViT/DeiT) or ``"gap"`` (mean of the patch tokens).
      dropout_rate: dropout after attention/MLP outputs (train mode only; 0 as in DeiT).
      remat: rematerialise each block (``nn.remat``): its activations are recomputed in the
        backward pass instead of stored, one extra forward pass per step.
      scan_blocks: run the blocks as one ``nn.scan`` over a stack of identical blocks; the
        params are then ``blocks/{ln1,attn,ln2,mlp}`` with a leading ``layers`` axis of size
        ``depth`` (no rule splits it) instead of ``block0`` … ``block{depth-1}``, so a
        checkpoint of one layout does not load into the other.
      dtype: computation dtype (``jnp.bfloat16`` for mixed precision).
      param_dtype: parameter dtype (float32).
    """

    num_classes: int
    width: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_dim: int = 768
    patch_size: int | None = None
    pool: str = "cls"
    dropout_rate: float = 0.0
    remat: bool = False
    scan_blocks: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_config(self.width, self.depth, self.num_heads, self.mlp_dim)
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} is not one of {POOLS}.")
        if x.ndim != 4:
            raise ValueError(
                f"ViT reads images of shape (batch, height, width, channels), got {x.shape}."
            )
        height, width = x.shape[1:3]
        patch = auto_patch_size(min(height, width)) if self.patch_size is None else self.patch_size
        if height % patch or width % patch:
            raise ValueError(
                f"patch_size={patch} must divide the image sides {height}x{width}; pass "
                f"model_kwargs patch_size= a common divisor of {height} and {width}."
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = PatchEmbed(self.width, patch, name="patch_embed", **kw)(x)
        b = x.shape[0]
        if self.pool == "cls":
            cls = self.param(
                "cls_token", partitioned(nn.initializers.zeros, "embed"), (self.width,)
            )
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], 1)
        pos = self.param(
            "pos_embed", partitioned(embed_init, "seq", "embed"), (x.shape[1], self.width)
        )
        x = x + pos.astype(x.dtype)
        x = run_blocks(
            x,
            train,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            remat=self.remat,
            scan=self.scan_blocks,
            **kw,
        )
        x = layer_norm(name="ln_final", **kw)(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        return dense_logits(x, self.num_classes, **kw)


# name → ViT fields (Dosovitskiy et al. 2021, Table 1; Ti/S from DeiT, Touvron et al. 2021).
VIT_CONFIGS: dict[str, dict[str, int]] = {
    "vit_micro": {"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64},
    "vit_ti": {"width": 192, "depth": 12, "num_heads": 3, "mlp_dim": 768},
    "vit_s": {"width": 384, "depth": 12, "num_heads": 6, "mlp_dim": 1536},
    "vit_b": {"width": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072},
}
