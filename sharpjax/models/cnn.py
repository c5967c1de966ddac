"""Small convolutional networks: LeNet-5 style 2-D CNN and a 1-D CNN for MNIST-1D.

Both are ``Conv + ReLU + max-pool`` stacks followed by ``Dense + ReLU`` layers, with no
normalisation, so parameters are plain top-level ``Conv_i`` / ``Dense_j`` entries holding
``kernel`` and ``bias`` in forward order (what the layer-wise sharpness measures expect).
``CNN1D(batch_norm=True)`` puts a BatchNorm between each conv and its ReLU (the smallest
model with normalisation layers, for SAM-ON: ``sharpjax.sam_on()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sharpjax.models.layers import batch_norm, dense_head


class LeNet(nn.Module):
    """LeNet-5 style CNN (LeCun et al., 1998, "Gradient-based learning applied to document
    recognition"): conv(6, 5x5) → pool → conv(16, 5x5) → pool → 120 → 84 → classes.

    Differences from the 1998 network, for modern use: ReLU instead of scaled tanh, max- instead
    of average-pooling, ``SAME`` padding (so 8x8 digits, 28x28 MNIST and 32x32 CIFAR all work;
    each pool halves the size: 8→4→2, 28→14→7, 32→16→8) and a plain dense output layer.

    Attributes:
      num_classes: number of output logits.
      features: channels of each conv layer (each followed by a 2x2 max-pool).
      hidden_sizes: widths of the dense layers after flattening.
      kernel_size: spatial size of the conv kernels.
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    num_classes: int
    features: Sequence[int] = (6, 16)
    hidden_sizes: Sequence[int] = (120, 84)
    kernel_size: int = 5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or normalisation
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        for ch in self.features:
            x = nn.relu(nn.Conv(ch, (self.kernel_size, self.kernel_size), **kw)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return dense_head(x, self.hidden_sizes, self.num_classes, **kw)


class CNN1D(nn.Module):
    """1-D CNN for MNIST-1D sequences ``(N, 40, 1)`` (or ``(N, 40)``).

    Follows the spirit of the MNIST-1D reference CNN (Greydanus & Kobak, 2024, "Scaling down
    deep learning with MNIST-1D": three conv layers of width 25-32, kernel 5, then a linear
    head), with max-pooling for the downsampling: conv(k=5) + ReLU + pool(2)
    per layer, so 40 → 20 → 10 → 5 positions, then dense layers.

    Attributes:
      num_classes: number of output logits.
      features: channels of each conv layer.
      hidden_sizes: widths of the dense layers after flattening.
      kernel_size: conv kernel length.
      batch_norm: conv (without bias) → BatchNorm → ReLU in every conv layer, with the
        ResNets' BatchNorm conventions (``batch_stats``, running averages when
        ``train=False``); parameters ``BatchNorm_i`` beside ``Conv_i``.
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    num_classes: int
    features: Sequence[int] = (32, 32, 32)
    hidden_sizes: Sequence[int] = (128,)
    kernel_size: int = 5
    batch_norm: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.asarray(x, self.dtype)
        if x.ndim == 2:  # (N, L) → (N, L, 1): one input channel
            x = x[..., None]
        for ch in self.features:
            # BatchNorm's shift makes the conv bias redundant.
            x = nn.Conv(ch, (self.kernel_size,), use_bias=not self.batch_norm, **kw)(x)
            if self.batch_norm:
                x = batch_norm(train, axis_name=None, **kw)(x)
            x = nn.max_pool(nn.relu(x), (2,), strides=(2,))
        return dense_head(x, self.hidden_sizes, self.num_classes, **kw)
