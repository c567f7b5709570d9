"""Recommending from an iLoRA/LLaRA export alone (`jaxrec.export.recommend.load_recommender`).

An LLM recommender of this kind ranks a candidate set named in its prompt, not the whole
catalogue. For each history: the candidates are the guide's (SASRec's) top K items (K =
the run's `model.candidates`, 20 by default), or K tokens the caller passes; the prompt is
built with template 0 of the run's domain, the last `max_history` items shown; each
candidate's " title\\n" is scored by log p(· | prompt) through the same input assembly
(`HybridInputs`) and continuation scoring evaluation uses; the k best are returned.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict

from jaxrec.eval.scoring import score_space
from jaxrec.export.manifest import ExportError
from jaxrec.export.recommend import item_indices
from jaxrec.methods.ilora.examples import Examples, FixedDraws
from jaxrec.methods.ilora.export import FORMAT, ITEMS_FILE, SPEC_FILE, TEMPLATE, TITLES_FILE, TRAINED_FILE
from jaxrec.methods.ilora.inputs import HybridInputs
from jaxrec.methods.ilora.modules import Projector, build_gate
from jaxrec.methods.ilora.prompts import PromptEncoder
from jaxrec.methods.ilora.records import RecordBuilder
from jaxrec.models.generate import score_continuations
from jaxrec.models.llama import Llama
from jaxrec.models.lora import LoraConfig


def _tree(flat: dict[str, np.ndarray], prefix: str) -> dict:
    cut = len(prefix) + 1
    return unflatten_dict({tuple(k[cut:].split("/")): jnp.asarray(v) for k, v in flat.items()
                           if k.startswith(prefix + "/")})


class ILoRARecommender:
    """Top-k items among a candidate set, reranked by the tuned LLM (kind "llm_rerank")."""

    def __init__(self, spec: dict, llm_path: Path, trained: dict[str, np.ndarray], items: list[str],
                 titles: list[str], guide: Any):
        from jaxrec.weights import load_config, load_params, load_tokenizer, open_checkpoint
        m = spec["model_config"]
        self.spec, self.items, self.guide = spec, items, guide
        self.index = {token: i for i, token in enumerate(items) if i > 0}
        self.n_candidates, self.max_history = m["candidates"], m["max_history"]
        merged = spec["llm_source"] == "merged"
        lora = None if merged else LoraConfig(rank=m["lora_rank"], alpha=m["lora_alpha"], dropout=0.0,
                                              num_experts=m["experts"], targets=m["lora_targets"])
        config = load_config(llm_path, dtype=spec["dtype"], param_dtype=spec["param_dtype"], lora=lora)
        self.model = Llama(config)
        self.params = {"adapters": {} if merged else _tree(trained, "adapters")}
        if any(k.startswith("projector/") for k in trained):
            self.params["projector"] = _tree(trained, "projector")
        stats = {}
        if any(k.startswith("gate/") for k in trained):
            self.params["gate"] = _tree(trained, "gate/params")
            stats = _tree(trained, "gate/batch_stats")
        self.stats = stats
        self.frozen = {"llm": load_params(open_checkpoint(llm_path)[0], config.with_lora(None)),
                       "ph": jnp.asarray(trained["ph"]), "guide": {} if guide is None else guide.params}
        self.inputs = HybridInputs(config.dtype, m["prompt"] == "hybrid", m["experts"] > 1,
                                   Projector(config.hidden_size), build_gate(m["gate"], m["experts"]) if
                                   m["experts"] > 1 else None, None if guide is None else guide.model)
        tokenizer = load_tokenizer(llm_path)
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        pad = int(pad) if 0 <= int(pad) < config.vocab_size else 0
        prompt = spec["prompt"]
        encoder = PromptEncoder(tokenizer, prompt["domain"], prompt["candidates"], prompt["max_history"],
                                prompt["max_length"], pad)
        if list(encoder.templates) != prompt["templates"]:
            raise ExportError(f"{SPEC_FILE}: its prompt templates differ from this jaxrec's {prompt['domain']!r} "
                              f"templates (exported by another version)")
        self.builder = RecordBuilder(encoder, np.asarray(titles, dtype=object), spec["n_items"],
                                     prompt["max_target_tokens"])
        self.batch_size = max(1, int(spec.get("batch_size", 8)))

        model, inputs = self.model, self.inputs

        def score(params, frozen, stats, batch):
            llm, embeds, gates, _ = inputs(params, frozen, stats, batch, tuned=True, hybrid=True, train=False)
            return score_continuations(model, llm, batch["cont"], batch["cont_mask"], prompt_embeds=embeds,
                                       prompt_mask=batch["mask"], lora_gates=gates).total
        self._score = jax.jit(score)

    @classmethod
    def load(cls, directory: str | Path, manifest: dict) -> "ILoRARecommender":
        from safetensors.numpy import load_file

        directory = Path(directory)
        spec = json.loads((directory / SPEC_FILE).read_text(encoding="utf-8"))
        if spec.get("format") != FORMAT:
            raise ExportError(f"{directory / SPEC_FILE}: format {spec.get('format')!r}, expected {FORMAT!r}")
        if spec["llm_source"] == "merged":
            llm_path = directory / "merged"
        else:
            ref = manifest.get("external", {}).get("base_model")
            if not ref:
                raise ExportError(f"{directory / 'manifest.json'}: no external base_model for the LLM")
            llm_path = Path(ref["path"])
        guide = _load_guide(directory / "guide") if spec["guide"] else None
        trained = load_file(str(directory / TRAINED_FILE))
        items = json.loads((directory / ITEMS_FILE).read_text(encoding="utf-8"))
        titles = json.loads((directory / TITLES_FILE).read_text(encoding="utf-8"))
        return cls(spec, llm_path, trained, items, titles, guide)

    # ------------------------------------------------------------------ candidates
    def _ids(self, histories: Sequence[Sequence[str]]) -> list[list[int]]:
        return item_indices(self.index, histories, "the prompt needs at least one item")

    def _examples(self, ids: list[list[int]]) -> Examples:
        H = self.max_history
        history = np.zeros((len(ids), H), np.int32)
        lengths = np.zeros(len(ids), np.int32)
        for row, r in enumerate(ids):
            shown = r[-H:]
            history[row, :len(shown)] = shown
            lengths[row] = len(shown)
        return Examples(history, lengths, np.zeros(len(ids), np.int32), np.arange(len(ids)))

    def guide_candidates(self, histories: Sequence[Sequence[str]], exclude_history: bool | None = None) -> np.ndarray:
        """int32 [n, K] item indices: the guide's K best items per history, best first."""
        if self.guide is None:
            raise ExportError("this export has no guide (a text-only LoRA run): pass candidates=[[token, ...]]")
        if exclude_history is None:
            exclude_history = bool(self.spec.get("exclude_history", False))
        ids = self._ids(histories)
        examples = self._examples(ids)
        h = self.guide.model.apply({"params": self.guide.params}, jnp.asarray(examples.left_padded()),
                                   deterministic=True, last_only=True)
        h, table = score_space(jnp.asarray(h, jnp.float32), jnp.asarray(self.guide.params["item_embedding"],
                                                                        jnp.float32),
                               self.guide.similarity, self.guide.temperature)
        scores = np.asarray(h @ table.T, np.float64)
        scores[:, 0] = -np.inf
        if exclude_history:
            for row, r in enumerate(ids):
                scores[row, r] = -np.inf
        available = int(np.isfinite(scores).sum(1).min())
        if available < self.n_candidates:
            raise ExportError(f"only {available} items are left to rank after excluding the history; "
                              f"the prompt needs {self.n_candidates} candidates")
        return np.argsort(-scores, axis=1, kind="stable")[:, :self.n_candidates].astype(np.int32)

    # ------------------------------------------------------------------ scoring
    def score(self, histories: Sequence[Sequence[str]], candidates: np.ndarray) -> np.ndarray:
        """float32 [n, K]: log p(' title\\n' | prompt) of each candidate (item indices [n, K],
        in prompt order) after each history."""
        examples = self._examples(self._ids(histories))
        draws = FixedDraws(np.asarray(candidates, np.int32), np.zeros(len(examples), np.int32),
                           np.full(len(examples), TEMPLATE, np.int32))
        data = self.builder.evaluation("recommend", examples, draws)
        keys = ("tokens", "mask", "slots", "items", "history", "cont", "cont_mask")
        out = []
        for start in range(0, len(examples), self.batch_size):
            batch = {k: jnp.asarray(data.arrays[k][start:start + self.batch_size]) for k in keys}
            out.append(np.asarray(self._score(self.params, self.frozen, self.stats, batch)))
        return np.concatenate(out)

    def recommend(self, histories: Sequence[Sequence[str]], k: int = 10, exclude_history: bool | None = None,
                  candidates: Sequence[Sequence[str]] | None = None) -> list[list[tuple[str, float]]]:
        """The k best of each history's candidates (tokens, log-likelihood scores), best first.
        `candidates`: K item tokens per history to rank instead of the guide's top K."""
        if not 1 <= k <= self.n_candidates:
            raise ExportError(f"k: {k} must be in 1..{self.n_candidates} (the LLM ranks {self.n_candidates} "
                              f"candidates per history)")
        if candidates is None:
            cands = self.guide_candidates(histories, exclude_history)
        else:
            if len(candidates) != len(histories):
                raise ExportError(f"candidates: {len(candidates)} lists for {len(histories)} histories")
            bad = [row for row, c in enumerate(candidates) if len(c) != self.n_candidates]
            if bad:
                raise ExportError(f"candidates: row {bad[0]} has {len(candidates[bad[0]])} items; the prompt "
                                  f"takes exactly {self.n_candidates}")
            cands = np.asarray(self._ids(candidates), np.int32)
        scores = self.score(histories, cands)
        out = []
        for row_c, row_s in zip(cands, scores):
            order = np.argsort(-row_s, kind="stable")[:k]
            out.append([(self.items[row_c[j]], float(row_s[j])) for j in order])
        return out


