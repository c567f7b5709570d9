"""What a run *is* versus how it is scheduled: the check that a rerun continues the same run.

A checkpoint stores its resolved config. When a rerun (or `--from-step`) resumes a run,
its config is compared with the one stored, key by key:

- **schedule keys** (`SCHEDULE_KEYS`: epochs/steps, learning rate and its schedule,
  optimizer hyper-parameters, evaluation and checkpoint cadence, mesh, threads) only
  change how the rest of the run proceeds: they are applied, with a printed notice;
- **every other key** defines the model or its data (task, model.*, data.* such as the
  split, run.seed, train.batch_size which the data iterator's position depends on). A
  change there is refused with one line listing the keys, old → new, and the two ways out.

Paths are not compared as strings: `data.source` is checked by the content hash of the
data (`InteractionStore.content_sha256`, saved with the frozen-input fingerprints) and
upstream run directories by their parameter hashes, so a run can be resumed or evaluated
from another working directory. `portable_config` makes those paths absolute in what a
checkpoint stores, so `jaxrec evaluate RUN` finds them from anywhere on the same machine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

SCHEDULE_KEYS = (
    "train.epochs", "train.steps", "train.lr", "train.warmup_steps", "train.end_lr_ratio", "train.weight_decay",
    "train.b1", "train.b2", "train.grad_clip", "train.compute_dtype", "train.microbatches", "train.log_every",
    "train.eval_every", "train.patience", "train.progress", "eval.", "checkpoint.", "mesh.", "distributed.",
    "run.dir", "run.name", "data.num_threads", "data.prefetch",
)
# Checked by content (the data's hash), not by how the path is spelled; `source` is where
# the config was read from, not a setting.
_NOT_COMPARED = ("data.source", "source")


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


@dataclasses.dataclass(frozen=True)
class Drift:
    defining: tuple[Change, ...]     # refused
    schedule: tuple[Change, ...]     # applied with a notice


_MISSING = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _MISSING else json.dumps(value, default=str)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and tuples are values (compared whole)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _is_schedule(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in SCHEDULE_KEYS)


def config_drift(saved: Mapping[str, Any], current: Mapping[str, Any],
                 content_checked: Iterable[str] = ()) -> Drift:
    """Keys whose values differ between two config dicts (as `to_dict` writes them), split
    into defining and schedule changes. `content_checked` keys are skipped (verified by hash)."""
    skip = set(_NOT_COMPARED) | set(content_checked)
    old, new = flatten(saved), flatten(current)
    changes = [Change(k, old.get(k, _MISSING), new.get(k, _MISSING)) for k in sorted(set(old) | set(new))
               if k not in skip and old.get(k, _MISSING) != new.get(k, _MISSING)]
    return Drift(tuple(c for c in changes if not _is_schedule(c.key)),
                 tuple(c for c in changes if _is_schedule(c.key)))


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _get(tree: Mapping, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def portable_config(config_dict: dict, path_keys: Iterable[str]) -> dict:
    """A copy of `config_dict` with `data.source` and the given path keys made absolute
    where they name an existing relative path (resolved against the current directory)."""
    out = json.loads(json.dumps(config_dict, default=str))
    for key in ("data.source", *path_keys):
        value = _get(out, key)
        if isinstance(value, str) and value and not Path(value).is_absolute() and Path(value).exists():
            _set(out, key, str(Path(value).absolute()))
    return out


def _digest(*arrays: Any) -> str:
    h = hashlib.sha256()
    for array in arrays:
        if array is None:
            h.update(b"<none>")
            continue
        array = np.asarray(array)
        if array.dtype.kind in "OUS":
            h.update("\x00".join(map(str, array.tolist())).encode("utf-8"))
        else:
            h.update(np.ascontiguousarray(array).tobytes())
        h.update(b"|")
    return h.hexdigest()


def data_fingerprints(store: Any) -> dict[str, str]:
    """SHA-256 of an `InteractionStore`: `data.items` (the item vocabulary, which the model's
    shapes and ids depend on) and `data` (every user's events and timestamps as read, so
    the same data in another file format or place has the same hash)."""
    if store is None:
        return {}
    return {"data.items": _digest(store.item_vocab),
            "data": _digest(store.user_vocab, store.user_offsets, store.item_ids, store.timestamps)}
