"""Wide ResNet (Zagoruyko & Komodakis, 2016, "Wide Residual Networks"), pre-activation.

WRN-d-k: ``n = (d - 4) / 6`` blocks per group, groups of width ``16k, 32k, 64k`` with strides
1, 2, 2 after a 16-channel 3x3 stem. Each block is ``BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3``
(He et al., 2016, "Identity Mappings in Deep Residual Networks"); when the shape changes the
shortcut is a 1x1 conv applied to the pre-activated input, as in the authors' code
(github.com/szagoruyko/wide-residual-networks). Convs have no bias. Parameter counts
(10 classes): WRN-16-8 10,961,370 (paper: 11.0M), WRN-28-10 36,479,194 (paper: 36.5M).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sharpjax.models.layers import batch_norm, conv


class WideBlock(nn.Module):
    """Pre-activation residual block of a Wide ResNet."""

    features: int
    strides: int = 1
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda: batch_norm(train, axis_name=self.bn_axis_name, **kw)
        a = nn.relu(norm()(x))
        y = conv(self.features, 3, self.strides, **kw)(a)
        y = nn.relu(norm()(y))
        if self.dropout_rate > 0:
            y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = conv(self.features, 3, 1, **kw)(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            # Projection of the activated input: the reference code shares the first BN-ReLU.
            x = conv(self.features, 1, self.strides, **kw)(a)
        return x + y


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs.

    Attributes:
      num_classes: number of output logits.
      depth: total depth ``6n + 4`` (16, 22, 28, 40, ...).
      widen_factor: width multiplier ``k`` of the three groups.
      dropout_rate: dropout between the two convs of a block (paper: 0.3 on some runs; 0 here
        by default, so train mode needs a ``"dropout"`` rng only when it is set).
      dtype: computation dtype.
      param_dtype: parameter dtype.
      bn_axis_name: mapped axis for cross-device BatchNorm statistics, or ``None``.
    """

    num_classes: int
    depth: int = 28
    widen_factor: int = 10
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if (self.depth - 4) % 6 != 0 or self.depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {self.depth}")
        n = (self.depth - 4) // 6
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        x = conv(16, 3, **kw)(x)
        for i, strides in enumerate((1, 2, 2)):
            features = 16 * self.widen_factor * 2**i
            for j in range(n):
                x = WideBlock(
                    features,
                    strides if j == 0 else 1,
                    self.dropout_rate,
                    bn_axis_name=self.bn_axis_name,
                    **kw,
                )(x, train)
        x = batch_norm(train, axis_name=self.bn_axis_name, **kw)(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        return nn.Dense(self.num_classes, **kw)(x).astype(jnp.float32)
