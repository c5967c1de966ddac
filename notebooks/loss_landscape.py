# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Loss landscapes of SGD and SAM minima
#
# A common picture of why SAM generalises: it finds *flatter* minima. This notebook
# draws the training loss around an SGD and a SAM solution of the same network, along
# random directions, following Li, Xu, Taylor, Studer & Goldstein, *Visualizing the
# Loss Landscape of Neural Nets* (NeurIPS 2018):
#
# * 1-D slices `α ↦ L(w + α d)` and 2-D slices `(α, β) ↦ L(w + α d₁ + β d₂)`;
# * **filter normalisation**: a random Gaussian direction `d` is rescaled filter by
#   filter, `d_f ← d_f ‖w_f‖ / ‖d_f‖`, so that each filter (a conv output channel, or
#   a Dense output unit) is perturbed in proportion to its own size. A ReLU network
#   computes the same function after multiplying one layer by `c` and the next by
#   `1/c`, and an unnormalised direction would make such an equivalent network look
#   sharper or flatter. Following the paper's code, bias directions are set to zero.
#
# The networks are small MLPs on the embedded `digits` data, so the whole notebook
# runs offline on the CPU in seconds.

# %%
import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optax

import sharpjax
from sharpjax.data import iterate_batches, load_dataset
from sharpjax.models import get_model

# %% [markdown]
# ## Train SGD and SAM from the same initialisation
#
# Same data order, same base optimizer (SGD with momentum); SAM with `ρ = 0.2`.
# Both fit the training set.

# %%
ds = load_dataset("digits")
model = get_model("mlp", ds.num_classes, hidden_sizes=(64, 64))
params0 = model.init(jax.random.key(0), ds.x_train[:1])["params"]
x_train, y_train = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)


def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@jax.jit
def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)


def train(tx, epochs=30, batch_size=128):
    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        grad_fn = lambda p: jax.grad(loss_fn)(p, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = params0, tx.init(params0)
    for epoch in range(epochs):
        for x, y in iterate_batches(
            ds.x_train, ds.y_train, batch_size=batch_size, seed=0, epoch=epoch
        ):
            params, opt_state = step(params, opt_state, x, y)
    return params


solutions = {
    "SGD": train(optax.sgd(0.05, momentum=0.9)),
    "SAM": train(optax.chain(sharpjax.sam(0.2), optax.sgd(0.05, momentum=0.9))),
}
for name, p in solutions.items():
    print(
        f"{name}: train loss {float(loss_fn(p, x_train, y_train)):.4f}, "
        f"train acc {float(accuracy(p, x_train, y_train)):.3f}, "
        f"test acc {float(accuracy(p, ds.x_test, ds.y_test)):.3f}"
    )


# %% [markdown]
# ## Filter-normalised directions
#
# flax stores a Dense kernel as `(in, out)` and a Conv kernel as `(..., in, out)`, so a
# filter is a slice along the **last** axis and its norm is taken over all the other
# axes. One-dimensional leaves (biases) get a zero direction.


# %%
def filter_normalised_direction(key, params):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))

    def normalise(k, w):
        if w.ndim <= 1:  # biases (and normalisation parameters): not perturbed
            return jnp.zeros_like(w)
        d = jax.random.normal(k, w.shape, w.dtype)
        axes = tuple(range(w.ndim - 1))  # everything but the output (filter) axis
        w_norm = jnp.sqrt(jnp.sum(w**2, axis=axes, keepdims=True))
        d_norm = jnp.sqrt(jnp.sum(d**2, axis=axes, keepdims=True))
        return d * w_norm / d_norm

    directions = [normalise(k, w) for k, w in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, directions)


@jax.jit
def loss_surface(params, d1, d2, alphas, betas):
    # L(w + α d1 + β d2) on the training set for every (α, β) pair, 32 at a time.
    def loss_at(ab):
        p = jax.tree.map(lambda w, u, v: w + ab[0] * u + ab[1] * v, params, d1, d2)
        return loss_fn(p, x_train, y_train)

    points = jnp.stack([alphas.ravel(), betas.ravel()], axis=-1)
    return jax.lax.map(loss_at, points, batch_size=32).reshape(alphas.shape)


# %% [markdown]
# ## 1-D and 2-D slices
#
# Both networks are sliced along directions drawn from the **same** random keys, each
# normalised to its own network's filters, so the two pictures are directly comparable.

