"""Export of a CoFiRec/TIGER generator run, and recommending from the export alone.

`jaxrec export RUN OUT` writes (beside `manifest.json`, kind "generative"):

    model.safetensors        the generator's parameters, "/" between module names
    semantic_ids.npy         int32 [n_items + 1, K] the table it was trained on (after
                             ablations and dedup); row i = item index i, row 0 = -1
    trie.safetensors         the trie's per-level transition tables `transitions_<k>`,
                             int32 [P_k, V] (child prefix id, or the item index - 1 at the
                             last level; -1 = no such code)
    items.json               the item token of every index (0 = padding)
    model.json               how to rebuild the model and the search (the run's model
                             config, code layout, beam width, history length)
    beam_search.jaxexport    the jitted trie-constrained beam search, serialized with
                             `jax.export` for CPU and CUDA with a symbolic batch dimension:
                             search(*params, *transitions, history_tokens [b, T·K],
                             seen [b, n_items + 1] bool) -> (items [b, W] int32 item
                             indices, 0 = none; scores [b, W] float32), params in the sorted
                             order of model.safetensors' names. It needs only `jax`.

`GeneratorRecommender.load(OUT)` rebuilds the model from these files (no run, no data) and
answers `recommend(histories, k, exclude_history)` with the same search `evaluate` runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file, save_file

from jaxrec.eval.beam_search import constrained_beam_search
from jaxrec.eval.trie import TrieTables
from jaxrec.export.manifest import ExportError
from jaxrec.export.recommend import item_indices
from jaxrec.methods.cofirec import generator_models as gm

FORMAT = "jaxrec.generator/1"
ARTIFACT_FILE = "beam_search.jaxexport"


def _readable(path: Path) -> None:
    # safetensors writes through a private temporary file (0600); an export is meant to be shared.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def make_search(model, backbone: str, beam: int, n_items: int, n_levels: int):
    """The pure search (params, transitions, history_tokens [B, T·K], seen [B, n_items + 1] |
    None) -> item indices [B, W] (0 = none); seen items are never returned when `seen` is
    given (they rank after every unseen item and are dropped, as in evaluation)."""
    from jaxrec.methods.cofirec.generator_eval import _excluding_seen, _model_only

    def search(params, transitions, history_tokens, seen):
        tables = TrieTables(tuple(transitions))
        fn, model_context, state = gm.beam_scorer(model, backbone, params, history_tokens, beam)
        context = {"model": model_context}
        if seen is None:
            items, scores = constrained_beam_search(_model_only(fn), context, tables, beam, state)
        else:
            context["seen"] = seen
            items, scores = constrained_beam_search(_excluding_seen(fn, tables.transitions, n_levels), context,
                                                    tables, beam, state)
            items = jnp.where(jnp.isneginf(scores), -1, items)
        return jnp.where(items >= 0, items + 1, 0), scores
    return search


def _flat(params) -> dict[str, np.ndarray]:
    return {"/".join(k): np.asarray(jax.device_get(v)) for k, v in flatten_dict(nn.unbox(params)).items()}


def export_generator(task, params, out_dir: Path, platforms: Sequence[str] = ("cpu", "cuda")) -> list[str]:
    out_dir = Path(out_dir)
    flat = _flat(params)
    names = sorted(flat)
    transitions = [np.asarray(t, np.int32) for t in task.trie.tables.transitions]
    spec = {"format": FORMAT, "backbone": task.m.backbone, "model_config": dataclasses.asdict(task.m),
            "compute_dtype": task.config.train.compute_dtype, "n_items": int(task.store.n_items),
            "codebook_sizes": list(task.ids.codebook_sizes), "level_names": list(task.ids.level_names),
            "max_history": task.m.max_history, "beam": task.m.beam,
            "exclude_history": task.config.eval.exclude_history, "param_order": names,
            "artifact": None}
    paths = {"model": out_dir / "model.safetensors", "ids": out_dir / "semantic_ids.npy",
             "trie": out_dir / "trie.safetensors", "items": out_dir / "items.json", "spec": out_dir / "model.json"}
    if jax.process_index() == 0:
        save_file(flat, str(paths["model"]), metadata={"format": FORMAT})
        save_file({f"transitions_{k}": t for k, t in enumerate(transitions)}, str(paths["trie"]),
                  metadata={"format": FORMAT})
        for p in (paths["model"], paths["trie"]):
            _readable(p)
        np.save(paths["ids"], task.ids.codes.astype(np.int32))
        paths["items"].write_text(json.dumps(task.store.item_vocab.tolist()), encoding="utf-8")
    written = list(paths.values())
    artifact, why_not = _serialize_search(task, flat, names, transitions, platforms)
    if artifact is not None:
        written.append(out_dir / ARTIFACT_FILE)
        spec["artifact"] = {"file": ARTIFACT_FILE, "platforms": list(platforms), "batch": "symbolic",
                            "arguments": "params (param_order), transitions_0..K-1, history_tokens [b, T*K] int32, "
                                         "seen [b, n_items + 1] bool",
                            "returns": "items [b, beam] int32 (item indices, 0 = none), scores [b, beam] float32"}
        if jax.process_index() == 0:
            (out_dir / ARTIFACT_FILE).write_bytes(artifact)
    else:
        spec["artifact_missing"] = why_not
    if jax.process_index() == 0:
        paths["spec"].write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return [str(p) for p in written]


def _serialize_search(task, flat, names, transitions, platforms):
    """The search with history exclusion (an all-False `seen` includes history), exported
    with a symbolic batch; (bytes, None), or (None, why) when jax.export cannot lower it."""
    search = make_search(task.model, task.m.backbone, task.m.beam, task.store.n_items, task.ids.n_levels)

    def exported_fn(*args):
        n = len(names)
        params = unflatten_dict({tuple(k.split("/")): v for k, v in zip(names, args[:n])})
        tables = args[n:n + len(transitions)]
        history_tokens, seen = args[n + len(transitions):]
        return search(params, tables, history_tokens, seen)

    (batch,) = jax.export.symbolic_shape("b")
    width = task.m.max_history * task.ids.n_levels
    shapes = ([jax.ShapeDtypeStruct(flat[k].shape, flat[k].dtype) for k in names]
              + [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in transitions]
              + [jax.ShapeDtypeStruct((batch, width), jnp.int32),
                 jax.ShapeDtypeStruct((batch, task.store.n_items + 1), jnp.bool_)])
    # Lowered for one device whatever mesh the export runs under: no sharding constraints
    # (empty rules make `constrain` a no-op), so the artifact is callable on any single device.
    one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    try:
        with jax.set_mesh(one_device), nn.logical_axis_rules(()):
            exported = jax.export.export(jax.jit(exported_fn), platforms=tuple(platforms))(*shapes)
        return bytes(exported.serialize()), None
    except Exception as e:  # a lowering limitation: the export still works through load()
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        return None, f"jax.export could not lower the search: {type(e).__name__}: {reason}"


class GeneratorRecommender:
    """Top-k items for raw histories from a generator export (kind "generative")."""

    def __init__(self, spec: dict, params, ids: np.ndarray, transitions: list[np.ndarray], items: list[str]):
        from jaxrec.methods.cofirec.generator import GeneratorConfig, build_generator
        self.spec, self.params, self.items = spec, params, items
        self.index = {token: i for i, token in enumerate(items) if i > 0}
        config = GeneratorConfig(**{**spec["model_config"],
                                    "drop_levels": tuple(spec["model_config"].get("drop_levels", ()))})
        self.layout = gm.TokenLayout(tuple(spec["codebook_sizes"]))
        self.tokens = self.layout.item_tokens(ids)
        self.model = build_generator(config, self.layout, spec["compute_dtype"])
        self.transitions = [jnp.asarray(t) for t in transitions]
        search = make_search(self.model, spec["backbone"], spec["beam"], spec["n_items"], len(spec["codebook_sizes"]))
        self._search = jax.jit(search)

    @classmethod
    def load(cls, directory: str | Path) -> "GeneratorRecommender":
        directory = Path(directory)
        spec = json.loads((directory / "model.json").read_text(encoding="utf-8"))
        if spec.get("format") != FORMAT:
            raise ExportError(f"{directory / 'model.json'}: format {spec.get('format')!r}, expected {FORMAT!r}")
        flat = load_file(str(directory / "model.safetensors"))
        params = unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
        trie = load_file(str(directory / "trie.safetensors"))
        transitions = [trie[f"transitions_{k}"] for k in range(len(spec["codebook_sizes"]))]
        ids = np.load(directory / "semantic_ids.npy", allow_pickle=False)
        items = json.loads((directory / "items.json").read_text(encoding="utf-8"))
        return cls(spec, params, ids, transitions, items)

    def encode(self, histories: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """(history code tokens [n, T·K] of the last T items, right-aligned; seen mask [n, n_items + 1])."""
        indices = item_indices(self.index, histories, "a generator needs at least one item")
        T = self.spec["max_history"]
        slots = np.zeros((len(histories), T), np.int64)
        seen = np.zeros((len(histories), self.spec["n_items"] + 1), bool)
        for row, ids in enumerate(indices):
            seen[row, ids] = True
            ids = ids[-T:]
            slots[row, T - len(ids):] = ids
        return self.tokens[slots].reshape(len(histories), -1), seen

    def recommend(self, histories: Sequence[Sequence[str]], k: int = 10,
                  exclude_history: bool | None = None) -> list[list[tuple[str, float]]]:
        """The k best items per history, best first, by trie-constrained beam search (k <= beam)."""
        if not 1 <= k <= self.spec["beam"]:
            raise ExportError(f"k: {k} must be in 1..{self.spec['beam']} (the beam width is the ranked list)")
        if exclude_history is None:
            exclude_history = bool(self.spec.get("exclude_history", False))
        tokens, seen = self.encode(histories)
        items, scores = self._search(self.params, self.transitions, jnp.asarray(tokens),
                                     jnp.asarray(seen) if exclude_history else None)
        items, scores = np.asarray(items), np.asarray(scores)
        return [[(self.items[i], float(s)) for i, s in zip(irow, srow) if i > 0][:k]
                for irow, srow in zip(items, scores)]
