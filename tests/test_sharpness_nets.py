"""Tiny float64 networks and dense references shared by the tests of sharpjax.sharpness.

(No tests here; the name only keeps the sharpness tests' files together.)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

NUM_CLASSES = 3


@pytest.fixture(autouse=True, scope="module")
def x64():
    """Float64 for the module (dense references to 1e-10), restored afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


class MLP(nn.Module):
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(6, use_bias=self.use_bias)(x))
        x = nn.relu(nn.Dense(5, use_bias=self.use_bias)(x))
        return nn.Dense(NUM_CLASSES, use_bias=self.use_bias)(x)


class CNN(nn.Module):
    """conv → max-pool → conv → flatten (NHWC) → dense: every rescaling case of MinSharp."""

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(3, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(4, (2, 2), padding="VALID")(x))
        return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))


class Net(NamedTuple):
    logits_fn: object
    params: dict
    x: jax.Array
    y: jax.Array

    def loss(self, params, x=None, y=None):
        x = self.x if x is None else x
        y = self.y if y is None else y
        log_p = jax.nn.log_softmax(self.logits_fn(params, x))
        return -jnp.mean(log_p[jnp.arange(y.shape[0]), y])

    def batch_loss(self, params, batch):
        return self.loss(params, *batch)


def make_net(kind: str = "mlp", n: int = 12, seed: int = 0, use_bias: bool = True) -> Net:
    """A tiny float64 network with non-trivial biases and a random labelled batch."""
    model, shape = (MLP(use_bias), (n, 4)) if kind == "mlp" else (CNN(), (n, 6, 6, 1))

    # NumPy draws: compiling JAX's random kernels for every shape would dominate the tests.
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape))
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, n))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]

    def draw(leaf):  # fan-in scaled weights; random (not zero) biases exercise the bias terms
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 10
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in))

    params = jax.tree.map(draw, shapes)
    return Net(lambda p, x: model.apply({"params": p}, x), params, x, y)


def dense_hessian(loss):
    """``params -> (d, d)`` dense Hessian of ``loss`` via jax.hessian (jitted, reusable)."""

    @jax.jit
    def hessian(params):
        flat, unravel = ravel_pytree(params)
        return jax.hessian(lambda w: loss(unravel(w)))(flat)

    return lambda params: np.asarray(hessian(params))


def flatten(tree) -> np.ndarray:
    """NumPy ravel_pytree (same order); eager JAX ops would compile once per shape."""
    return np.concatenate([np.asarray(a).ravel() for a in jax.tree.leaves(tree)])


def unflatten_like(tree, flat: np.ndarray):
    leaves, treedef = jax.tree.flatten(tree)
    pieces = np.split(np.asarray(flat), np.cumsum([leaf.size for leaf in leaves])[:-1])
    pieces = [jnp.asarray(p.reshape(a.shape)) for p, a in zip(pieces, leaves, strict=True)]
    return jax.tree.unflatten(treedef, pieces)


class Case(NamedTuple):
    net: Net
    loss: object  # params -> scalar, one object per net so the measures' jit caches are shared
    hessian: object  # params -> dense Hessian
    H: np.ndarray  # dense Hessian at net.params
    outputs: object  # params -> logits on net.x (jitted)
    losses: object  # (m, d) flat parameter vectors -> (m,) losses (jitted)


@functools.cache
def net_case(kind: str = "mlp", seed: int = 0, use_bias: bool = True) -> Case:
    """Built once per session; call it only with float64 enabled (the x64 fixture)."""
    net = make_net(kind, seed=seed, use_bias=use_bias)
    loss = lambda p: net.loss(p)
    hessian = dense_hessian(loss)
    outputs = jax.jit(lambda p: net.logits_fn(p, net.x))
    unravel = ravel_pytree(net.params)[1]
    losses = jax.jit(jax.vmap(lambda w: loss(unravel(w))))
    return Case(net, loss, hessian, hessian(net.params), outputs, losses)


def dense_diagonal(case: Case, params=None) -> dict:
    """The Hessian diagonal from jax.hessian, with the structure of params."""
    params = case.net.params if params is None else params
    return unflatten_like(params, np.diag(case.hessian(params)))
