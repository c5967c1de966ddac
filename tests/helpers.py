"""Small shared fixtures: a tiny MLP written as plain functions, and a flat reference."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def tiny_mlp_params(key: jax.Array, sizes=(5, 8, 3)) -> dict:
    """Nested-dict params of a ReLU MLP (nested on purpose: transformations must not care)."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        key, k1, k2 = jax.random.split(key, 3)
        params[f"layer{i}"] = {
            "kernel": jax.random.normal(k1, (fan_in, fan_out)) / np.sqrt(fan_in),
            "bias": 0.1 * jax.random.normal(k2, (fan_out,)),
        }
    return params


def mlp_apply(params: dict, x: jax.Array) -> jax.Array:
    layers = [params[k] for k in sorted(params)]
    for i, layer in enumerate(layers):
        x = x @ layer["kernel"] + layer["bias"]
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


def cross_entropy(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = mlp_apply(params, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def toy_batches(key: jax.Array, num_batches: int, batch_size: int = 16, dim: int = 5, classes=3):
    batches = []
    for _ in range(num_batches):
        key, kx, ky = jax.random.split(key, 3)
        x = jax.random.normal(kx, (batch_size, dim))
        y = jax.random.randint(ky, (batch_size,), 0, classes)
        batches.append((x, y))
    return batches


def flat_loss_grad(params: dict):
    """The loss gradient as a function of the flat parameter vector, for flat references."""
    flat, unravel = ravel_pytree(params)

    def grad(w, batch):
        return ravel_pytree(jax.grad(cross_entropy)(unravel(w), *batch))[0]

    return flat, unravel, grad
