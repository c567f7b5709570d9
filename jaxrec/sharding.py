"""The device mesh, the logical→mesh rules table and every sharding helper.

This is the bottom layer: models, weights, eval and train all import it, and it imports
nothing from jaxrec. Every parameter and large activation carries *logical* axis names
(`batch, seq, embed, mlp, heads, kv_heads, kv, vocab, items, expert, lora_rank,
codebook, levels`); a `Layout` (a mesh plus the rules table) is the only thing that turns
them into mesh shardings, so going from one CPU to a pod changes the mesh sizes in the
config and nothing else.

The default rules live in `sharding_rules.yaml` beside this file. A `Layout` is passed
explicitly wherever shardings are computed (there is no default table to fall back to
silently), and `Layout.activate()` enters both the mesh and the rules, which is what
makes the models' activation constraints (`constrain`) take effect.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
import yaml
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
RULES_FILE = Path(__file__).with_name("sharding_rules.yaml")

Rules = tuple[tuple[str, Any], ...]


class MeshError(ValueError):
    """A mesh shape that cannot be laid out on the available devices, or a bad rules table."""


def normalize_rules(rules: Sequence[Sequence[Any]], source: str = "rules") -> Rules:
    """Rules as hashable tuples: (logical name, None | mesh axis | tuple of mesh axes)."""
    out = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise MeshError(f"{source}[{i}]: a rule is [logical name, mesh axis or list of mesh axes or null], "
                            f"got {rule!r}")
        name, axes = rule
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
        else:
            bad = [] if axes is None or axes in MESH_AXES else [axes]
        if bad:
            raise MeshError(f"{source}[{i}]: {bad} are not mesh axes ({', '.join(MESH_AXES)})")
        out.append((name, axes))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def default_rules() -> Rules:
    """The rules table of `sharding_rules.yaml`."""
    data = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    return normalize_rules(data["rules"], f"{RULES_FILE.name}: rules")


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
    """A (data, fsdp, tensor) mesh with Auto axes (GSPMD propagation; Explicit axes break
    model-parallel layers)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def fit_spec(spec: Sequence[Any], shape: Sequence[int], axis_sizes: dict[str, int]) -> P:
    """`spec` with every mesh axis removed from the dimensions it does not divide.

    jit cannot lay out uneven shards (an item table of n_items + 1 rows over 2 tensor
    shards, 3 KV heads over 2): such a dimension stays whole instead. The dimensions
    concerned are rarely large enough for the difference to matter.
    """
    spec = list(spec)[:len(shape)] + [None] * (len(shape) - len(spec))
    for dim, axes in enumerate(spec):
        if axes is None or axes is P.UNCONSTRAINED:
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        if shape[dim] % math.prod(axis_sizes[n] for n in names):
            spec[dim] = None
    return P(*spec)


def _mesh_axes(logical_axes: Sequence[str | None], rules: Rules) -> list:
    return list(nn.logical_to_mesh_axes(tuple(logical_axes), list(rules)))


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the rules that map logical axis names onto it."""

    mesh: Mesh
    rules: Rules

    @classmethod
    def build(cls, sizes: Sequence[int] = (-1, 1, 1), rules: Sequence[Sequence[Any]] | None = None,
              devices: Sequence[jax.Device] | None = None) -> "Layout":
        """A layout over `devices` (default: all) with `rules` (default: the YAML table)."""
        table = default_rules() if not rules else normalize_rules(rules, "mesh.rules")
        return cls(make_mesh(sizes, devices), table)

    # ------------------------------------------------------------------ shardings
    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> P:
        return fit_spec(_mesh_axes(logical_axes, self.rules), shape, dict(self.mesh.shape))

    def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    def shardings(self, abstract_tree: Any) -> Any:
        """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes
        (e.g. `jax.eval_shape` of an init); unboxed leaves (optimizer counters) are replicated."""
        def one(leaf):
            if isinstance(leaf, nn.LogicallyPartitioned):
                return self.sharding(leaf.names, leaf.value.shape)
            return self.replicated()
        return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

    def batch(self, shape: Sequence[int]) -> NamedSharding:
        """Sharding of a batch array [batch, ...]: leading axis over the data-parallel axes."""
        return self.sharding(("batch",) + (None,) * (len(shape) - 1), shape)

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def data_parallel_size(self) -> int:
        """How many ways the batch axis is split (a global batch must be a multiple)."""
        axes = _mesh_axes(("batch",), self.rules)[0]
        if axes is None:
            return 1
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        return math.prod(self.mesh.shape[n] for n in names)

    def round_batch(self, batch_size: int) -> int:
        """The smallest multiple of the data-parallel size that holds `batch_size` rows."""
        dp = self.data_parallel_size
        return max(dp, -(-batch_size // dp) * dp)

    # ------------------------------------------------------------------ context
    @contextlib.contextmanager
    def activate(self) -> Iterator["Layout"]:
        """Enter the mesh *and* the rules: activation constraints apply only inside."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(list(self.rules)):
            yield self


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Ask for an activation layout by logical names; a no-op outside `Layout.activate()`.

    Uses the same non-dividing-axis fallback as the parameter shardings, so a batch of 1
    (an init trace) or an odd head count never produces an uneven constraint.
    """
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    spec = fit_spec(_mesh_axes(logical_axes, tuple(rules)), x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)