def _load_guide(directory: Path):
    """The SASRec guide from its scoring export: the router and the default candidates need its
    hidden state, not only its top-k, so the Flax model is rebuilt from `model.json`."""
    from safetensors.numpy import load_file

    from jaxrec.export.scoring import FORMAT as SCORING_FORMAT
    from jaxrec.methods.seqrec.guide import Guide
    from jaxrec.models.encoder import build_sequence_model
    spec_path = directory / "model.json"
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    if spec.get("format") != SCORING_FORMAT:
        raise ExportError(f"{spec_path}: format {spec.get('format')!r}, expected {SCORING_FORMAT!r}")
    flat = load_file(str(directory / "model.safetensors"))
    params = unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
    items = json.loads((directory / "items.json").read_text(encoding="utf-8"))
    model = build_sequence_model(spec["backbone"], spec["n_items"], spec["max_len"], hidden=spec["hidden"],
                                 n_layers=spec["layers"], n_heads=spec["heads"], inner=spec["inner"], dropout=0.0)
    return Guide(run_dir="", step=0, model=model, params=params, item_vocab=np.asarray(items),
                 hidden=int(params["item_embedding"].shape[1]), sha256="",
                 similarity=spec.get("similarity", "dot"), temperature=spec.get("temperature", 1.0))
