"""Writes the three sharpjax notebooks, without outputs.

Run from anywhere: ``python notebooks/build_notebooks.py``. The notebooks are generated from
the cell sources below, so edit this file and regenerate rather than editing the ``.ipynb``
files by hand. Cell ids are deterministic, so regenerating an unchanged notebook gives an
identical file. Execute them with ``python -m pytest notebooks --nbmake``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"name": "python", "pygments_lexer": "ipython3"}


def md(text: str) -> tuple[str, str]:
    return "markdown", textwrap.dedent(text).strip()


def code(text: str) -> tuple[str, str]:
    return "code", textwrap.dedent(text).strip()


# --------------------------------------------------------------------------------------
# 1. Quickstart: SAM and SANER in an optax chain, against SGD, under label noise.
# --------------------------------------------------------------------------------------

QUICKSTART = [
    md(
        """
        # sharpjax quickstart: SAM and SANER as optax transformations

        sharpjax's optimizers are `optax` transformations that go **in front of** any base
        optimizer in `optax.chain`. Each sharpness-aware step takes two gradients:

        1. the clean gradient `g = ∇L(w)`, which the training step computes as usual and
           passes to `tx.update` as `updates`;
        2. a second gradient `g₂ = ∇L(w + ε)` at a perturbed point, which the transformation
           computes itself by calling the `grad_fn` you pass to `tx.update`.

        SAM (Foret et al., ICLR 2021) perturbs along the gradient, `ε = ρ g/‖g‖`, and hands
        `g₂` to the base optimizer, which then steps **from `w`**, not from `w + ε`.
        SANER (arXiv 2411.17132) additionally down-weights, by a factor `α`, the coordinates
        where `g₂` has the sign of `g` but a smaller magnitude, which the paper argues are the
        ones that drive the fitting of noisy labels.

        This notebook trains a small MLP on the embedded `digits` data with 40 % symmetric
        label noise, with SGD, SAM and SANER, and plots the diagnostics that
        `sharpjax.diagnostics(opt_state)` reads out of the optimizer state.
        Everything runs offline on the CPU in a few seconds.
        """
    ),
    code(
        """
        import time

        import jax
        import jax.numpy as jnp
        import matplotlib.pyplot as plt
        import numpy as np
        import optax

        import sharpjax
        from sharpjax.data import iterate_batches, load_dataset
        from sharpjax.models import get_model
        """
    ),
    md(
        """
        ## Data and model

        `load_dataset("digits", noise="symmetric", noise_rate=0.4)` corrupts 40 % of the
        *training* labels (uniformly to another class) and keeps the true ones in
        `y_train_clean`, so we can later measure how many wrong labels each network has
        memorised. The test labels are clean. The model is a flax.linen MLP with one hidden
        layer of 128 ReLU units.
        """
    ),
    code(
        """
        ds = load_dataset("digits", noise="symmetric", noise_rate=0.4, seed=0)
        print(f"train {ds.x_train.shape}, test {ds.x_test.shape}")
        print(f"fraction of corrupted training labels: {ds.noisy_mask.mean():.3f}")

        model = get_model("mlp", ds.num_classes, hidden_sizes=(128,))
        params0 = model.init(jax.random.key(0), ds.x_train[:1])["params"]
        jax.tree.map(jnp.shape, params0)
        """
    ),
    md(
        """
        ## The optimizers

        One line each. The base optimizer (SGD with momentum) is the same for all three;
        SAM and SANER only change the gradient it receives. `ρ = 0.1` is SANER's default
        radius, and we use it for SAM too so that the two differ only in the reweighting.
        SANER's `α = 0.5` is the paper's value; the paper reaches it by a linear warm-up from
        `α = 1` (`alpha=sharpjax.saner_warmup(0.5, warmup_steps)`), which this short run skips.
        """
    ),
    code(
        """
        rho, lr = 0.1, 0.05
        optimizers = {
            "SGD": optax.sgd(lr, momentum=0.9),
            "SAM": optax.chain(sharpjax.sam(rho), optax.sgd(lr, momentum=0.9)),
            "SANER": optax.chain(sharpjax.saner(rho, alpha=0.5), optax.sgd(lr, momentum=0.9)),
        }
        """
    ),
    md(
        """
        ## A compact training loop

        The step is an ordinary optax step with one addition: `grad_fn`, the gradient of the
        **same mini-batch** loss as a function of the parameters. The transformation calls it
        once, at `w + ε`. A plain optax optimizer ignores the extra argument, so the same step
        function trains SGD too. The whole step is jitted; the diagnostics are small float32
        scalars in the optimizer state, returned from the step so that the host reads them
        once at the end.
        """
    ),
    code(
        """
        def loss_fn(params, x, y):
            logits = model.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


        def make_step(tx):
            @jax.jit
            def step(params, opt_state, x, y):
                loss, grads = jax.value_and_grad(loss_fn)(params, x, y)  # clean gradient at w
                grad_fn = lambda p: jax.grad(loss_fn)(p, x, y)  # called once, at w + ε
                updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
                params = optax.apply_updates(params, updates)  # the step starts from w
                logs = {"loss": loss, "clean_grad_norm": optax.global_norm(grads)}
                return params, opt_state, {**logs, **sharpjax.diagnostics(opt_state)}

            return step


        @jax.jit
        def accuracy(params, x, y):
            return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)
        """
    ),
    code(
        """
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
        """
    ),
    md(
        """
        ## What the diagnostics say

        Every sharpjax transformation stores the last step's diagnostics in its state:
        `grad_norm` (‖g‖), `perturbation_norm` (‖ε‖, equal to ρ here), `second_grad_norm`
        (‖g₂‖), `cosine` (between `g` and `g₂`) and `rho`, plus those of the variant: SANER's
        `masked_fraction` (the fraction of coordinates it down-weights) and `alpha`.
        """
    ),
    code(
        """
        {k: float(v) for k, v in sharpjax.diagnostics(results["SANER"]["opt_state"]).items()}
        """
    ),
    code(
        """
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
        """
    ),
    md(
        """
        ## Memorisation of the noisy labels

        All three reach a similar best test accuracy in the first epochs, before the network
        starts to fit the wrong labels; afterwards test accuracy falls as the corrupted
        training labels get memorised. The fraction of corrupted training examples predicted
        with their *wrong* (given) label measures that memorisation directly. In this run SAM
        memorises fewer of them than SGD, and SANER fewer still, which is what keeps its test
        accuracy higher. (One seed and a short schedule: a demonstration, not a benchmark;
        `experiments/label_noise.py` runs the comparison properly.)
        """
    ),
    code(
        """
        noisy = ds.noisy_mask
        print(f"{'':6s} {'best test':>9s} {'final test':>10s} {'noisy labels fit':>16s}")
        for name, r in results.items():
            fit = accuracy(r["params"], ds.x_train[noisy], ds.y_train[noisy])
            best, final = r["test_acc"].max(), r["test_acc"][-1]
            print(f"{name:6s} {best:9.3f} {final:10.3f} {float(fit):16.3f}")
        """
    ),
    md(
        """
        ## Where to go next

        * Other variants are one line: `sharpjax.asam(rho, eta)`, `sharpjax.vasso(rho, theta)`,
          `sharpjax.gsam(rho, alpha)`, SANER on VaSSO
          `sharpjax.saner(rho, alpha, perturbation=sharpjax.vasso_perturbation(0.9))`,
          noise-resistant SAM `sharpjax.noise_resistant_sam(rho, mu)`, and `sharpjax.msam`
          (see its docstring for its micro-batch `grad_fn(params, j)` contract).
        * `loss_landscape.ipynb` looks at the minima SGD and SAM find;
          `sharpness_measures.ipynb` measures their sharpness.
        """
    ),
]


# --------------------------------------------------------------------------------------
# 2. Loss landscape: filter-normalised random slices around SGD and SAM minima.
# --------------------------------------------------------------------------------------

LOSS_LANDSCAPE = [
    md(
        """
        # Loss landscapes of SGD and SAM minima

        A common picture of why SAM generalises: it finds *flatter* minima. This notebook
        draws the training loss around an SGD and a SAM solution of the same network, along
        random directions, following Li, Xu, Taylor, Studer & Goldstein, *Visualizing the
        Loss Landscape of Neural Nets* (NeurIPS 2018):

        * 1-D slices `α ↦ L(w + α d)` and 2-D slices `(α, β) ↦ L(w + α d₁ + β d₂)`;
        * **filter normalisation**: a random Gaussian direction `d` is rescaled filter by
          filter, `d_f ← d_f ‖w_f‖ / ‖d_f‖`, so that each filter (a conv output channel, or
          a Dense output unit) is perturbed in proportion to its own size. A ReLU network
          computes the same function after multiplying one layer by `c` and the next by
          `1/c`, and an unnormalised direction would make such an equivalent network look
          sharper or flatter. Following the paper's code, bias directions are set to zero.

        The networks are small MLPs on the embedded `digits` data, so the whole notebook
        runs offline on the CPU in seconds.
        """
    ),
    code(
        """
        import jax
        import jax.numpy as jnp
        import matplotlib
        import matplotlib.pyplot as plt
        import numpy as np
        import optax

        import sharpjax
        from sharpjax.data import iterate_batches, load_dataset
        from sharpjax.models import get_model
        """
    ),
    md(
        """
        ## Train SGD and SAM from the same initialisation

        Same data order, same base optimizer (SGD with momentum); SAM with `ρ = 0.2`.
        Both fit the training set.
        """
    ),
    code(
        """
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
        """
    ),
    md(
        """
        ## Filter-normalised directions

        flax stores a Dense kernel as `(in, out)` and a Conv kernel as `(..., in, out)`, so a
        filter is a slice along the **last** axis and its norm is taken over all the other
        axes. One-dimensional leaves (biases) get a zero direction.
        """
    ),
    code(
        """
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
        """
    ),
    md(
        """
        ## 1-D and 2-D slices

        Both networks are sliced along directions drawn from the **same** random keys, each
        normalised to its own network's filters, so the two pictures are directly comparable.
        """
    ),
    code(
        """
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
        """
    ),
    code(
        """
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
        """
    ),
    md(
        """
        Along these filter-normalised directions the loss rises more slowly around the SAM
        solution: its basin is wider, and the contours (shared, logarithmically spaced
        levels) are further apart. Random directions mostly probe the bulk of the Hessian
        spectrum rather than its top eigen-directions; `sharpness_measures.ipynb` measures
        the spectrum itself.

        ## Why filter normalisation

        Multiply the first layer of the SGD network by 4 and the second by 1/4: a ReLU
        network computes exactly the same function. Along a random direction of a *fixed*
        norm (here the norm of the filter-normalised direction of the original network)
        the two equivalent networks look very different; along filter-normalised
        directions, which rescale with the weights, they give the same curve.
        """
    ),
    code(
        """
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
        """
    ),
    md(
        """
        The rescaled network along its own filter-normalised direction (dots) retraces the
        original curve exactly, while the same fixed direction (dashed) makes the very same
        function look much sharper. Filter normalisation removes this scale ambiguity for
        the rescalings of whole layers and filters; sharpness measures that are invariant
        to *all* such rescalings are the subject of `sharpness_measures.ipynb`
        (Minimum Sharpness).
        """
    ),
]


# --------------------------------------------------------------------------------------
# 3. Sharpness measures.
# --------------------------------------------------------------------------------------

SHARPNESS_MEASURES = [
    md(
        """
        # Measuring sharpness: spectrum, trace and Minimum Sharpness

        `sharpjax.sharpness` measures the curvature of the loss at trained parameters with
        Hessian-vector products, never forming the Hessian:

        * `top_eigenvalues` (Lanczos) and `spectral_density` (stochastic Lanczos quadrature,
          Ghorbani, Krishnan & Xiao, ICML 2019): the spectrum of the Hessian;
        * `hessian_trace` (Hutchinson, Hutch++): its trace, the sum of all curvatures;
        * `hessian_diagonal`: the exact diagonal for ReLU networks (per-example
          Gauss-Newton), and
        * `minimum_sharpness` (Ibayashi, Hamaguchi & Imaizumi, 2021): the trace minimised
          over all rescalings of the network that leave its function unchanged.

        Why the last one: Dinh et al. (ICML 2017) pointed out that a ReLU network computes
        the same function after multiplying a layer (or one unit's incoming weights) by
        `c > 0` and the next layer (that unit's outgoing weights) by `1/c`, while the
        Hessian, and with it the trace and the top eigenvalue, change arbitrarily. A measure
        meant to say something about *the function* should not depend on that choice.
        Minimum Sharpness does not, by construction. This notebook shows it on a small
        trained network, offline on the CPU.
        """
    ),
    code(
        """
        import jax
        import jax.numpy as jnp
        import matplotlib.pyplot as plt
        import numpy as np
        import optax

        from sharpjax import sharpness
        from sharpjax.data import iterate_batches, load_dataset
        from sharpjax.models import get_model
        """
    ),
    md(
        """
        ## A small trained network

        A ReLU MLP with two hidden layers of 32 units (3,466 parameters) on the embedded
        `digits` data, trained with SGD to (near) zero training error. Its parameters are
        the plain `Dense_0, Dense_1, Dense_2` collections, in forward order, that the
        layer-wise measures expect.
        """
    ),
    code(
        """
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
        """
    ),
    md(
        """
        ## The Hessian spectrum

        The loss-based measures take `loss_fn(params) -> scalar`; here the mean
        cross-entropy on the whole training set (for data that does not fit in memory, pass
        `loss_fn(params, batch)` and `batches=`). `top_eigenvalues` runs Lanczos with full
        reorthogonalisation; `spectral_density` averages the Gaussian-broadened Ritz values
        of Lanczos runs from random probes, weighted by the quadrature weights. As is typical
        for trained classifiers, most eigenvalues sit in a bulk near zero, with a handful of
        outliers to the right (for `K` classes, typically up to about `K` of them; Sagun et
        al. 2017, Papyan 2019).
        """
    ),
    code(
        """
        def loss(params):
            return batch_loss(params, x, y)


        key = jax.random.key(0)
        top = sharpness.top_eigenvalues(loss, params, key, k=5, num_iterations=50)
        grid, density = sharpness.spectral_density(loss, params, key, num_iterations=80)
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
        """
    ),
    md(
        """
        ## The trace

        Hutch++ spends a third of its budget on a sketch of the top of the spectrum, which it
        handles exactly, and estimates the rest with Hutchinson's estimator, so on a spectrum
        like the one above it is much more accurate than plain Hutchinson at equal cost. For a
        ReLU network the Hessian diagonal is exact and cheap (`hessian_diagonal`), and its
        sum is the exact trace to compare with. The per-layer sums are the block traces that
        Minimum Sharpness rebalances.
        """
    ),
    code(
        """
        for method in ("hutchinson", "hutch++"):
            est = sharpness.hessian_trace(loss, params, key, num_samples=99, method=method)
            print(f"{method:10s}  trace ≈ {float(est.value):7.3f} ± {float(est.std_error):.3f}")

        diagonal = sharpness.hessian_diagonal(logits_fn, params, (x, y))
        exact = sum(float(jnp.sum(d)) for d in jax.tree.leaves(diagonal))
        print(f"{'exact':10s}  trace = {exact:7.3f}  (sum of the exact diagonal)")
        for name, layer in diagonal.items():
            block = {k: round(float(jnp.sum(v)), 3) for k, v in layer.items()}
            print(f"  {name}: {block}")
        """
    ),
    md(
        """
        ## Minimum Sharpness

        `granularity="layer"` minimises the trace over rescalings of whole layers
        (`W_l → α_l W_l`, `Π_l α_l = 1`, biases following), the paper's definition;
        `granularity="node"` over the finer rescalings of individual hidden units (incoming
        weights and bias times `a`, outgoing weights divided by `a`), which contain the
        layer ones, so node-wise ≤ layer-wise ≤ trace. Both problems are convex in the log
        scales and are solved by Newton's method from the exact Hessian diagonal.
        """
    ),
    code(
        """
        batch = (x, y)
        ms_layer = sharpness.minimum_sharpness(logits_fn, params, batch, granularity="layer")
        ms_node = sharpness.minimum_sharpness(logits_fn, params, batch, granularity="node")
        print(f"trace                    {float(ms_layer.trace):8.3f}")
        print(f"Minimum Sharpness, layer {float(ms_layer.value):8.3f}")
        print(f"Minimum Sharpness, node  {float(ms_node.value):8.3f}")
        print("minimising layer scales α:", np.round(np.asarray(ms_layer.scales), 3))
        print("Newton steps (layer, node):", int(ms_layer.num_steps), int(ms_node.num_steps))
        """
    ),
    md(
        """
        ## A random function-preserving rescaling

        `rescale` multiplies the incoming weights and bias of hidden unit `j` of layer `l` by
        `a_lj = exp(u_lj)` and divides its outgoing weights by it; ReLU is positively
        homogeneous, so the logits do not change. We apply two random ones to the trained
        network:

        * **layer-wise**: one random scale per layer (all units of a layer share `u`), with
          the scales of the three layers multiplying to 1;
        * **node-wise**: an independent random scale for every hidden unit.
        """
    ),
    code(
        """
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
        """
    ),
    code(
        """
        reference = logits_fn(params, x)
        columns = ["max|Δlogits|", "λ_max", "trace", "MinSharp layer", "MinSharp node"]
        print(f"{'':20s}", *(f"{c:>14s}" for c in columns))
        for name, p in networks.items():
            gap = float(jnp.max(jnp.abs(logits_fn(p, x) - reference)))
            lam = float(sharpness.top_eigenvalues(loss, p, key, k=5, num_iterations=50)[0])
            layer = sharpness.minimum_sharpness(logits_fn, p, batch, granularity="layer")
            node = sharpness.minimum_sharpness(logits_fn, p, batch, granularity="node")
            values = [float(layer.trace), float(layer.value), float(node.value)]
            print(f"{name:20s} {gap:14.1e} {lam:14.3f}", *(f"{v:14.3f}" for v in values))
        """
    ),
    md(
        """
        The three networks compute the same function (the logits agree to float32 rounding),
        yet the top eigenvalue and the trace move by large factors. Minimum Sharpness does not
        move where it should not:

        * the **layer-wise** value is unchanged by the layer-wise rescaling, but not by the
          node-wise one, which lies outside the group it minimises over;
        * the **node-wise** value is unchanged by both, since node rescalings include layer
          rescalings.

        ## The minimising rescaling

        `apply_scales` turns a result into the equivalent parameters at which the trace
        attains the minimum: a canonical, "flattest" representative of the function.
        """
    ),
    code(
        """
        p_min = sharpness.apply_scales(params, ms_node)
        gap = float(jnp.max(jnp.abs(logits_fn(p_min, x) - reference)))
        diag_min = sharpness.hessian_diagonal(logits_fn, p_min, batch)
        trace_min = sum(float(jnp.sum(d)) for d in jax.tree.leaves(diag_min))
        print(f"max |Δlogits| = {gap:.1e}")
        print(f"trace at the minimiser:      {trace_min:.4f}")
        print(f"node-wise Minimum Sharpness: {float(ms_node.value):.4f}")
        """
    ),
    md(
        """
        ## Summary

        * Spectrum and trace are cheap to measure with HVPs, but they are properties of the
          parametrisation as much as of the function: a rescaling that changes nothing about
          the predictions changes them by large factors.
        * Minimum Sharpness removes exactly that freedom, at the cost of one exact Hessian
          diagonal and a small convex solve. It is defined for feed-forward chains of Dense
          and Conv layers with positively homogeneous activations (no skip connections or
          normalisation layers).
        * `sharpjax.sharpness.adaptive_sharpness` (Andriushchenko et al., 2023) is another
          rescaling-invariant measure, based on worst- or average-case loss increases in an
          elementwise-scaled ball; see its docstring.
        """
    ),
]


NOTEBOOKS = {
    "quickstart.ipynb": QUICKSTART,
    "loss_landscape.ipynb": LOSS_LANDSCAPE,
    "sharpness_measures.ipynb": SHARPNESS_MEASURES,
}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": KERNELSPEC, "language_info": LANGUAGE_INFO}
    stem = name.removesuffix(".ipynb").replace("_", "-")
    for i, (kind, source) in enumerate(cells):
        new = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        nb.cells.append(new(source, id=f"{stem}-{i:02d}"))
    nbformat.validate(nb)
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(name, cells), HERE / name)
        print(f"wrote {HERE / name} ({len(cells)} cells)")


if __name__ == "__main__":
    main()
