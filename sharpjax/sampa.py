"""SAMPa (Xie, Pethick & Cevher, *SAMPa: Sharpness-aware Minimization Parallelized*,
NeurIPS 2024): SAM whose two gradients do not depend on each other.

SAM's second gradient needs ε, which needs the first gradient: two sequential passes. SAMPa
takes ε from the gradient at an auxiliary point ``y_t`` computed in the previous step::

    x̃_t     = x_t + ρ ∇f(y_t) / ‖∇f(y_t)‖
    y_{t+1} = x_t − η_t ∇f(y_t)                                  (y_0 = x_0)
    x_{t+1} = x_t − η_t [(1 − λ) ∇f(x̃_t) + λ ∇f(y_{t+1})]

``∇f(x̃_t)`` and ``∇f(y_{t+1})`` both depend only on ``x_t`` and ``∇f(y_t)``, so they can be
computed at the same time: on a mesh with a ``pair`` axis of size 2 (:func:`sampa_mesh`), each
half of the devices computes one of them (``execution="parallel"``).

Checked against the paper's equations (above) and the authors' code (LIONS-EPFL/SAMPa
``train.py``, two ranks), which differs in three places; this module follows the paper:

* the auxiliary step: the code steps y with the base optimizer's own update at ``x_t``
  (SGD: ``y_{t+1} = x_t − η (∇f(y_t) + μ b_t + wd x_t)``, its momentum buffer and weight
  decay), the paper with ``η ∇f(y_t)``. Both readings are the same with plain SGD (μ = 0,
  no weight decay), the form of the paper's equations;
* the batches: the code takes ``∇f(x̃_t)`` on the previous step's batch (the one ``∇f(y_t)``
  came from) and ``∇f(y_{t+1})`` on this step's; here both take the step's batch
  (``grad_fn``), as the equations read;
* the first step: the code starts from ``∇f(y_0) = 0`` (ε = 0 and ``y_1 = x_0``); here
  ``y_0 = x_0`` (``∇f(y_0) = ∇f(x_0)``, one extra gradient at step 0), which we read as the
  paper's start (its equations, as in its README, do not show y_0; not checked in its text).

Both readings reduce alike: ρ = 0, λ = 0 is the base optimizer (``x̃_t = x_t``); λ = 0 is
plain SAMPa; λ = 1 steps on ``∇f(y_{t+1})`` alone, whatever ρ.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharpjax.core import (
    NORM_EPS,
    ScalarOrSchedule,
    _check_grad_fn,
    _check_same_structure,
    _initial_diagnostics,
    check_float_params,
    check_scalar_or_schedule,
    compute_dtype,
    evaluate,
    tree_norm,
    tree_vdot,
)

__all__ = ["SampaState", "sampa", "sampa_mesh"]

EXECUTIONS = ("sequential", "vmap", "parallel")
PAIR_AXIS = "pair"


class SampaState(NamedTuple):
    """The step count, ``∇f(y_t)`` (kept for the next step's ε), whether it is set, and the
    last step's diagnostics."""

    count: jax.Array
    y_grad: Any
    started: jax.Array
    diagnostics: dict[str, jax.Array]


def sampa(
    learning_rate: ScalarOrSchedule,
    rho: ScalarOrSchedule = 0.05,
    lam: float = 0.2,
    *,
    execution: str = "sequential",
    mesh: Mesh | None = None,
    pair_axis: str = PAIR_AXIS,
) -> optax.GradientTransformationExtraArgs:
    """SAMPa (Xie et al., NeurIPS 2024): the equations in this module's docstring.

    The output is ``(1 − λ) ∇f(x̃_t) + λ ∇f(y_{t+1})``; chain the base optimizer after it.
    ``learning_rate`` is η_t of ``y_{t+1} = x_t − η_t ∇f(y_t)``: pass the base optimizer's
    learning rate (float or the same schedule). With plain SGD at that rate the iterates are the
    paper's; with momentum or Adam, the auxiliary point still takes the plain gradient step of
    the equations (the paper states SAMPa for gradient descent).

    ``tx.update(grads, state, params, grad_fn=grad_fn)``: SAMPa never reads ``grads`` (only
    their structure), so under ``jax.jit`` a clean gradient computed only for it is dead code
    and XLA drops it: a step costs two gradients, ∇f(x̃_t) and ∇f(y_{t+1}) on the step's batch
    (plus ∇f(y_0) = ∇f(x_0) once, at step 0, under ``lax.cond``). Memory: ∇f(y_t) is kept
    between steps (one parameter copy more than SAM).

    Execution: ``"sequential"`` (default) computes the two gradients one after the other:
    correct, SAM's time. ``"vmap"`` stacks the two points and calls ``grad_fn`` once under
    ``jax.vmap``: the same numbers, one program that evaluates both (twice the activation
    memory). ``"parallel"`` (with ``mesh``) is the form the paper is named for: the stacked
    axis of size 2 is sharded over the mesh axis ``pair_axis`` (size 2), so each half of the
    devices computes one gradient, data-parallel over its other axes, under ``jax.jit``
    (GSPMD partitions the step; ``grad_fn`` is unchanged). Each half holds the params and the
    whole batch's shards along the other axes (the batch replicated over ``pair_axis``), and
    the two results meet in one gradient-sized exchange before the combination. Per device, a
    step then costs one gradient plus that exchange (XLA's cost analysis, a 1.3 M-parameter
    MLP on 8 devices: 1.05 gradients' flops against 2.05 sequential, beyond step 0's); the
    paper's "about SGD's time on twice the devices" follows, not timed here.
    Build the mesh with :func:`sampa_mesh` (or ``jax.make_mesh``: Auto and Explicit axes both
    work); a mesh whose ``pair_axis`` has size 1 (one device) gives the sequential form.
    Step 0's ``∇f(x_0)`` runs on every device.

    ::

        mesh = sharpjax.sampa_mesh()  # ("pair", "batch") = (2, n/2)
        tx = optax.chain(sharpjax.sampa(0.1, execution="parallel", mesh=mesh), optax.sgd(0.1))
        batch = jax.device_put(batch, NamedSharding(mesh, P("batch")))
        # in a jitted step: tx.update(grads, state, params, grad_fn=lambda p: grad(p, batch))

    Defaults: λ = 0.2 (the paper's SAMPa-0.2), ρ = 0.05 (SAM's; tune as for SAM). λ = 0 is
    plain SAMPa; ρ = 0 with λ = 0 is the base optimizer. Diagnostics: ``grad_norm`` (‖∇f(y_t)‖),
    ``second_grad_norm`` (‖∇f(x̃_t)‖), ``y_grad_norm`` (‖∇f(y_{t+1})‖), ``cosine`` (between
    ∇f(y_t) and ∇f(x̃_t), free: both are alive), ``rho``.
    """
    check_scalar_or_schedule("learning_rate", learning_rate, 0.0)
    check_scalar_or_schedule("rho", rho, 0.0)
    if callable(lam):
        raise TypeError("lam must be a number in [0, 1], not a schedule.")
    check_scalar_or_schedule("lam", lam, 0.0, 1.0)
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}.")
    pair = _pair_sharding(execution, mesh, pair_axis)
    if execution == "parallel" and pair is None:
        execution = "sequential"  # one device group: nothing to run at once
    explicit = pair is not None and (
        dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[pair_axis]
        == jax.sharding.AxisType.Explicit
    )
    names = ("grad_norm", "second_grad_norm", "y_grad_norm", "cosine", "rho")

    def init_fn(params):
        check_float_params(params)
        return SampaState(
            count=jnp.zeros([], jnp.int32),
            y_grad=jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), compute_dtype(w)), params),
            started=jnp.zeros([], jnp.bool_),
            diagnostics=_initial_diagnostics(names),
        )

    def update_fn(
        updates, state, params=None, *, grad_fn=None, value_and_grad_fn=None, loss=None, **extra
    ):
        del loss, extra  # the clean loss and a planned decision (a policy's) are not used
        if params is None:
            raise ValueError("sampa needs params: tx.update(g, state, params, grad_fn=...).")
        second_pass = _check_grad_fn(grad_fn, value_and_grad_fn)

        def gradient(p):
            g = second_pass(p)[1]
            _check_same_structure("grad_fn(params)", params, g)
            return jax.tree.map(lambda x, y: x.astype(y.dtype), g, state.y_grad)

        # y_0 = x_0: the first step needs ∇f(x_0), computed only then.
        y_grad = jax.lax.cond(state.started, lambda: state.y_grad, lambda: gradient(params))
        rho_t = evaluate(rho, state.count, 0.0)
        lr_t = evaluate(learning_rate, state.count, 0.0)
        y_norm = tree_norm(y_grad)
        factor = rho_t / (y_norm + NORM_EPS)

        def moved(scale):
            return jax.tree.map(
                lambda w, d: (w.astype(d.dtype) + scale * d).astype(w.dtype), params, y_grad
            )

        if execution == "sequential":
            g_tilde, g_y = gradient(moved(factor)), gradient(moved(-lr_t))
        else:
            # One batched program over the pair; "parallel" splits its axis over the two
            # device groups. Each group builds only its own point from the replicated x_t
            # and ∇f(y_t) (the scales are split), so no point is shipped.
            def split(tree):
                if pair is None:
                    return tree
                if explicit:  # the sharding is in the arrays' types: move them there
                    return jax.sharding.reshard(tree, pair)
                return jax.lax.with_sharding_constraint(tree, pair)

            scales = split(jnp.stack([factor, -lr_t]))
            both = split(jax.vmap(gradient)(split(jax.vmap(moved)(scales))))
            if explicit:  # the exchange, spelled out (GSPMD inserts it on Auto axes)
                both = jax.sharding.reshard(both, NamedSharding(mesh, P()))
            g_tilde, g_y = (jax.tree.map(lambda x, i=i: x[i], both) for i in (0, 1))
        out = jax.tree.map(
            lambda a, b, u: ((1.0 - lam) * a + lam * b).astype(u.dtype), g_tilde, g_y, updates
        )
        g_tilde_norm = tree_norm(g_tilde)
        diag = {
            "grad_norm": y_norm,
            "second_grad_norm": g_tilde_norm,
            # SAM's cosine between the gradient that set ε and the one taken at w + ε
            "cosine": tree_vdot(y_grad, g_tilde) / (y_norm * g_tilde_norm + NORM_EPS),
            "y_grad_norm": tree_norm(g_y),
            "rho": rho_t,
        }
        diag = {k: jnp.asarray(v, jnp.float32) for k, v in diag.items()}
        new = SampaState(optax.safe_increment(state.count), g_y, jnp.ones([], jnp.bool_), diag)
        return out, new

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _pair_sharding(execution: str, mesh: Mesh | None, pair_axis: str) -> NamedSharding | None:
    """The sharding that splits the stacked pair over ``pair_axis``; None for one group."""
    if execution != "parallel":
        if mesh is not None:
            raise ValueError(
                f'mesh is for execution="parallel" (got execution={execution!r}): pass both, or '
                "drop mesh."
            )
        return None
    if not isinstance(mesh, Mesh):
        raise ValueError(
            'execution="parallel" needs mesh, a jax.sharding.Mesh with a pair axis of size 2 '
            f"(sharpjax.sampa_mesh() builds one), got {type(mesh).__name__}."
        )
    if pair_axis not in mesh.shape:
        raise ValueError(
            f"pair_axis={pair_axis!r} is not an axis of the mesh (axes {tuple(mesh.shape)}): "
            "name the axis of size 2 that splits the devices into the two groups."
        )
    size = mesh.shape[pair_axis]
    if size not in (1, 2):
        raise ValueError(
            f"the mesh axis pair_axis={pair_axis!r} has size {size}; SAMPa has two gradients, "
            "so it must have size 2 (or 1: one group, the sequential form)."
        )
    return NamedSharding(mesh, P(pair_axis)) if size == 2 else None


def sampa_mesh(
    num_devices: int | None = None, *, pair_axis: str = PAIR_AXIS, batch_axis: str = "batch"
) -> Mesh:
    """The mesh ``(pair_axis, batch_axis) = (2, n/2)`` over the first ``num_devices`` devices
    (default all), for ``sampa(..., execution="parallel", mesh=mesh)``: each half of the
    devices computes one of SAMPa's two gradients, data-parallel over ``batch_axis`` (shard
    the batch with ``NamedSharding(mesh, P(batch_axis))``). With one device: ``(1, 1)``, for
    which ``sampa`` runs its sequential form.
    """
    from sharpjax.parallel import _mesh_devices  # the checked device list; parallel is heavy

    devices = _mesh_devices(num_devices)
    if len(devices) > 1 and len(devices) % 2:
        raise ValueError(
            f"sampa_mesh needs an even number of devices (two equal groups), got "
            f"{len(devices)}: pass num_devices={len(devices) - 1}."
        )
    groups = 2 if len(devices) > 1 else 1
    return Mesh(np.array(devices).reshape(groups, -1), (pair_axis, batch_axis))
