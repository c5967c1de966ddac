"""The one two-gradient mechanism behind every SAM-like method of sharpjax.

Every sharpness-aware step takes two gradients: the clean gradient ``g`` at ``w``, which the
training step already has and passes in as ``updates``, and ``g₂ = ∇L(w + ε)`` at a perturbed
point. :func:`sharpness_aware` implements this once, as an
``optax.GradientTransformationExtraArgs``::

    ε, rule_state   = perturbation.perturb(g, params, rule_state, rho_t)
    g₂              = grad_fn(params + ε)                  # the only second pass
    out, rule_state = combination.combine(g, g₂, rule_state, count)

``out`` goes to the next transformation of an ``optax.chain``, so the base optimizer steps
from ``w``, never from ``w + ε``. A variant is a :class:`PerturbationRule`, a
:class:`CombinationRule`, or both (see ``perturbations.py`` and ``combinations.py``).

Data parallelism: with ``axis_name`` set, the final gradient is always averaged over that
axis; the perturbation is computed from each device's own gradient (``"per_device"``,
Foret et al.'s m-sharpness), from the gradient averaged over all devices (``"synced"``), or
averaged within consecutive groups of ``group_size`` devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]
ScalarOrSchedule = float | Schedule

# Added to norms before dividing, so that a zero gradient gives a zero perturbation.
NORM_EPS = 1e-12

PERTURBATION_MODES = ("per_device", "synced", "grouped")

_CALL_PATTERN = (
    "Pass the gradient function as an extra argument of update:\n"
    "    grad_fn = lambda p: jax.grad(loss_fn)(p, batch)\n"
    "    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)"
)


# --------------------------------------------------------------------------------------
# Small pytree helpers shared by the rules.
# --------------------------------------------------------------------------------------


def tree_norm(tree: Any) -> jax.Array:
    """Global L2 norm over every leaf of a pytree, accumulated in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def tree_vdot(a: Any, b: Any) -> jax.Array:
    """Inner product of two pytrees of the same structure, in float32."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)) for x, y in pairs)


def tree_scale(tree: Any, scale: jax.Array) -> Any:
    """Multiplies every leaf by ``scale``, keeping each leaf's dtype."""
    return jax.tree.map(lambda x: (x.astype(jnp.float32) * scale).astype(x.dtype), tree)


def tree_add(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: (x + y.astype(x.dtype)).astype(x.dtype), a, b)


def evaluate(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """A float or an optax schedule of the step count, as a float32 scalar."""
    return jnp.asarray(value(count) if callable(value) else value, jnp.float32)


def check_scalar_or_schedule(
    name: str, value: ScalarOrSchedule, low: float, high: float = float("inf"), *, open_low=False
) -> None:
    """Raises a ValueError naming ``name`` when a constant is outside its range."""
    if callable(value):
        return
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a float or an optax schedule (a function of the step count), "
            f"got {type(value).__name__}."
        ) from None
    bad_low = value <= low if open_low else value < low
    if bad_low or value > high or value != value:
        left = "(" if open_low else "["
        right = "]" if high != float("inf") else ")"
        raise ValueError(f"{name} must lie in {left}{low}, {high}{right}, got {value}.")


# --------------------------------------------------------------------------------------
# Rules.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerturbationRule:
    """Where the second gradient is taken.

    Attributes:
      init: ``params -> state`` of the rule (any pytree; ``()`` when stateless).
      perturb: ``(g, params, state, rho) -> (ε, state, diagnostics)``, with ``g`` the clean
        gradient (already averaged across devices in synced mode) and ``rho`` the radius of
        this step. ``diagnostics`` is a dict of float32 scalars with keys ``diagnostics``.
      diagnostics: names of the diagnostics the rule reports.
    """

    init: Callable[[Any], Any]
    perturb: Callable[[Any, Any, Any, jax.Array], tuple[Any, Any, dict[str, jax.Array]]]
    diagnostics: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CombinationRule:
    """What to do with the two gradients.

    Attributes:
      init: ``params -> state``.
      combine: ``(g, g₂, state, count) -> (out, state, diagnostics)``.
      diagnostics: names of the diagnostics the rule reports.
    """

    init: Callable[[Any], Any]
    combine: Callable[[Any, Any, Any, jax.Array], tuple[Any, Any, dict[str, jax.Array]]]
    diagnostics: tuple[str, ...] = ()


def _no_state(params: Any) -> tuple:
    del params
    return ()


def use_second_gradient() -> CombinationRule:
    """The SAM combination: the output is ``g₂`` itself."""

    def combine(g, g2, state, count):
        del g, count
        return g2, state, {}

    return CombinationRule(_no_state, combine)


# --------------------------------------------------------------------------------------
# The transformation.
# --------------------------------------------------------------------------------------

CORE_DIAGNOSTICS = ("grad_norm", "perturbation_norm", "second_grad_norm", "cosine", "rho")


