"""Shared by the multi-device checks: a tiny MLP, data, and independent single-device references.

The references never call the parallel steps: full-batch SAM/VaSSO/SANER run the plain
single-device sharpjax transformation on the whole batch, mSAM runs ``sharpjax.msam``, and the
per-device VaSSO/SANER references are the update equations written out on the flat vector.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import sharpjax

DIM, HIDDEN, CLASSES = 6, 8, 3
LR, MOMENTUM, RHO = 0.1, 0.9, 0.1


def init_params(seed: int = 0) -> dict:
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    return {
        "hidden": {
            "kernel": jax.random.normal(k1, (DIM, HIDDEN)) / np.sqrt(DIM),
            "bias": 0.1 * jax.random.normal(k2, (HIDDEN,)),
        },
        "out": {
            "kernel": jax.random.normal(k3, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
            "bias": 0.1 * jax.random.normal(k4, (CLASSES,)),
        },
    }


def mlp_loss(params: dict, batch) -> jax.Array:
    x, y = batch
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    logits = h @ params["out"]["kernel"] + params["out"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_batches(num_steps: int, batch_size: int, seed: int = 1) -> list[tuple[np.ndarray, ...]]:
    """Batches whose shards differ a lot (a per-device shift), so per-device modes differ."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(num_steps):
        x = rng.normal(size=(batch_size, DIM)).astype(np.float32)
        x += np.linspace(-2, 2, batch_size, dtype=np.float32)[:, None]
        y = rng.integers(0, CLASSES, size=(batch_size,)).astype(np.int32)
        batches.append((x, y))
    return batches


def sgd() -> optax.GradientTransformation:
    return optax.sgd(LR, momentum=MOMENTUM)


def flat(tree) -> np.ndarray:
    """All leaves, raveled and concatenated on the host (ravel_pytree's order); empty: []."""
    leaves = [np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0, np.float32)


def diff(a, b) -> float:
    """The largest absolute difference (float64, broadcast); 0 for empty arrays."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def full_batch_reference(sharp_tx, params, batches, loss=mlp_loss) -> np.ndarray:
    """Single-device training on the whole batch with ``chain(sharp_tx, sgd)``: flat params/step."""
    tx = optax.chain(sharp_tx, sgd())
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(loss)(params, batch)
        grad_fn = lambda p: jax.grad(loss)(p, batch)
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    out = []
    for batch in batches:
        params, state = step(params, state, batch)
        out.append(flat(params))
    return np.stack(out)


def msam_reference(params, batches, num_microbatches: int, rho: float = RHO) -> np.ndarray:
    """Single-device ``sharpjax.msam``: one ε per contiguous micro-batch (its own contract)."""
    tx = optax.chain(sharpjax.msam(rho, num_microbatches), sgd())
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        micro = sharpjax.split_microbatches(batch, num_microbatches)
        grads = jax.vmap(jax.grad(mlp_loss), in_axes=(None, 0))(params, micro)
        grad_fn = lambda p, j: jax.grad(mlp_loss)(p, jax.tree.map(lambda a: a[j], micro))
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    out = []
    for batch in batches:
        params, state = step(params, state, batch)
        out.append(flat(params))
    return np.stack(out)


def per_device_equations(
    params, batches, num_devices: int, rule: str, *, rho=RHO, theta=0.9, alpha=0.5
) -> np.ndarray:
    """Per-device VaSSO or SANER(SAM) written out on the flat vector, shard j = device j.

    VaSSO: ``d_j ← (1−θ) d_j + θ g_j`` (``d_j = g_j`` at the first step), ``ε_j = ρ d_j/‖d_j‖``,
    final ``mean_j ∇L_j(w + ε_j)``. SANER: ``ε_j = ρ g_j/‖g_j‖``, ``h_j = ∇L_j(w + ε_j)``,
    ``m_j = 1[0 < h_j/(g_j + 1e-8) < 1]``, final ``mean_j h_j ⊙ (α m_j + 1 − m_j)``.
    Then heavy-ball SGD: ``v ← μ v + final``, ``w ← w − lr v``.
    """
    w, unravel = ravel_pytree(params)

    def grad(w, shard):
        return ravel_pytree(jax.grad(mlp_loss)(unravel(w), shard))[0]

    shard_grads = jax.jit(jax.vmap(grad, in_axes=(0, 0)))
    v = jnp.zeros_like(w)
    d = None
    out = []
    for x, y in batches:
        shards = (x.reshape(num_devices, -1, DIM), y.reshape(num_devices, -1))
        ws = jnp.broadcast_to(w, (num_devices, w.size))
        g = shard_grads(ws, shards)
        if rule == "vasso":
            d = g if d is None else (1 - theta) * d + theta * g
            eps = rho * d / jnp.linalg.norm(d, axis=1, keepdims=True)
            final = shard_grads(ws + eps, shards).mean(0)
        elif rule == "saner":
            eps = rho * g / jnp.linalg.norm(g, axis=1, keepdims=True)
            h = shard_grads(ws + eps, shards)
            ratio = h / (g + 1e-8)
            mask = (ratio > 0) & (ratio < 1)
            final = (h * jnp.where(mask, alpha, 1.0)).mean(0)
        else:
            raise ValueError(rule)
        v = MOMENTUM * v + final
        w = w - LR * v
        out.append(np.asarray(w))
    return np.stack(out)
