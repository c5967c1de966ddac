"""flax's ``TrainState`` with sharpjax's extra ``update`` arguments.

``flax.training.train_state.TrainState.apply_gradients(grads=...)`` calls
``tx.update(grads, opt_state, params)`` and nothing more, so a sharpness-aware transformation
never receives the ``grad_fn`` it needs for its second gradient. :class:`TrainState` is the
same dataclass whose ``apply_gradients`` forwards every keyword that is not a field of the
state to ``tx.update``::

    state = sharpjax.flax_utils.TrainState.create(
        apply_fn=model.apply, params=params, tx=optax.chain(sharpjax.sam(0.05), optax.sgd(0.1))
    )

    @jax.jit
    def train_step(state, batch):
        def loss_fn(params):
            return cross_entropy(state.apply_fn({"params": params}, batch["x"]), batch["y"])

        grads = jax.grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads, grad_fn=jax.grad(loss_fn))

The step starts from ``w``, not from ``w + ε``, exactly as in the plain optax loop
``updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)``.
"""

from __future__ import annotations

from sharpjax._extras import require_train_extra

require_train_extra("sharpjax.flax_utils", ("flax",))

import dataclasses
from typing import Any

import optax
from flax.training import train_state

__all__ = ["TrainState"]


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` whose ``apply_gradients`` passes extra
    arguments (``grad_fn``, ``value_and_grad_fn``, ``loss``, ...) on to ``tx.update``.

    Subclass it to add fields (e.g. ``batch_stats``), as with flax's own ``TrainState``.
    """

    def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
        """One optimizer step: ``params ← params + tx.update(grads, opt_state, params, ...)``.

        Args:
          grads: the clean gradient ``∇L(w)`` (a tree shaped like ``params``).
          **kwargs: keywords that name a field of the state (``batch_stats`` of a subclass,
            ...) replace that field, as in flax; every other keyword (``grad_fn=``,
            ``value_and_grad_fn=``, ``loss=``) goes to ``tx.update``.

        Returns:
          The state with ``step + 1``, the new ``params`` and the new ``opt_state``.
        """
        fields = {f.name for f in dataclasses.fields(self)}
        replaced = {k: v for k, v in kwargs.items() if k in fields}
        extra = {k: v for k, v in kwargs.items() if k not in fields}
        for name in ("step", "params", "opt_state"):
            if name in replaced:  # flax computes these three itself
                raise ValueError(
                    f"apply_gradients(..., {name}=...) would overwrite the {name} that the "
                    f"step computes; call state.replace({name}=...) instead."
                )
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **replaced)
