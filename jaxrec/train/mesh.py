"""The device mesh and the one logical→mesh rules table.

Every parameter and large activation in jaxrec carries *logical* axis names; this
module is the only place that turns them into mesh shardings, so going from one CPU
to a pod changes the mesh sizes in the config and nothing else.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Order matters: a mesh axis is used at most once per array, the first rule that
# still has a free mesh axis wins (flax semantics). So activations [batch, seq, embed]
# shard batch over data×fsdp and leave embed whole, while parameters [vocab, embed]
# shard embed over fsdp (ZeRO-3 style) and vocab over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("items", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("seq", None),
    ("expert", None),
    ("lora_rank", None),
    ("codebook", None),
    ("levels", None),
)


class MeshError(ValueError):
    """A mesh shape that cannot be laid out on the available devices."""


def resolve_mesh_shape(sizes: Sequence[int], n_devices: int, names: Sequence[str] = MESH_AXES) -> tuple[int, ...]:
    """Fill the one `-1` entry so the product equals `n_devices`; check divisibility."""
    sizes = list(sizes)
    if len(sizes) != len(names):
        raise MeshError(f"mesh needs {len(names)} sizes ({', '.join(names)}), got {sizes}")
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {dict(zip(names, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh sizes must be positive or -1, got {dict(zip(names, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if n_devices % fixed:
            raise MeshError(
                f"mesh {dict(zip(names, sizes))}: the fixed axes ({fixed}) do not divide the {n_devices} devices")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise MeshError(f"mesh {dict(zip(names, sizes))} needs {fixed} devices, {n_devices} are available")
    return tuple(sizes)


def make_mesh(sizes: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes (GSPMD propagation, see STACK.md)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

    Unboxed leaves (plain arrays, optimizer counters) are replicated. A dimension that
    the mesh axes would not split evenly (e.g. an item table of n_items + 1 rows over 2
    tensor shards) stays whole instead: jit cannot lay out uneven shards, and the
    dimension is rarely large enough for the difference to matter.
    """
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, list(rules))
    shapes = nn.unbox(abstract_tree)
    return jax.tree.map(lambda s, a: _even(s, getattr(a, "shape", ()), mesh), shardings, shapes,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


def _even(sharding: NamedSharding, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    changed = False
    for dim, axes in enumerate(spec[:len(shape)]):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        if shape[dim] % math.prod(mesh.shape[n] for n in names):
            spec[dim], changed = None, True
    return NamedSharding(mesh, P(*spec[:len(shape)])) if changed else sharding


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch array [batch, ...]: leading axis over the data-parallel axes."""
    axes = ("batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, nn.logical_to_mesh_axes(axes, list(rules)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways the batch axis is split (the global batch must be a multiple)."""
    spec = nn.logical_to_mesh_axes(("batch",), list(rules))[0]
    if spec is None:
        return 1
    names = (spec,) if isinstance(spec, str) else tuple(spec)
    return math.prod(mesh.shape[n] for n in names)
