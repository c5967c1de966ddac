"""The conv and BatchNorm conventions that the residual networks share."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

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
