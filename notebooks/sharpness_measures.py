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
# # Measuring sharpness: spectrum, trace and Minimum Sharpness
#
# `sharpjax.sharpness` measures the curvature of the loss at trained parameters with
# Hessian-vector products, never forming the Hessian:
#
# * `top_eigenvalues` (Lanczos) and `spectral_density` (stochastic Lanczos quadrature,
#   Ghorbani, Krishnan & Xiao, ICML 2019): the spectrum of the Hessian;
# * `hessian_trace` (Hutchinson, Hutch++): its trace, the sum of all curvatures;
# * `hessian_diagonal`: the exact diagonal for ReLU networks (per-example
#   Gauss-Newton), and
# * `minimum_sharpness` (Ibayashi, Hamaguchi & Imaizumi, 2021): the trace minimised
#   over all rescalings of the network that leave its function unchanged.
#
# Why the last one: Dinh et al. (ICML 2017) pointed out that a ReLU network computes
# the same function after multiplying a layer (or one unit's incoming weights) by
# `c > 0` and the next layer (that unit's outgoing weights) by `1/c`, while the
# Hessian, and with it the trace and the top eigenvalue, change arbitrarily. A measure
# meant to say something about *the function* should not depend on that choice.
# Minimum Sharpness does not, by construction. This notebook shows it on a small
# trained network, offline on the CPU.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import sharpjax
from sharpjax import sharpness
from sharpjax.data import iterate_batches, load_dataset
from sharpjax.models import get_model

# %% [markdown]
# ## A small trained network
#
# A ReLU MLP with two hidden layers of 32 units (3,466 parameters) on the embedded
# `digits` data, trained with SGD to (near) zero training error. Its parameters are
# the plain `Dense_0, Dense_1, Dense_2` collections, in forward order, that the
# layer-wise measures expect.

# %%
ds = load_dataset("digits")
model = get_model("mlp", ds.num_classes, hidden_sizes=(32, 32))
x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)


def logits_fn(params, x):
    return model.apply({"params": params}, x)


def batch_loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y).mean()


tx = optax.sgd(0.05, momentum=0.9)


@jax.jit
def step(params, opt_state, xb, yb):
    updates, opt_state = tx.update(jax.grad(batch_loss)(params, xb, yb), opt_state)
    return optax.apply_updates(params, updates), opt_state


params = model.init(jax.random.key(0), x[:1])["params"]
opt_state = tx.init(params)
for epoch in range(20):
    batches = iterate_batches(ds.x_train, ds.y_train, batch_size=128, seed=0, epoch=epoch)
    for xb, yb in batches:
        params, opt_state = step(params, opt_state, xb, yb)

accuracy = lambda p, x, y: float(jnp.mean(jnp.argmax(logits_fn(p, x), -1) == y))
print(f"train loss {float(batch_loss(params, x, y)):.4f}")
print(f"train acc {accuracy(params, x, y):.3f}")
print(f"test acc {accuracy(params, ds.x_test, ds.y_test):.3f}")
print(f"parameters: {sum(w.size for w in jax.tree.leaves(params))}")


# %% [markdown]
# ## The Hessian spectrum
#
# The loss-based measures take `loss_fn(params) -> scalar`; here the mean
# cross-entropy on the whole training set (for data that does not fit in memory, pass
# `loss_fn(params, batch)` and `batches=`). `top_eigenvalues` runs Lanczos with full
# reorthogonalisation; `spectral_density` averages the Gaussian-broadened Ritz values
# of Lanczos runs from random probes, weighted by the quadrature weights. As is typical
# for trained classifiers, most eigenvalues sit in a bulk near zero, with a handful of
# outliers to the right (for `K` classes, typically up to about `K` of them; Sagun et
# al. 2017, Papyan 2019).


# %%
def loss(params):
    return batch_loss(params, x, y)


key = jax.random.key(0)
top = sharpness.top_eigenvalues(loss, params, key, k=5, num_iterations=50).value
sd = sharpness.spectral_density(loss, params, key, num_iterations=80)
grid, density = sd.grid, sd.density
print("top 5 eigenvalues:", np.round(np.asarray(top), 3))

fig, ax = plt.subplots(figsize=(7, 3.5))
ax.semilogy(grid, density, color="tab:blue")
for lam in top:
    ax.axvline(float(lam), color="tab:red", lw=0.8, ls="--")
ax.set(
    title="Hessian spectral density (SLQ, 80 Lanczos steps); dashed: top 5 eigenvalues",
    xlabel="eigenvalue",
    ylabel="density",
    ylim=(1e-5, 3 * float(density.max())),
)
plt.show()

