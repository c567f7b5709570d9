"""Export of a scoring model (SASRec, GRU4Rec, CaseQ) and recommending from the export alone.

`jaxrec export RUN OUT` writes (beside `manifest.json`, kind "scoring"):

    model.safetensors    the parameters (float32), "/" between module names
    model.json           the architecture and provenance, and how to call the artifact
    items.json           the original item token of each item index (index 0 = padding)
    scoring.jaxexport    the model's test-time scoring serialized with `jax.export` (StableHLO),
                         for the platforms asked for (default CPU and CUDA), batch symbolic:

        score(*params, histories [b, L] int32, exclude [b, m] int32)
            -> (items [b, K] int32, scores [b, K] float32)

    params      the arrays of model.safetensors in the order of model.json's "param_order"
    histories   item indices of the last L = max_len items, left-padded with 0
    exclude     item indices never to return (the whole history, however long, when history
                items are excluded; 0 = padding; m is symbolic too — [b, 1] zeros excludes nothing)
    items       the K = top_k best items, best first (ties: the smaller index); 0 where
                fewer than K items are left (score -inf)

`ScoringRecommender.load(OUT)` calls that artifact — no model code is rebuilt, so what it
answers is what a process with only `jax` and numpy gets from the same files.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file, save_file

import jaxrec
from jaxrec.eval.ranking import top_k
from jaxrec.eval.scoring import score_space
from jaxrec.export.manifest import ExportError
from jaxrec.export.recommend import item_indices

FORMAT = "jaxrec.scoring/1"
ARTIFACT_FILE = "scoring.jaxexport"
DEFAULT_TOP_K = 100
DEFAULT_PLATFORMS = ("cpu", "cuda")


def resolved_top_k(requested: int | None, n_items: int) -> int:
    """How many items the artifact ranks: `requested` (default 100), at most the catalogue."""
    k = DEFAULT_TOP_K if requested is None else int(requested)
    if k < 1:
        raise ExportError(f"--top-k: must be >= 1, got {k}")
    return min(k, n_items)


def make_scorer(query: Callable, similarity: str, temperature: float, k: int, chunk: int = 4096):
    """The pure test-time scoring: (params, histories [b, L], exclude [b, m]) -> (items [b, k],
    scores [b, k]); `query(params, histories)` is the model's [b, H] query, scored against the
    item table in the space training and evaluation use."""
    def score(params, histories, exclude):
        q = query(params, histories).astype(jnp.float32)
        q, table = score_space(q, params["item_embedding"].astype(jnp.float32), similarity, temperature)
        scores, items = top_k(q, table, k, exclude, chunk)
        return items, scores
    return score


def _readable(path: Path) -> None:
    # safetensors writes through a private temporary file (0600); an export is meant to be shared.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def export_scoring(task, params, out_dir: Path, *, top_k: int | None = None,
                   platforms: Sequence[str] = DEFAULT_PLATFORMS) -> list[str]:
    """Write the scoring export of a seqrec-family task (it supplies `query(params, inputs)`,
    `store`, `config`); returns the paths written."""
    out_dir = Path(out_dir)
    flat = {"/".join(k): np.asarray(jax.device_get(v), np.float32)
            for k, v in flatten_dict(nn.unbox(params)).items()}
    names = sorted(flat)
    m, d = task.config.model, task.config.data
    n_items = int(task.store.n_items)
    k = resolved_top_k(top_k, n_items)
    artifact = serialize_scorer(make_scorer(task.query, m.similarity, m.temperature, k, task.config.eval.item_chunk),
                                flat, names, d.max_len, platforms)
    spec = {"format": FORMAT, "task": task.name, "jaxrec_version": jaxrec.__version__, "backbone": m.backbone,
            "n_items": n_items, "max_len": d.max_len, "hidden": m.hidden, "layers": m.layers, "heads": m.heads,
            "inner": m.inner or None, "similarity": m.similarity, "temperature": m.temperature,
            "compute_dtype": task.config.train.compute_dtype, "data_source": task.store.source,
            "exclude_history": task.config.eval.exclude_history, "model_config": dataclasses.asdict(m),
            "param_order": names, "top_k": k,
            "artifact": {"file": ARTIFACT_FILE, "platforms": list(platforms), "batch": "symbolic",
                         "arguments": "params (param_order), histories [b, max_len] int32 (left-padded with 0), "
                                      "exclude [b, m] int32 (item indices; 0 = none)",
                         "returns": "items [b, top_k] int32 (item indices, best first; 0 = none), "
                                    "scores [b, top_k] float32"}}
    paths = [out_dir / "model.safetensors", out_dir / "model.json", out_dir / "items.json", out_dir / ARTIFACT_FILE]
    if jax.process_index() == 0:
        save_file(flat, str(paths[0]), metadata={"format": FORMAT})
        _readable(paths[0])
        paths[1].write_text(json.dumps(spec, indent=2), encoding="utf-8")
        paths[2].write_text(json.dumps(task.store.item_vocab.tolist()), encoding="utf-8")
        paths[3].write_bytes(artifact)
    return [str(p) for p in paths]


def serialize_scorer(score, flat: dict[str, np.ndarray], names: Sequence[str], max_len: int,
                     platforms: Sequence[str]) -> bytes:
    """`score` exported with symbolic batch and exclusion width, parameters as arguments."""
    def exported_fn(*args):
        params = unflatten_dict({tuple(name.split("/")): a for name, a in zip(names, args[:len(names)])})
        return score(params, *args[len(names):])

    batch, width = jax.export.symbolic_shape("b, m")
    shapes = ([jax.ShapeDtypeStruct(flat[n].shape, flat[n].dtype) for n in names]
              + [jax.ShapeDtypeStruct((batch, max_len), jnp.int32), jax.ShapeDtypeStruct((batch, width), jnp.int32)])
    # Lowered for one device whatever mesh the export runs under: no sharding constraints
    # (empty rules make `constrain` a no-op), so the artifact is callable on any single device.
    one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    with jax.set_mesh(one_device), nn.logical_axis_rules(()):
        exported = jax.export.export(jax.jit(exported_fn), platforms=tuple(platforms))(*shapes)
    return bytes(exported.serialize())


def _bucket(n: int) -> int:
    """The next power of two >= n: exclusion widths are padded to it, so a stream of
    histories of every length compiles a few programs, not one per length."""
    return 1 << max(0, int(n) - 1).bit_length()


class ScoringRecommender:
    """Top-k next items for raw histories of original item tokens, by the exported artifact."""

    def __init__(self, spec: dict, params: dict[str, np.ndarray], items: list[str], exported):
        self.spec, self.params, self.items = spec, params, items
        self.index = {token: i for i, token in enumerate(items) if i > 0}
        self._args = [jnp.asarray(params[n]) for n in spec["param_order"]]
        self._call = jax.jit(exported.call)   # compiled once per input shape

    @classmethod
    def load(cls, directory: str | Path) -> "ScoringRecommender":
        directory = Path(directory)
        spec_path = directory / "model.json"
        try:
            spec = json.loads(spec_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExportError(f"{spec_path}: unreadable ({e})") from None
        if spec.get("format") != FORMAT:
            raise ExportError(f"{spec_path}: format {spec.get('format')!r}, expected {FORMAT!r} (an export from "
                              f"another jaxrec version; export the run again)")
        artifact = directory / spec["artifact"]["file"]
        platform = jax.export.default_export_platform()
        if platform not in spec["artifact"]["platforms"]:
            raise ExportError(f"{artifact}: exported for {', '.join(spec['artifact']['platforms'])}, not for this "
                              f"machine's {platform}; export again with --platforms including {platform}")
        try:
            exported = jax.export.deserialize(bytearray(artifact.read_bytes()))
        except Exception as e:  # a foreign or damaged file that still matched its hash
            raise ExportError(f"{artifact}: not a jax.export artifact this jax reads ({type(e).__name__}: {e})") \
                from None
        params = load_file(str(directory / "model.safetensors"))
        items = json.loads((directory / "items.json").read_text(encoding="utf-8"))
        return cls(spec, params, items, exported)

    @property
    def max_k(self) -> int:
        return int(self.spec["top_k"])

    def encode(self, histories: Sequence[Sequence[str]], exclude_history: bool) -> tuple[np.ndarray, np.ndarray]:
        """(inputs [n, max_len] of the last max_len items, left-padded; exclude [n, m] item
        indices — every history item when excluding, else one 0 column)."""
        ids = item_indices(self.index, histories, "a next item needs at least one item before it")
        L = self.spec["max_len"]
        inputs = np.zeros((len(ids), L), np.int32)
        # At least max_len wide: histories up to max_len items (the usual case) share one program.
        width = _bucket(max([L] + [len(r) for r in ids])) if exclude_history else 1
        exclude = np.zeros((len(ids), width), np.int32)
        for row, r in enumerate(ids):
            tail = r[-L:]
            inputs[row, L - len(tail):] = tail
            if exclude_history:
                exclude[row, :len(r)] = r
        return inputs, exclude

    def score(self, inputs: np.ndarray, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The artifact on encoded arrays: (item indices [n, top_k], scores [n, top_k])."""
        items, scores = self._call(*self._args, jnp.asarray(inputs), jnp.asarray(exclude))
        return np.asarray(items), np.asarray(scores)

    def recommend(self, histories: Sequence[Sequence[str]], k: int = 10,
                  exclude_history: bool | None = None) -> list[list[tuple[str, float]]]:
        """The k best items after each history (original tokens, scores), best first. Seen items
        are skipped when `exclude_history` is true; None takes the run's `eval.exclude_history`."""
        n_items = self.spec["n_items"]
        if not 1 <= k <= n_items:
            raise ExportError(f"k: {k} must be in 1..{n_items} (the catalogue has {n_items} items)")
        if k > self.max_k:
            raise ExportError(f"k: {k} is more than the {self.max_k} items this export ranks; export again with "
                              f"--top-k {k}")
        if exclude_history is None:
            exclude_history = bool(self.spec.get("exclude_history", False))
        if not histories:
            return []
        items, scores = self.score(*self.encode(histories, exclude_history))
        return [[(self.items[i], float(s)) for i, s in zip(irow[:k], srow[:k]) if i > 0]
                for irow, srow in zip(items, scores)]
