"""Filter-normalised loss landscapes of an SGD- and a SAM-trained network, side by side.

An MLP (64-64) on scikit-learn's digits (embedded, offline), trained from the same
initialisation with the same data order by SGD (lr 0.05, momentum 0.9) and by SAM (ρ = 0.2)
on that SGD, for 30 epochs of batch 128. Each network is sliced along directions drawn from
the same keys, filter-normalised to its own weights (Li et al., NeurIPS 2018; biases fixed),
with ``sharpness.loss_landscape``; the training loss is plotted with
``sharpness.plot_landscape`` on shared scales.

    python experiments/landscapes.py --out results/landscapes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import optax

matplotlib.use("Agg")

import sharpjax
from sharpjax import sharpness
from sharpjax.data import iterate_batches, load_dataset
from sharpjax.models import get_model


def train(model, params, ds, tx, epochs: int, batch_size: int):
    loss = sharpness.SoftmaxCrossEntropy(lambda p, x: model.apply({"params": p}, x))

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, (x, y))
        grad_fn = lambda p: jax.grad(loss)(p, (x, y))
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for epoch in range(epochs):
        for x, y in iterate_batches(
            ds.x_train, ds.y_train, batch_size=batch_size, seed=0, epoch=epoch
        ):
            params, state = step(params, state, x, y)
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--rho", type=float, default=0.2)
    ap.add_argument("--points-1d", type=int, default=51)
    ap.add_argument("--points-2d", type=int, default=31)
    ap.add_argument("--out", type=Path, default=Path("results/landscapes"))
    args = ap.parse_args()

    ds = load_dataset("digits")
    model = get_model("mlp", ds.num_classes, hidden_sizes=(64, 64))
    params0 = model.init(jax.random.key(0), ds.x_train[:1])["params"]
    logits_fn = lambda p, x: model.apply({"params": p}, x)
    loss = sharpness.SoftmaxCrossEntropy(logits_fn)
    data = (jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
    base = lambda: optax.sgd(0.05, momentum=0.9)
    nets = {
        "SGD": train(model, params0, ds, base(), args.epochs, 128),
        "SAM": train(
            model, params0, ds, optax.chain(sharpjax.sam(args.rho), base()), args.epochs, 128
        ),
    }
    key = jax.random.key(42)
    one, two, summary = {}, {}, {}
    for name, params in nets.items():
        kw = {"batches": [data]}
        one[name] = sharpness.loss_landscape(
            loss, params, key, 1, jnp.linspace(-1, 1, args.points_1d), **kw
        )
        two[name] = sharpness.loss_landscape(
            loss, params, key, 2, jnp.linspace(-1, 1, args.points_2d), **kw
        )
        acc = lambda x, y, p=params: float(jnp.mean(jnp.argmax(logits_fn(p, x), -1) == y))
        summary[name] = {
            "train_loss": float(loss(params, data)),
            "train_accuracy": acc(*data),
            "test_accuracy": acc(jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)),
            "loss_1d_at_-1_0_+1": [
                float(one[name].losses[i]) for i in (0, args.points_1d // 2, -1)
            ],
            "loss_2d_max": float(jnp.max(two[name].losses)),
        }
        print(name, json.dumps(summary[name]))
    args.out.mkdir(parents=True, exist_ok=True)
    title = "training loss along a filter-normalised\ndirection (digits, MLP 64-64)"
    fig = sharpness.plot_landscape(one, title=title)
    fig.savefig(args.out / "landscape_1d.png", dpi=160)
    fig = sharpness.plot_landscape(
        two, title="training loss on a filter-normalised 2-D slice (digits, MLP 64-64)"
    )
    fig.savefig(args.out / "landscape_2d.png", dpi=160)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}/landscape_1d.png, landscape_2d.png, summary.json")


if __name__ == "__main__":
    main()