# %% [markdown]
# ## The trace
#
# Hutch++ spends a third of its budget on a sketch of the top of the spectrum, which it
# handles exactly, and estimates the rest with Hutchinson's estimator, so on a spectrum
# like the one above it is much more accurate than plain Hutchinson at equal cost. For a
# ReLU network the Hessian diagonal is exact and cheap (`hessian_diagonal`), and its
# sum is the exact trace to compare with. The per-layer sums are the block traces that
# Minimum Sharpness rebalances.

# %%
for method in ("hutchinson", "hutch++"):
    est = sharpness.hessian_trace(loss, params, key, num_samples=99, method=method)
    print(f"{method:10s}  trace ≈ {float(est.value):7.3f} ± {float(est.std_error):.3f}")

diagonal = sharpness.hessian_diagonal(logits_fn, params, (x, y))
exact = sum(float(jnp.sum(d)) for d in jax.tree.leaves(diagonal))
print(f"{'exact':10s}  trace = {exact:7.3f}  (sum of the exact diagonal)")
for name, layer in diagonal.items():
    block = {k: round(float(jnp.sum(v)), 3) for k, v in layer.items()}
    print(f"  {name}: {block}")

# %% [markdown]
# ## Minimum Sharpness
#
# `granularity="layer"` minimises the trace over rescalings of whole layers
# (`W_l → α_l W_l`, `Π_l α_l = 1`, biases following), the paper's definition;
# `granularity="node"` over the finer rescalings of individual hidden units (incoming
# weights and bias times `a`, outgoing weights divided by `a`), which contain the
# layer ones, so node-wise ≤ layer-wise ≤ trace. Both problems are convex in the log
# scales and are solved by Newton's method from the exact Hessian diagonal.

# %%
batch = (x, y)
ms_layer = sharpness.minimum_sharpness(logits_fn, params, batch, granularity="layer")
ms_node = sharpness.minimum_sharpness(logits_fn, params, batch, granularity="node")
print(f"trace                    {float(ms_layer.trace):8.3f}")
print(f"Minimum Sharpness, layer {float(ms_layer.value):8.3f}")
print(f"Minimum Sharpness, node  {float(ms_node.value):8.3f}")
print("minimising layer scales α:", np.round(np.asarray(ms_layer.scales), 3))
print("Newton steps (layer, node):", int(ms_layer.num_steps), int(ms_node.num_steps))


# %% [markdown]
# ## A random function-preserving rescaling
#
# `rescale` multiplies the incoming weights and bias of hidden unit `j` of layer `l` by
# `a_lj = exp(u_lj)` and divides its outgoing weights by it; ReLU is positively
# homogeneous, so the logits do not change. We apply two random ones to the trained
# network:
#
# * **layer-wise**: one random scale per layer (all units of a layer share `u`), with
#   the scales of the three layers multiplying to 1;
# * **node-wise**: an independent random scale for every hidden unit.


# %%
def rescale(params, hidden_log_scales):
    # Per-unit log-scales u_l of the hidden layers; inputs and logits are not rescaled.
    names = list(params)  # Dense_0, Dense_1, Dense_2, in forward order
    n_in, n_out = params[names[0]]["kernel"].shape[0], params[names[-1]]["bias"].shape[0]
    u = [jnp.zeros(n_in), *hidden_log_scales, jnp.zeros(n_out)]
    return {
        name: {
            "kernel": params[name]["kernel"] * jnp.exp(u_out[None, :] - u_in[:, None]),
            "bias": params[name]["bias"] * jnp.exp(u_out),
        }
        for name, u_in, u_out in zip(names, u[:-1], u[1:], strict=True)
    }


key_layer, key_node1, key_node2 = jax.random.split(jax.random.key(1), 3)
s = jax.random.normal(key_layer, (3,))
s = s - s.mean()  # log α_l of the three layers, summing to 0
u = jnp.cumsum(s)  # unit log-scale of hidden layer l: s_1 + ... + s_l
networks = {
    "trained": params,
    "layer-wise rescaled": rescale(params, [jnp.full(32, u[0]), jnp.full(32, u[1])]),
    "node-wise rescaled": rescale(
        params, [jax.random.normal(key_node1, (32,)), jax.random.normal(key_node2, (32,))]
    ),
}
print("layer scales α =", np.round(np.exp(np.asarray(s)), 3))

# %%
reference = logits_fn(params, x)
columns = ["max|Δlogits|", "λ_max", "trace", "MinSharp layer", "MinSharp node"]
print(f"{'':20s}", *(f"{c:>14s}" for c in columns))
for name, p in networks.items():
    gap = float(jnp.max(jnp.abs(logits_fn(p, x) - reference)))
    lam = float(sharpness.top_eigenvalues(loss, p, key, k=5, num_iterations=50).value[0])
    layer = sharpness.minimum_sharpness(logits_fn, p, batch, granularity="layer")
    node = sharpness.minimum_sharpness(logits_fn, p, batch, granularity="node")
    values = [float(layer.trace), float(layer.value), float(node.value)]
    print(f"{name:20s} {gap:14.1e} {lam:14.3f}", *(f"{v:14.3f}" for v in values))

