"""Multi-layer perceptron: flatten, ``Dense + ReLU`` per hidden layer, ``Dense`` logits.

Parameters are plain top-level ``Dense_0 ... Dense_L`` (``kernel``, ``bias``) in forward
order, the layout the layer-wise sharpness measures expect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sharpjax.models.layers import dense_head


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs.

    Attributes:
      num_classes: number of output logits.
      hidden_sizes: width of each hidden layer; ``()`` gives multinomial logistic regression.
      dtype: computation dtype (``jnp.bfloat16`` for mixed precision).
      param_dtype: parameter dtype (kept float32 for the optimizer).
    """

    num_classes: int
    hidden_sizes: Sequence[int] = (512, 512)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or normalisation: train and eval are the same function
        x = jnp.asarray(x, self.dtype)
        return dense_head(
            x, self.hidden_sizes, self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype
        )
