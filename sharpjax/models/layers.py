"""Pieces the models share: the residual nets' conv and BatchNorm conventions, the dense head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# He et al. (2015, "Delving deep into rectifiers") init, fan-out as in torchvision's ResNet and
# the Wide ResNet authors' code.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, strides: int = 1, *, dtype: Any, param_dtype: Any) -> nn.Conv:
    """A square ``kernel`` conv without bias (BatchNorm follows or precedes it)."""
    return nn.Conv(
        features,
        (kernel, kernel),
        (strides, strides),
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def batch_norm(train: bool, *, dtype: Any, param_dtype: Any, axis_name: str | None) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults: its momentum 0.1 on the new batch is Flax's 0.9 on
    the running value; ``axis_name`` averages the statistics across devices."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=param_dtype,
        axis_name=axis_name,
    )


def dense_head(
    x: jax.Array, hidden_sizes: Sequence[int], num_classes: int, *, dtype: Any, param_dtype: Any
) -> jax.Array:
    """Flatten, ReLU Dense layers of ``hidden_sizes``, then float32 logits.

    Called inside a ``@nn.compact`` method, so its ``Dense_i`` layers are top-level parameter
    collections of the caller (the layout ``sharpness.minimum_sharpness`` reads).
    """
    x = x.reshape((x.shape[0], -1))
    for width in hidden_sizes:
        x = nn.relu(nn.Dense(width, dtype=dtype, param_dtype=param_dtype)(x))
    return nn.Dense(num_classes, dtype=dtype, param_dtype=param_dtype)(x).astype(jnp.float32)