# %%
key1, key2 = jax.random.split(jax.random.key(42))
line = jnp.linspace(-1.0, 1.0, 41)
A, B = jnp.meshgrid(jnp.linspace(-1.0, 1.0, 25), jnp.linspace(-1.0, 1.0, 25))
curves, surfaces = {}, {}
for name, p in solutions.items():
    d1 = filter_normalised_direction(key1, p)
    d2 = filter_normalised_direction(key2, p)
    curves[name] = np.asarray(loss_surface(p, d1, d2, line, jnp.zeros_like(line)))
    surfaces[name] = np.asarray(loss_surface(p, d1, d2, A, B))
    print(f"{name}: loss at α = ±1: {curves[name][0]:.3f}, {curves[name][-1]:.3f}")

# %%
colors = {"SGD": "tab:gray", "SAM": "tab:blue"}
levels = np.geomspace(1e-3, 20.0, 18)  # shared by both contour plots
norm = matplotlib.colors.LogNorm(levels[0], levels[-1])
fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), layout="constrained")
for name, curve in curves.items():
    axes[0].plot(line, curve, color=colors[name], label=name)
axes[0].set(title="1-D slice (training loss)", xlabel="α", ylabel="loss")
axes[0].legend()
for ax, (name, Z) in zip(axes[1:], surfaces.items(), strict=True):
    Z = np.clip(Z, levels[0], levels[-1])
    filled = ax.contourf(A, B, Z, levels=levels, norm=norm, cmap="viridis")
    ax.contour(A, B, Z, levels=levels[::3], colors="white", linewidths=0.6)
    ax.plot(0, 0, "w+")
    ax.set(title=f"2-D slice around the {name} solution", xlabel="α", ylabel="β")
    ax.set(xticks=[-1, -0.5, 0, 0.5, 1], yticks=[-1, -0.5, 0, 0.5, 1], aspect="equal")
fig.colorbar(filled, ax=axes[1:], label="training loss", ticks=[1e-3, 1e-2, 0.1, 1, 10])
plt.show()

# %% [markdown]
# Along these filter-normalised directions the loss rises more slowly around the SAM
# solution: its basin is wider, and the contours (shared, logarithmically spaced
# levels) are further apart. Random directions mostly probe the bulk of the Hessian
# spectrum rather than its top eigen-directions; `sharpness_measures.ipynb` measures
# the spectrum itself.
#
# ## Why filter normalisation
#
# Multiply the first layer of the SGD network by 4 and the second by 1/4: a ReLU
# network computes exactly the same function. Along a random direction of a *fixed*
# norm (here the norm of the filter-normalised direction of the original network)
# the two equivalent networks look very different; along filter-normalised
# directions, which rescale with the weights, they give the same curve.

# %%
p_sgd = solutions["SGD"]
p_scaled = {
    **p_sgd,
    "Dense_0": jax.tree.map(lambda w: 4.0 * w, p_sgd["Dense_0"]),
    "Dense_1": {**p_sgd["Dense_1"], "kernel": p_sgd["Dense_1"]["kernel"] / 4.0},
}
logits = lambda p: model.apply({"params": p}, x_train)
gap = jnp.max(jnp.abs(logits(p_scaled) - logits(p_sgd)))
print(f"max |logit difference| between the two networks: {float(gap):.1e}")

d_orig = filter_normalised_direction(key1, p_sgd)
d_scaled = filter_normalised_direction(key1, p_scaled)  # same draw, rescaled filters
zero = jax.tree.map(jnp.zeros_like, p_sgd)
slice_1d = lambda p, d: loss_surface(p, d, zero, line, jnp.zeros_like(line))
slices = {
    "original, filter-normalised d": slice_1d(p_sgd, d_orig),
    "rescaled, the same d": slice_1d(p_scaled, d_orig),
    "rescaled, its own filter-normalised d": slice_1d(p_scaled, d_scaled),
}
fig, ax = plt.subplots(figsize=(6, 4))
styles = ({"lw": 2}, {"ls": "--"}, {"ls": "none", "marker": "o", "ms": 4, "markevery": 2})
for (label, curve), style in zip(slices.items(), styles, strict=True):
    ax.plot(line, curve, label=label, **style)
ax.set(title="two equivalent SGD networks", xlabel="α", ylabel="loss", yscale="log")
ax.legend(fontsize=8, loc="upper center")
plt.show()

# %% [markdown]
# The rescaled network along its own filter-normalised direction (dots) retraces the
# original curve exactly, while the same fixed direction (dashed) makes the very same
# function look much sharper. Filter normalisation removes this scale ambiguity for
# the rescalings of whole layers and filters; sharpness measures that are invariant
# to *all* such rescalings are the subject of `sharpness_measures.ipynb`
# (Minimum Sharpness).
