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
# # sharpjax quickstart: SAM and SANER as optax transformations
#
# sharpjax's optimizers are `optax` transformations that go **in front of** any base
# optimizer in `optax.chain`. Each sharpness-aware step takes two gradients:
#
# 1. the clean gradient `g = ∇L(w)`, which the training step computes as usual and
#    passes to `tx.update` as `updates`;
# 2. a second gradient `g₂ = ∇L(w + ε)` at a perturbed point, which the transformation
#    computes itself by calling the `grad_fn` you pass to `tx.update`.
#
# SAM (Foret et al., ICLR 2021) perturbs along the gradient, `ε = ρ g/‖g‖`, and hands
# `g₂` to the base optimizer, which then steps **from `w`**, not from `w + ε`.
# SANER (arXiv 2411.17132) additionally down-weights, by a factor `α`, the coordinates
# where `g₂` has the sign of `g` but a smaller magnitude, which the paper argues are the
# ones that drive the fitting of noisy labels.
#
# This notebook trains a small MLP on the embedded `digits` data with 40 % symmetric
# label noise, with SGD, SAM and SANER, and plots the diagnostics that
# `sharpjax.diagnostics(opt_state)` reads out of the optimizer state.
# Everything runs offline on the CPU in a few seconds.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import sharpjax
from sharpjax.data import iterate_batches, load_dataset
from sharpjax.models import get_model

# %% [markdown]
# ## Data and model
#
# `load_dataset("digits", noise="symmetric", noise_rate=0.4)` corrupts 40 % of the
# *training* labels (uniformly to another class) and keeps the true ones in
# `y_train_clean`, so we can later measure how many wrong labels each network has
# memorised. The test labels are clean. The model is a flax.linen MLP with one hidden
# layer of 128 ReLU units.

# %%
ds = load_dataset("digits", noise="symmetric", noise_rate=0.4, seed=0)
print(f"train {ds.x_train.shape}, test {ds.x_test.shape}")
print(f"fraction of corrupted training labels: {ds.noisy_mask.mean():.3f}")

model = get_model("mlp", ds.num_classes, hidden_sizes=(128,))
params0 = model.init(jax.random.key(0), ds.x_train[:1])["params"]
jax.tree.map(jnp.shape, params0)

# %% [markdown]
# ## The optimizers
#
# One line each. The base optimizer (SGD with momentum) is the same for all three;
# SAM and SANER only change the gradient it receives. `ρ = 0.1` is SANER's default
# radius, and we use it for SAM too so that the two differ only in the reweighting.
# SANER's `α = 0.5` is the paper's value; the paper reaches it by a linear warm-up from
# `α = 1` (`alpha=sharpjax.saner_warmup(0.5, warmup_steps)`), which this short run skips.
# `cosine=True` asks SAM to report the cosine between `g` and `g₂`, which we plot below: it
# keeps `g` in memory through the second pass (one parameter copy), so SAM leaves it out by
# default; SANER reads `g` anyway and always reports it.

# %%
rho, lr = 0.1, 0.05
optimizers = {
    "SGD": optax.sgd(lr, momentum=0.9),
    "SAM": optax.chain(sharpjax.sam(rho, cosine=True), optax.sgd(lr, momentum=0.9)),
    "SANER": optax.chain(sharpjax.saner(rho, alpha=0.5), optax.sgd(lr, momentum=0.9)),
}


# %% [markdown]
# ## A compact training loop
#
# The step is an ordinary optax step with one addition: `grad_fn`, the gradient of the
# **same mini-batch** loss as a function of the parameters (here `value_and_grad_fn`, the
# loss and the gradient, and `loss`, the clean loss, so that the diagnostics also report
# the losses at `w` and `w + ε`). The transformation calls it once, at `w + ε`. A plain
# optax optimizer ignores the extra arguments, so the same step function trains SGD too.
# The whole step is jitted; the diagnostics are small float32 scalars in the optimizer
# state, returned from the step so that the host reads them once at the end.


# %%
def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(tx):
    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)  # clean gradient at w
        # called once, at w + ε; the loss there gives the diagnostics `sharpness` (or pass
        # grad_fn=lambda p: jax.grad(loss_fn)(p, x, y) alone: no loss diagnostics then)
        value_and_grad_fn = lambda p: jax.value_and_grad(loss_fn)(p, x, y)
        updates, opt_state = tx.update(
            grads, opt_state, params, value_and_grad_fn=value_and_grad_fn, loss=loss
        )
        params = optax.apply_updates(params, updates)  # the step starts from w
        logs = {"loss": loss, "clean_grad_norm": optax.global_norm(grads)}
        return params, opt_state, {**logs, **sharpjax.diagnostics(opt_state)}

    return step


