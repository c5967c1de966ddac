"""The benchmarks' models and synthetic batches.

* ``cnn8``: two 3×3 convolutions of width 64 and a dense head on 8×8×1 inputs (the model the
  step-time table was first measured on; big enough that compute, not dispatch, dominates);
* ``lenet28``: ``sharpjax.models.LeNet`` (5×5 convolutions, 6 and 16 channels) on 28×28×1;
* ``mlp``: ``sharpjax.models.MLP`` (512-1024-1024-1024) on 512 features, 2.6 M parameters;
* ``resnet18``: ``sharpjax.models.ResNet18`` on 32×32×3 (11.2 M parameters; BatchNorm in
  training mode, its new statistics dropped: the steps time the gradient work only);
* ``tiny``: one 3×3 convolution of width 4 on 8×8×1, for the smoke run (``--quick``).

Random inputs and labels: timing and XLA's memory accounting do not depend on the data.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class BenchCNN(nn.Module):
    """Two 3×3 convolutions, a 2×2 max-pool and a dense head."""

    width: int = 64

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class Problem(NamedTuple):
    """A model with its parameters, batches and losses."""

    name: str
    description: str
    params: Any
    batches: list[tuple[jax.Array, jax.Array]]
    example_losses: Any  # (params, x, y) -> per-example losses
    loss: Any  # (params, x, y) -> mean loss

    @property
    def num_params(self) -> int:
        return int(sum(x.size for x in jax.tree.leaves(self.params)))


# name -> (module factory, input shape, default batch size, description)
MODELS = {
    "cnn8": (lambda: BenchCNN(64), (8, 8, 1), 256, "2-conv CNN (width 64) on 8×8 inputs"),
    "lenet28": (
        lambda: _sharpjax_model("lenet"),
        (28, 28, 1),
        128,
        "LeNet-5 (6 and 16 channels, 5×5) on 28×28 inputs",
    ),
    "mlp": (lambda: _sharpjax_model("mlp"), (512,), 128, "MLP 512-1024-1024-1024-10"),
    "resnet18": (lambda: _sharpjax_model("resnet18"), (32, 32, 3), 128, "ResNet-18 on 32×32×3"),
    "tiny": (Tiny, (8, 8, 1), 16, "one 3×3 conv of width 4 on 8×8 inputs"),
}


def _sharpjax_model(name: str) -> nn.Module:
    from sharpjax.models import MLP, LeNet, ResNet18

    if name == "lenet":
        return LeNet(num_classes=10)
    if name == "mlp":
        return MLP(num_classes=10, hidden_sizes=(1024, 1024, 1024))
    return ResNet18(10)


def problem(name: str, batch_size: int | None = None, num_batches: int = 8) -> Problem:
    """Model ``name`` of :data:`MODELS` with ``num_batches`` distinct random batches."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    make, shape, default_batch, description = MODELS[name]
    batch_size = batch_size or default_batch
    model = make()
    rng = np.random.default_rng(0)
    batches = [
        (
            jnp.asarray(rng.normal(size=(batch_size, *shape)), jnp.float32),
            jnp.asarray(rng.integers(0, 10, size=batch_size), jnp.int32),
        )
        for _ in range(num_batches)
    ]
    variables = model.init(jax.random.key(0), batches[0][0][:1], train=False)
    params, stats = variables["params"], variables.get("batch_stats")

    def example_losses(p, x, y):
        if stats is None:
            logits = model.apply({"params": p}, x, train=True)
        else:  # BatchNorm in training mode; the new statistics are not part of the timing
            logits, _ = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    def loss(p, x, y):
        return example_losses(p, x, y).mean()

    return Problem(
        name, f"{description}, batch {batch_size}", params, batches, example_losses, loss
    )
