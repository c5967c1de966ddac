"""From the models' logical axis names to mesh axes: PartitionSpecs, shardings, unboxing.

The transformer models (:mod:`sharpjax.models.vit`, :mod:`sharpjax.models.transformer`) create
every parameter with :func:`flax.linen.with_logical_partitioning`, so ``model.init`` returns
:class:`flax.linen.LogicallyPartitioned` boxes naming each dimension (``embed``, ``mlp``,
``heads``, ...). This module maps those names onto the mesh axes

``data``   replicas: each holds a whole copy of what the other axes split;
``fsdp``   parameters (and everything shaped like them) split ZeRO-3 style;
``model``  tensor parallel: whole heads / slices of the MLP per device,

with :data:`LOGICAL_AXIS_RULES`, and unboxes the params into plain arrays, which is what the
trainer, optax and every sharpjax transformation see (they never meet a box). Typical use::

    boxed = jax.eval_shape(model.init, key, sample)["params"]   # nothing allocated
    specs = param_partition_specs(boxed, mesh)                  # PartitionSpec per leaf
    params = init_params(model, key, sample, mesh)               # born sharded, unboxed

On a mesh, the specs are the trainer's plan (:func:`sharpjax.parallel.plan_param_specs`, the
one home of the sharding rules): the annotations mapped as above, then every leaf that no rule
splits over ``fsdp`` split along its largest dimension that fsdp divides (ZeRO-3), so models
without annotations (MLP, CNNs, ResNets) are split over ``fsdp`` too and replicated over
``model``. :func:`sharpjax.parallel.param_shardings` gives the ``NamedSharding``s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from flax.core import meta
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from sharpjax import parallel

MESH_AXES = ("data", "fsdp", "model")
# The batch is split over every axis that is not `model` (each tensor-parallel group reads
# the same examples).
BATCH_AXES = ("data", "fsdp")

# (logical axis, mesh axis or axes), in priority order (flax's convention: a mesh axis is used
# at most once per array, by the first rule that claims it). `embed` → fsdp shards every
# kernel along the residual width; `mlp`/`heads`/`vocab` → model is Megatron's tensor
# parallelism (column-parallel in, row-parallel out). The rest are never split: a head's
# width (`kv`), positions, the patch kernel's spatial/channel dimensions and the output
# classes (10 or 1000 rarely divide a mesh axis, and the head is small).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("kv", None),
    ("seq", None),
    ("classes", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
)

Rules = Sequence[tuple[str, Any]]
AnyMesh = Mesh | AbstractMesh


def _is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


def unbox(tree: Any) -> Any:
    """The plain arrays (or ``ShapeDtypeStruct``s) inside ``tree``'s partitioning boxes.

    Unlike ``nn.meta.unbox`` outside ``jit``, no sharding constraint is applied, so the result
    does not depend on a global mesh being set. Already plain trees come back unchanged.
    """
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if _is_box(x) else x, tree, is_leaf=_is_box
    )


def logical_partition_specs(tree: Any) -> Any:
    """A ``PartitionSpec`` of *logical* names per leaf (``P("embed", "mlp")``); unannotated
    arrays get ``P()``."""
    return nn.get_partition_spec(tree)


def rules_for_mesh(axis_names: Sequence[str], rules: Rules = LOGICAL_AXIS_RULES) -> tuple:
    """``rules`` restricted to the mesh axes in ``axis_names``: a rule naming an absent axis
    maps to ``None`` (replicated), and absent axes are dropped from tuples such as
    ``("data", "fsdp")``. A mesh of only ``data`` therefore replicates every parameter.

    Raises:
      ValueError: a mesh axis that no rule and no batch layout knows (not in
        :data:`MESH_AXES`), with the fix.
    """
    unknown = [a for a in axis_names if a not in MESH_AXES]
    if unknown:
        raise ValueError(
            f"mesh axes {unknown} are not known to the partitioning rules; name the mesh axes "
            f"from {MESH_AXES} (for example Mesh(devices, ('data', 'fsdp')))."
        )
    out = []
    for logical, mesh_axes in rules:
        if mesh_axes is None:
            out.append((logical, None))
            continue
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        kept = tuple(a for a in names if a in axis_names)
        out.append((logical, kept[0] if len(kept) == 1 else (kept or None)))
    return tuple(out)


def _plan(tree: Any, mesh: AnyMesh, rules: Rules) -> tuple[Any, list]:
    # The trainer's own plan (sharpjax.parallel.plan_param_specs): one home for the logical
    # mapping, the divisibility checks and the fsdp split, so that params created here are
    # laid out exactly as the trainer places them.
    return parallel.plan_param_specs(
        unbox(tree),
        mesh,
        logical_specs=logical_partition_specs(tree),
        rules=rules_for_mesh(mesh.axis_names, rules),
    )


def param_partition_specs(
    tree: Any, mesh: AnyMesh | None = None, rules: Rules = LOGICAL_AXIS_RULES
) -> Any:
    """A mesh-axis ``PartitionSpec`` per leaf of a boxed params (or variables) tree.

    Args:
      tree: the output of ``model.init`` or ``jax.eval_shape(model.init, ...)`` (boxed).
      mesh: a ``Mesh`` or ``AbstractMesh``. When given, the specs are where the trainer puts
        each parameter (:func:`sharpjax.parallel.param_shardings`): the rules restricted to its
        axes (:func:`rules_for_mesh`), a dimension whose size its mesh axes do not divide
        replicated instead, an axis of size 1 dropped, and a leaf that no rule splits over
        ``fsdp`` split along its largest dimension that fsdp divides
        (:func:`undivided_dimensions` lists what could not be split). Without a mesh, the
        rules' specs as they are.
      rules: logical → mesh axis rules.
    """
    if mesh is None:
        return nn.logical_to_mesh(logical_partition_specs(tree), list(rules))
    return _plan(tree, mesh, rules)[0]


def undivided_dimensions(tree: Any, mesh: AnyMesh, rules: Rules = LOGICAL_AXIS_RULES) -> list[str]:
    """One line per parameter that :func:`param_partition_specs` does not split as asked: a
    dimension that ``rules`` would split over ``mesh`` but whose size the mesh axes do not
    divide (ViT-Ti's 3 heads on ``model=2``), or no dimension left that ``fsdp`` divides.
    Empty when everything divides. The trainer warns with the same list."""
    return [
        f"{jax.tree_util.keystr(path)} {shape}: {', '.join(reasons)}; replicated along it"
        for path, shape, reasons in _plan(tree, mesh, rules)[1]
    ]


def batch_spec(mesh: AnyMesh, ndim: int = 1) -> PartitionSpec:
    """The batch layout: leading dimension over the mesh's :data:`BATCH_AXES`, rest whole."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    lead = axes[0] if len(axes) == 1 else (axes or None)
    return PartitionSpec(lead, *([None] * (ndim - 1)))


def init_params(
    model: nn.Module,
    key: jax.Array,
    sample: Any,
    mesh: Mesh | None = None,
    rules: Rules = LOGICAL_AXIS_RULES,
    **apply_kwargs: Any,
) -> tuple[Any, Any]:
    """``(params, specs)``: unboxed float32 params and their mesh PartitionSpecs.

    With ``mesh``, ``model.init`` runs under ``jit`` with ``out_shardings`` from the specs, so
    every parameter is created directly in its shards (a model larger than one device's memory
    never exists whole). Without, params are created on the default device.
    ``apply_kwargs`` go to ``model.init`` (e.g. ``train=False``). Only the ``params``
    collection is returned; models with other collections (BatchNorm) use ``model.init``.
    """
    init = lambda k, x: unbox(model.init(k, x, **apply_kwargs)["params"])
    boxed = jax.eval_shape(lambda k, x: model.init(k, x, **apply_kwargs)["params"], key, sample)
    specs = param_partition_specs(boxed, mesh, rules)
    if mesh is None:
        return jax.jit(init)(key, sample), specs
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    return jax.jit(init, out_shardings=shardings)(key, sample), specs