# %% [markdown]
# The three networks compute the same function (the logits agree to float32 rounding),
# yet the top eigenvalue and the trace move by large factors. Minimum Sharpness does not
# move where it should not:
#
# * the **layer-wise** value is unchanged by the layer-wise rescaling, but not by the
#   node-wise one, which lies outside the group it minimises over;
# * the **node-wise** value is unchanged by both, since node rescalings include layer
#   rescalings.
#
# ## The minimising rescaling
#
# `apply_scales` turns a result into the equivalent parameters at which the trace
# attains the minimum: a canonical, "flattest" representative of the function.

# %%
p_min = sharpness.apply_scales(params, ms_node)
gap = float(jnp.max(jnp.abs(logits_fn(p_min, x) - reference)))
diag_min = sharpness.hessian_diagonal(logits_fn, p_min, batch)
trace_min = sum(float(jnp.sum(d)) for d in jax.tree.leaves(diag_min))
print(f"max |Δlogits| = {gap:.1e}")
print(f"trace at the minimiser:      {trace_min:.4f}")
print(f"node-wise Minimum Sharpness: {float(ms_node.value):.4f}")

# %% [markdown]
# ## GGN, Fisher and per-layer curvature
#
# For softmax cross-entropy the generalised Gauss–Newton matrix
# `G = (1/n) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i` is the positive semi-definite part of the
# Hessian; `curvature="ggn"` (or `"fisher"`, the empirical Fisher) computes its products
# through `logits_fn` without forming `J`. `per_layer=True` gives one result per
# top-level parameter collection, each the measure of that layer's diagonal block.

# %%
ce = sharpness.SoftmaxCrossEntropy(logits_fn)
data = [(x, y)]
for curvature in ("hessian", "ggn", "fisher"):
    values = sharpness.top_eigenvalues(
        ce, params, key, k=3, num_iterations=40, curvature=curvature, batches=data
    ).value
    print(f"{curvature:8s} top 3: {np.round(np.asarray(values), 3)}")
per_layer = sharpness.top_eigenvalues(loss, params, key, k=1, num_iterations=40, per_layer=True)
print("per-layer top eigenvalue:", {k: round(float(v.value[0]), 3) for k, v in per_layer.items()})

# %% [markdown]
# ## Loss landscapes of SGD and SAM
#
# The picture SAM papers show: the same network trained from the same initialisation
# and data order by SGD and by SAM (ρ = 0.1) on that SGD, sliced along random directions
# filter-normalised to each network's own weights (Li et al., NeurIPS 2018; biases
# fixed), drawn from the same key. `experiments/landscapes.py` makes the same figures
# for the README (`results/landscapes/`).

# %%
sam_tx = optax.chain(sharpjax.sam(0.1), optax.sgd(0.05, momentum=0.9))


@jax.jit
def sam_step(params, opt_state, xb, yb):
    grads = jax.grad(batch_loss)(params, xb, yb)
    grad_fn = lambda p: jax.grad(batch_loss)(p, xb, yb)
    updates, opt_state = sam_tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state


sam_params = model.init(jax.random.key(0), x[:1])["params"]
sam_state = sam_tx.init(sam_params)
for epoch in range(20):
    batches = iterate_batches(ds.x_train, ds.y_train, batch_size=128, seed=0, epoch=epoch)
    for xb, yb in batches:
        sam_params, sam_state = sam_step(sam_params, sam_state, xb, yb)
print(f"SAM test acc {accuracy(sam_params, ds.x_test, ds.y_test):.3f}")

nets = {"SGD": params, "SAM": sam_params}
lkey = jax.random.key(42)
one = {n: sharpness.loss_landscape(ce, p, lkey, 1, batches=data) for n, p in nets.items()}
two = {n: sharpness.loss_landscape(ce, p, lkey, 2, batches=data) for n, p in nets.items()}
sharpness.plot_landscape(one, title="1-D slice (training loss)")
sharpness.plot_landscape(two, title="2-D slices (training loss)")
plt.show()

# %% [markdown]
# ## Summary
#
# * Spectrum and trace are cheap to measure with HVPs, but they are properties of the
#   parametrisation as much as of the function: a rescaling that changes nothing about
#   the predictions changes them by large factors.
# * Minimum Sharpness removes exactly that freedom, at the cost of one exact Hessian
#   diagonal and a small convex solve. It is defined for feed-forward chains of Dense
#   and Conv layers with positively homogeneous activations (no skip connections or
#   normalisation layers).
# * `sharpjax.sharpness.adaptive_sharpness` (Andriushchenko et al., 2023) is another
#   rescaling-invariant measure, based on worst- or average-case loss increases in an
#   elementwise-scaled ball; see its docstring.