class SharpnessAwareState(NamedTuple):
    """State of :func:`sharpness_aware`.

    Attributes:
      count: number of updates taken (the argument of ``rho`` and of the rules' schedules).
      perturbation_state: state of the perturbation rule.
      combination_state: state of the combination rule.
      diagnostics: the last step's float32 scalars: ``grad_norm`` (‖g‖), ``perturbation_norm``
        (‖ε‖), ``second_grad_norm`` (‖g₂‖), ``cosine`` (between g and g₂), ``rho``, and those of
        the rules (e.g. SANER's ``masked_fraction``, VaSSO's ``d_norm``). Read them from a
        chained state with :func:`diagnostics`.
    """

    count: jax.Array
    perturbation_state: Any
    combination_state: Any
    diagnostics: dict[str, jax.Array]


def _check_grad_fn(grad_fn: Callable | None) -> Callable:
    if grad_fn is None:
        raise TypeError(
            f"sharpjax transformations need a `grad_fn` extra argument. {_CALL_PATTERN}"
        )
    if not callable(grad_fn):
        raise TypeError(
            f"`grad_fn` must be callable, got {type(grad_fn).__name__}. {_CALL_PATTERN}"
        )
    return grad_fn


def _check_same_structure(name: str, reference: Any, tree: Any) -> None:
    ref_def, tree_def = jax.tree.structure(reference), jax.tree.structure(tree)
    if ref_def != tree_def:
        raise ValueError(
            f"{name} must be a pytree with the structure of the params.\n"
            f"  params:  {ref_def}\n  {name}: {tree_def}\n"
            "grad_fn(p) should return jax.grad(loss_fn)(p, batch), not (loss, grads) or aux."
        )
    for ref, leaf in zip(jax.tree.leaves(reference), jax.tree.leaves(tree), strict=True):
        if jnp.shape(ref) != jnp.shape(leaf):
            raise ValueError(
                f"{name} has a leaf of shape {jnp.shape(leaf)} where the params have "
                f"{jnp.shape(ref)}."
            )


def check_axis_name(axis_name: str) -> int:
    """Size of a bound mapped axis, or a clear error when ``axis_name`` is not bound."""
    try:
        return jax.lax.axis_size(axis_name)
    except NameError as err:
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here: call the update inside "
            f"jax.pmap(..., axis_name={axis_name!r}) or jax.shard_map over a mesh with that axis "
            "name, or leave axis_name=None on a single device."
        ) from err


def _axis_groups(axis_name: str, mode: str, group_size: int | None) -> list[list[int]] | None:
    """Device groups whose gradients are averaged before perturbing (None: all devices)."""
    size = check_axis_name(axis_name)
    if mode == "synced":
        return None
    group = 1 if mode == "per_device" else group_size
    if size % group:
        raise ValueError(
            f"group_size={group} does not divide the {size} devices of axis {axis_name!r}; "
            f"choose a divisor of {size}."
        )
    if mode == "grouped" and group == size:  # one group of all devices: synced, by pmean
        return None
    return [list(range(start, start + group)) for start in range(0, size, group)]


def _group_mean(tree: Any, axis_name: str, groups: list[list[int]] | None) -> Any:
    if groups is not None and len(groups[0]) == 1:
        return tree
    if groups is None:
        return jax.lax.pmean(tree, axis_name)
    # pmean with axis_index_groups is not implemented on every backend (CPU); a masked psum
    # over the whole axis computes the same group mean everywhere.
    group_size = len(groups[0])
    index = jax.lax.axis_index(axis_name)
    size = group_size * len(groups)
    my_group = index // group_size
    member_group = jnp.arange(size) // group_size
    onehot = (member_group == my_group).astype(jnp.float32) / group_size

    def mean_leaf(x):
        gathered = jax.lax.all_gather(x, axis_name)
        weights = onehot.reshape((size,) + (1,) * x.ndim).astype(gathered.dtype)
        return jnp.sum(gathered * weights, axis=0).astype(x.dtype)

    return jax.tree.map(mean_leaf, tree)