@jax.jit
def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)


# %%
epochs, batch_size = 60, 128
results = {}
for name, tx in optimizers.items():
    start = time.perf_counter()
    step = make_step(tx)
    params, opt_state = params0, tx.init(params0)
    logs, test_acc = [], []
    for epoch in range(epochs):
        batches = iterate_batches(
            ds.x_train, ds.y_train, batch_size=batch_size, seed=0, epoch=epoch
        )
        for x, y in batches:
            params, opt_state, log = step(params, opt_state, x, y)
            logs.append(log)
        test_acc.append(accuracy(params, ds.x_test, ds.y_test))
    logs = jax.tree.map(lambda *v: np.asarray(jnp.stack(v)), *logs)
    results[name] = {
        "params": params,
        "opt_state": opt_state,
        "logs": logs,
        "test_acc": np.asarray(test_acc),
    }
    print(f"{name:6s} {len(logs['loss'])} steps in {time.perf_counter() - start:.1f} s")

# %% [markdown]
# ## What the diagnostics say
#
# Every sharpjax transformation stores the last step's diagnostics in its state:
# `grad_norm` (‖g‖), `perturbation_norm` (‖ε‖, equal to ρ here), `second_grad_norm`
# (‖g₂‖), `cosine` (between `g` and `g₂`), `rho`, the losses `loss` (at `w`) and
# `perturbed_loss` (at `w + ε`) and their difference `sharpness`, plus those of the
# variant: SANER's `masked_fraction` (the fraction of coordinates it down-weights) and
# `alpha`.

# %%
{k: float(v) for k, v in sharpjax.diagnostics(results["SANER"]["opt_state"]).items()}


# %%
def smooth(v, window=20):
    return np.convolve(v, np.ones(window) / window, mode="valid")


colors = {"SGD": "tab:gray", "SAM": "tab:blue", "SANER": "tab:red"}
fig, axes = plt.subplots(2, 2, figsize=(11, 7))
ax = axes[0, 0]
for name, r in results.items():
    ax.plot(smooth(r["logs"]["clean_grad_norm"]), color=colors[name], label=name)
ax.set(title="clean gradient norm ‖g‖", xlabel="step", yscale="log")
ax.legend()
ax = axes[0, 1]
for name in ("SAM", "SANER"):
    ax.plot(smooth(results[name]["logs"]["cosine"]), color=colors[name], label=name)
ax.set(title="cosine between g and g₂ = ∇L(w + ε)", xlabel="step")
ax.legend()
ax = axes[1, 0]
ax.plot(smooth(results["SANER"]["logs"]["masked_fraction"]), color=colors["SANER"])
ax.set(title="SANER: fraction of down-weighted coordinates", xlabel="step")
ax = axes[1, 1]
for name, r in results.items():
    ax.plot(np.arange(1, epochs + 1), r["test_acc"], color=colors[name], label=name)
ax.set(title="test accuracy (clean labels)", xlabel="epoch")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Memorisation of the noisy labels
#
# All three reach a similar best test accuracy in the first epochs, before the network
# starts to fit the wrong labels; afterwards test accuracy falls as the corrupted
# training labels get memorised. The fraction of corrupted training examples predicted
# with their *wrong* (given) label measures that memorisation directly. In this run SAM
# memorises fewer of them than SGD, and SANER fewer still, which is what keeps its test
# accuracy higher. (One seed and a short schedule: a demonstration, not a benchmark;
# `experiments/label_noise.py` runs the comparison properly.)

# %%
noisy = ds.noisy_mask
print(f"{'':6s} {'best test':>9s} {'final test':>10s} {'noisy labels fit':>16s}")
for name, r in results.items():
    fit = accuracy(r["params"], ds.x_train[noisy], ds.y_train[noisy])
    best, final = r["test_acc"].max(), r["test_acc"][-1]
    print(f"{name:6s} {best:9.3f} {final:10.3f} {float(fit):16.3f}")

# %% [markdown]
# ## Where to go next
#
# * Other variants are one line: `sharpjax.asam(rho, eta)`, `sharpjax.vasso(rho, theta)`,
#   `sharpjax.gsam(rho, alpha)`, SANER on VaSSO
#   `sharpjax.saner(rho, alpha, perturbation=sharpjax.vasso_perturbation(0.9))`,
#   noise-resistant SAM `sharpjax.noise_resistant_sam(rho, mu)`, and `sharpjax.msam`
#   (see its docstring for its micro-batch `grad_fn(params, j)` contract).
# * `loss_landscape.ipynb` looks at the minima SGD and SAM find;
#   `sharpness_measures.ipynb` measures their sharpness.
