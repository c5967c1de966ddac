"""ResNet for 32x32 images, the CIFAR variant used throughout the SAM literature.

He et al. (2016, "Deep Residual Learning for Image Recognition") BasicBlocks with the
ImageNet stage layout ``[2, 2, 2, 2]`` and widths 64-512, adapted to CIFAR as in
github.com/kuangliu/pytorch-cifar: a 3x3 stride-1 stem without max-pool, strides 1, 2, 2, 2,
1x1-conv + BatchNorm projection shortcuts, global average pooling. 11,173,962 parameters for
10 classes (the count usually quoted as 11.17M).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sharpjax.models.layers import batch_norm, conv


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm, ReLU after the residual sum (post-activation)."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda: batch_norm(train, axis_name=self.bn_axis_name, **kw)
        y = nn.relu(norm()(conv(self.features, 3, self.strides, **kw)(x)))
        y = norm()(conv(self.features, 3, 1, **kw)(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = norm()(conv(self.features, 1, self.strides, **kw)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR ResNet with BasicBlocks; ``stage_sizes=(2, 2, 2, 2)`` is ResNet-18.

    Attributes:
      num_classes: number of output logits.
      stage_sizes: BasicBlocks per stage (``(3, 4, 6, 3)`` gives ResNet-34).
      width: channel multiplier; stage ``i`` has ``round(64 * width * 2**i)`` channels
        (``width=1/8`` gives a narrow 8-16-32-64 network for tests and CPU runs).
      dtype: computation dtype (BatchNorm statistics are still reduced in float32).
      param_dtype: parameter dtype.
      bn_axis_name: mapped axis over which BatchNorm averages batch statistics (under
        ``pmap``/``shard_map``); ``None`` keeps per-device statistics.
    """

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = [max(1, round(64 * self.width * 2**i)) for i in range(len(self.stage_sizes))]
        x = jnp.asarray(x, self.dtype)
        x = conv(widths[0], 3, **kw)(x)
        x = nn.relu(batch_norm(train, axis_name=self.bn_axis_name, **kw)(x))
        for i, (blocks, features) in enumerate(zip(self.stage_sizes, widths, strict=True)):
            for j in range(blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(features, strides, bn_axis_name=self.bn_axis_name, **kw)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, **kw)(x).astype(jnp.float32)


def ResNet18(num_classes: int, **kwargs: Any) -> ResNet:  # noqa: N802 (reads like a class)
    """ResNet-18, CIFAR variant (11.17M parameters for 10 classes)."""
    return ResNet(num_classes=num_classes, stage_sizes=(2, 2, 2, 2), **kwargs)
