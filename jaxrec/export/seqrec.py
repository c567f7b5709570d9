"""A self-contained SASRec/GRU4Rec artifact: weights, architecture and item vocabulary.

    out/model.safetensors   parameters, flattened with "/" between module names
    out/model.json          architecture (enough to rebuild the module) + provenance
    out/items.json          original item token of each item index (index 0 = padding)

`SeqRecRecommender.load(out)` (or `jaxrec.export.recommend.load_recommender(out)`) needs only these files (no checkpoint, no data, no config).
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

import jaxrec
from jaxrec.export.recommend import UnknownItems
from jaxrec.eval.ranking import top_k
from jaxrec.eval.scoring import score_space
from jaxrec.models.encoder import build_sequence_model

FORMAT = "jaxrec.seqrec/1"


def export_seqrec(task, params, out_dir: Path) -> list[str]:
    out_dir = Path(out_dir)
    flat = {"/".join(k): np.asarray(jax.device_get(v), np.float32)
            for k, v in flatten_dict(nn.unbox(params)).items()}
    m, d = task.config.model, task.config.data
    spec = {"format": FORMAT, "jaxrec_version": jaxrec.__version__, "backbone": m.backbone,
            "n_items": int(task.store.n_items), "max_len": d.max_len, "hidden": m.hidden, "layers": m.layers,
            "heads": m.heads, "inner": m.inner or None, "data_source": task.store.source,
            "similarity": m.similarity, "temperature": m.temperature,
            "exclude_history": task.config.eval.exclude_history,
            "model_config": dataclasses.asdict(m)}
    paths = [out_dir / "model.safetensors", out_dir / "model.json", out_dir / "items.json"]
    if jax.process_index() == 0:
        save_file(flat, str(paths[0]), metadata={"format": FORMAT})
        _readable_like_other_files(paths[0])
        paths[1].write_text(json.dumps(spec, indent=2), encoding="utf-8")
        paths[2].write_text(json.dumps(task.store.item_vocab.tolist()), encoding="utf-8")
    return [str(p) for p in paths]


def _readable_like_other_files(path: Path) -> None:
    """safetensors writes through a private temporary file (mode 0600); an export is meant to
    be shared, so give it the mode any new file gets here (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class SeqRecRecommender:
    """Top-k next items for raw histories of original item tokens (kind "scoring")."""

    def __init__(self, spec: dict, params, items: list[str]):
        self.spec, self.params, self.items = spec, params, items
        self.index = {token: i for i, token in enumerate(items) if i > 0}
        self.model = build_sequence_model(spec["backbone"], spec["n_items"], spec["max_len"], hidden=spec["hidden"],
                                          n_layers=spec["layers"], n_heads=spec["heads"], inner=spec["inner"],
                                          dropout=0.0)
        self._encode = jax.jit(lambda p, x: self.model.apply({"params": p}, x, deterministic=True, last_only=True))

    @classmethod
    def load(cls, directory: str | Path) -> "SeqRecRecommender":
        directory = Path(directory)
        for name in ("model.safetensors", "model.json", "items.json"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name}: missing (not a jaxrec seqrec export?)")
        spec = json.loads((directory / "model.json").read_text(encoding="utf-8"))
        if spec.get("format") != FORMAT:
            raise ValueError(f"{directory / 'model.json'}: format {spec.get('format')!r}, expected {FORMAT!r}")
        flat = load_file(str(directory / "model.safetensors"))
        params = unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
        items = json.loads((directory / "items.json").read_text(encoding="utf-8"))
        return cls(spec, params, items)

    def encode(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """Left-padded id matrix [n, width] of whole histories (width >= max_len)."""
        unknown = [(row, t) for row, history in enumerate(histories) for t in history if t not in self.index]
        if unknown:
            raise UnknownItems(unknown)
        ids = [[self.index[t] for t in history] for history in histories]
        width = max([self.spec["max_len"]] + [len(r) for r in ids])
        out = np.zeros((len(histories), width), np.int32)
        for row, r in enumerate(ids):
            if r:
                out[row, width - len(r):] = r
        return out

    def recommend(self, histories: Sequence[Sequence[str]], k: int = 10,
                  exclude_history: bool | None = None) -> list[list[tuple[str, float]]]:
        """The k best items after each history (original tokens, scores). Seen items are
        skipped when `exclude_history` is true; None takes the run's `eval.exclude_history`
        (the one default, saved in model.json)."""
        if exclude_history is None:
            exclude_history = bool(self.spec.get("exclude_history", False))
        full = self.encode(histories)
        inputs = jnp.asarray(full[:, -self.spec["max_len"]:])
        query = self._encode(self.params, inputs).astype(jnp.float32)
        exclude = jnp.asarray(full) if exclude_history else None
        query, table = score_space(query, self.params["item_embedding"].astype(jnp.float32),
                                   self.spec.get("similarity", "dot"), self.spec.get("temperature", 1.0))
        scores, ids = top_k(query, table, k, exclude)
        scores, ids = np.asarray(scores), np.asarray(ids)
        return [[(self.items[i], float(s)) for s, i in zip(srow, irow) if i > 0] for srow, irow in zip(scores, ids)]
