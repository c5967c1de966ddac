"""Flax (linen) models for sharpjax and a name-based factory.

All models take ``(x, train=False)``, compute in ``dtype`` (``jnp.bfloat16`` for mixed
precision) with ``param_dtype`` float32 parameters, and return float32 logits. BatchNorm
models (``resnet18``, ``wrn*``) use running averages when ``train=False``, return updated
``batch_stats`` when applied with ``mutable=["batch_stats"]`` in train mode, and take
``bn_axis_name`` for cross-device statistics.

Transformers: ``vit_micro``/``vit_ti``/``vit_s``/``vit_b`` read images ``(B, H, W, C)``;
``transformer_tiny``/``transformer_small``/``transformer_1b`` read int tokens ``(B, T)`` and
return the last position's logits ``(B, num_classes)`` (``all_positions=True``: every
position's). Their parameters carry flax logical partitioning annotations: ``model.init``
returns boxed params; :mod:`sharpjax.models.partitioning` turns them into mesh PartitionSpecs
and plain arrays (``partitioning.unbox``). ``apply`` takes boxed or plain params alike.
"""

from __future__ import annotations

from sharpjax._extras import require_train_extra

require_train_extra("sharpjax.models", ("flax",))

from typing import Any

import flax.linen as nn

from sharpjax.models.cnn import CNN1D, LeNet
from sharpjax.models.mlp import MLP
from sharpjax.models.resnet import ResNet, ResNet18
from sharpjax.models.transformer import TRANSFORMER_CONFIGS, Decoder
from sharpjax.models.vit import VIT_CONFIGS, ViT
from sharpjax.models.wide_resnet import WideResNet

# name → (constructor, default keyword arguments); kwargs passed to get_model override these.
_REGISTRY: dict[str, tuple[Any, dict[str, Any]]] = {
    "mlp": (MLP, {}),
    "lenet": (LeNet, {}),
    "cnn1d": (CNN1D, {}),
    "resnet18": (ResNet, {"stage_sizes": (2, 2, 2, 2)}),
    "resnet34": (ResNet, {"stage_sizes": (3, 4, 6, 3)}),
    "wrn16_8": (WideResNet, {"depth": 16, "widen_factor": 8}),
    "wrn28_10": (WideResNet, {"depth": 28, "widen_factor": 10}),
    **{name: (ViT, fields) for name, fields in VIT_CONFIGS.items()},
    **{name: (Decoder, fields) for name, fields in TRANSFORMER_CONFIGS.items()},
}
MODELS = tuple(_REGISTRY)


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Builds the model called ``name`` (one of :data:`MODELS`).

    Args:
      name: model name, e.g. ``"resnet18"`` or ``"wrn28_10"``.
      num_classes: number of output logits.
      **kwargs: module fields overriding the defaults, e.g. ``width=0.25``,
        ``dtype=jnp.bfloat16``, ``bn_axis_name="batch"``, ``hidden_sizes=(256,)``.

    Raises:
      ValueError: unknown ``name`` (the message lists :data:`MODELS`).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    cls, defaults = _REGISTRY[name]
    return cls(num_classes=num_classes, **{**defaults, **kwargs})


__all__ = [
    "CNN1D",
    "MLP",
    "MODELS",
    "Decoder",
    "LeNet",
    "ResNet",
    "ResNet18",
    "ViT",
    "WideResNet",
    "get_model",
]
