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
import matplotlib.pyplot as plt
import optax

import sharpjax
from sharpjax import sharpness
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
# ## Filter-normalised slices with `sharpness.loss_landscape`
#
# flax stores a Dense kernel as `(in, out)` and a Conv kernel as `(..., in, out)`, so a
# filter is a slice along the **last** axis (`filter_axis=-1`, the default) and its norm
# is taken over all the other axes. One-dimensional leaves (biases) get a zero direction
# (`include_1d=False`, the default of the paper's code). `loss_landscape` evaluates the
# whole grid as one vmapped computation; the data go in as `batches`, so the jitted
# program takes them as arguments instead of baking them in as constants.
#
# Both networks are sliced along directions drawn from the **same** random key, each
# normalised to its own network's filters, so the two pictures are directly comparable.

# %%
batch_loss = lambda p, batch: loss_fn(p, *batch)
train_data = [(x_train, y_train)]
key = jax.random.key(42)
line = jnp.linspace(-1.0, 1.0, 41)
grid = jnp.linspace(-1.0, 1.0, 25)
curves, surfaces = {}, {}
for name, p in solutions.items():
    curves[name] = sharpness.loss_landscape(batch_loss, p, key, 1, line, batches=train_data)
    surfaces[name] = sharpness.loss_landscape(batch_loss, p, key, 2, grid, batches=train_data)
    losses = curves[name].losses
    print(f"{name}: loss at α = ±1: {float(losses[0]):.3f}, {float(losses[-1]):.3f}")

# %%
sharpness.plot_landscape(curves, title="1-D slice (training loss)")
sharpness.plot_landscape(surfaces, title="2-D slices (training loss)")
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

d_orig = sharpness.random_direction(key, p_sgd)
d_scaled = sharpness.random_direction(key, p_scaled)  # same draw, rescaled filters


def slice_1d(p, d):  # d as it is: normalization=None
    return sharpness.loss_landscape(
        batch_loss, p, directions=[d], coordinates=line, normalization=None, batches=train_data
    ).losses


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