def sharpness_aware(
    perturbation: PerturbationRule,
    combination: CombinationRule | None = None,
    rho: ScalarOrSchedule = 0.05,
    *,
    axis_name: str | None = None,
    perturbation_mode: str = "per_device",
    group_size: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The two-gradient transformation: any perturbation rule with any combination rule.

    Put it before the base optimizer in an ``optax.chain`` and pass ``grad_fn``::

        tx = optax.chain(sharpness_aware(vasso_perturbation(0.9), saner_combination(0.5),
                                         rho=0.1), optax.sgd(0.1, momentum=0.9))
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)

    Args:
      perturbation: where the second gradient is taken (``sam_perturbation()``, ...).
      combination: what to do with ``g`` and ``g₂``; default: return ``g₂`` (SAM).
      rho: perturbation radius, a float ≥ 0 or an optax schedule of the step count.
      axis_name: data-parallel axis (pmap / shard_map); None on one device.
      perturbation_mode: with ``axis_name``: ``"per_device"`` (each device perturbs with its
        own gradient, the original SAM), ``"synced"`` (all devices share the perturbation of
        the averaged gradient) or ``"grouped"`` (shared within groups of ``group_size``
        consecutive devices). The final gradient is always averaged over ``axis_name``.
      group_size: devices per group in ``"grouped"`` mode; must divide the device count.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires ``grad_fn``,
      a function ``params -> gradient`` (same pytree structure as the params). It is called
      exactly once per step. With BatchNorm, ``grad_fn`` evaluates the model at the clean
      pass's statistics and drops the statistics it would update::

        def grad_fn(p):
          def loss(p):
            logits, _ = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"])  # discarded
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
          return jax.grad(loss)(p)
    """
    combination = combination or use_second_gradient()
    check_scalar_or_schedule("rho", rho, 0.0)
    if perturbation_mode not in PERTURBATION_MODES:
        raise ValueError(
            f"perturbation_mode must be one of {PERTURBATION_MODES}, got {perturbation_mode!r}."
        )
    if perturbation_mode == "grouped":
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(
                f"perturbation_mode='grouped' needs group_size, a positive int, got {group_size!r}."
            )
    elif group_size is not None:
        raise ValueError("group_size is only used with perturbation_mode='grouped'.")
    if axis_name is None and (perturbation_mode != "per_device" or group_size is not None):
        raise ValueError(
            f"perturbation_mode={perturbation_mode!r} needs axis_name, the data-parallel axis."
        )
    diagnostic_names = CORE_DIAGNOSTICS + perturbation.diagnostics + combination.diagnostics

    def init_fn(params):
        return SharpnessAwareState(
            count=jnp.zeros([], jnp.int32),
            perturbation_state=perturbation.init(params),
            combination_state=combination.init(params),
            diagnostics={name: jnp.zeros([], jnp.float32) for name in diagnostic_names},
        )

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        del extra_args
        grad_fn = _check_grad_fn(grad_fn)
        if params is None:
            raise ValueError("sharpjax transformations need params: tx.update(g, state, params).")
        g = updates
        groups = None
        if axis_name is not None:
            groups = _axis_groups(axis_name, perturbation_mode, group_size)
            g = _group_mean(g, axis_name, groups)

        rho_t = evaluate(rho, state.count)
        eps, perturbation_state, p_diag = perturbation.perturb(
            g, params, state.perturbation_state, rho_t
        )
        g2 = grad_fn(tree_add(params, eps))
        _check_same_structure("grad_fn(params + ε)", params, g2)
        if axis_name is not None:
            g2 = _group_mean(g2, axis_name, groups)

        out, combination_state, c_diag = combination.combine(
            g, g2, state.combination_state, state.count
        )
        if groups is not None:
            # Synced (groups None): g and g₂ are already all-device means, so `out` is the same
            # on every device and a third gradient all-reduce would change nothing.
            out = jax.lax.pmean(out, axis_name)
        out = jax.tree.map(lambda o, u: o.astype(u.dtype), out, updates)

        grad_norm, g2_norm = tree_norm(g), tree_norm(g2)
        diagnostics = {
            "grad_norm": grad_norm,
            "perturbation_norm": tree_norm(eps),
            "second_grad_norm": g2_norm,
            "cosine": tree_vdot(g, g2) / (grad_norm * g2_norm + NORM_EPS),
            "rho": rho_t,
            **p_diag,
            **c_diag,
        }
        if axis_name is not None:
            diagnostics = jax.lax.pmean(diagnostics, axis_name)
        diagnostics = {k: jnp.asarray(diagnostics[k], jnp.float32) for k in diagnostic_names}
        new_state = SharpnessAwareState(
            count=optax.safe_increment(state.count),
            perturbation_state=perturbation_state,
            combination_state=combination_state,
            diagnostics=diagnostics,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def diagnostics(opt_state: Any) -> dict[str, jax.Array]:
    """The last step's diagnostics of every sharpjax transformation in a (chained) state.

    Works on the state of ``optax.chain(...)``, nested chains, ``optax.inject_hyperparams``
    and pmapped/sharded states alike: it collects the ``diagnostics`` dict of each sharpjax
    state it finds (and the noise-resistant feedback's). Keys are unique per chain; when two
    sharpjax transformations report the same key, the later ones get a ``_1``, ``_2`` suffix.

    Example::

        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        sharpjax.diagnostics(opt_state)["cosine"]
    """
    found: dict[str, jax.Array] = {}

    def visit(node):
        if isinstance(node, SharpnessAwareState) or (
            hasattr(node, "_fields") and "diagnostics" in getattr(node, "_fields", ())
        ):
            for key, value in node.diagnostics.items():
                name, i = key, 0
                while name in found:
                    i += 1
                    name = f"{key}_{i}"
                found[name] = value
            return
        if isinstance(node, dict):
            children: Sequence = list(node.values())
        elif isinstance(node, list | tuple):
            children = node
        else:
            return
        for child in children:
            visit(child)

    visit(opt_state)
    return found
