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

Models without annotations (MLP, CNNs, ResNets) get ``PartitionSpec()`` (replicated) for
every leaf: a caller that wants FSDP for them needs its own rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from flax.core import meta
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

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


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh_shape: dict[str, int]) -> tuple:
    """``spec`` with every dimension that its mesh axes do not divide set to ``None``."""
    dims, dropped = [], []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            dims.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh_shape[a] for a in names)
        if shape[i] % size:
            dims.append(None)
            dropped.append((i, axes, shape[i], size))
        else:
            dims.append(axes)
    return PartitionSpec(*dims), dropped


def _plan(tree: Any, mesh: AnyMesh | None, rules: Rules) -> tuple[Any, list[str]]:
    if mesh is not None:
        rules = rules_for_mesh(mesh.axis_names, rules)
    specs = nn.logical_to_mesh(logical_partition_specs(tree), list(rules))
    if mesh is None:
        return specs, []
    mesh_shape = dict(mesh.shape)
    shapes = jax.tree.map(lambda x: tuple(x.shape), unbox(tree))
    notes: list[str] = []
    is_spec = lambda x: isinstance(x, PartitionSpec)
    flat_specs, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    flat_shapes = treedef.flatten_up_to(shapes)
    paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(specs, is_leaf=is_spec)[0]
    ]
    fitted = []
    for path, spec, shape in zip(paths, flat_specs, flat_shapes, strict=True):
        spec, dropped = _fit(spec, shape, mesh_shape)
        fitted.append(spec)
        notes += [
            f"{path}: dimension {i} (size {n}) not divisible by mesh axes {axes} "
            f"(size {size}); replicated along it"
            for i, axes, n, size in dropped
        ]
    return treedef.unflatten(fitted), notes


def param_partition_specs(
    tree: Any, mesh: AnyMesh | None = None, rules: Rules = LOGICAL_AXIS_RULES
) -> Any:
    """A mesh-axis ``PartitionSpec`` per leaf of a boxed params (or variables) tree.

    Args:
      tree: the output of ``model.init`` or ``jax.eval_shape(model.init, ...)`` (boxed).
      mesh: a ``Mesh`` or ``AbstractMesh``. When given, the rules are restricted to its axes
        (:func:`rules_for_mesh`) and a dimension whose size its mesh axes do not divide is
        replicated instead (:func:`undivided_dimensions` lists them); without a mesh, the
        rules' specs as they are.
      rules: logical → mesh axis rules.
    """
    return _plan(tree, mesh, rules)[0]


def undivided_dimensions(tree: Any, mesh: AnyMesh, rules: Rules = LOGICAL_AXIS_RULES) -> list[str]:
    """One line per parameter dimension that ``rules`` would split over ``mesh`` but whose size
    the mesh axes do not divide (so :func:`param_partition_specs` replicates it), e.g. ViT-Ti's
    3 heads on ``model=2``. Empty when everything divides."""
    return _plan(tree, mesh, rules)[1]


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """``NamedSharding(mesh, spec)`` per leaf, from :func:`param_partition_specs`."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        param_partition_specs(tree, mesh, rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


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
