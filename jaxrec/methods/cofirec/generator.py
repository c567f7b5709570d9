"""`task: cofirec` — generative retrieval over semantic IDs (CoFiRec, and TIGER as its baseline).

The frozen input is a semantic-ID table (`jaxrec.methods.cofirec.semantic_ids`), named by
`model.semantic_ids`: a finished `task: cofirec.tokenizer` run directory (CoFiRec's
coarse-to-fine levels, or TIGER's residual levels), LETTER's released `.index.json`, or
any integer `.npy` table [n_items, K]. Its rows must match this data's item vocabulary.
The generator (`generator_models`: T5 encoder–decoder or a decoder-only Llama stack)
learns P(c_1..c_K | history) = Π_k P(c_k | c_<k, history), coarse → fine, with CE over a
code-only vocabulary; evaluation is a trie-constrained beam search over all items
(`generator_eval`). Ablations are config flags: `level_embedding`, `position_embedding`,
`reverse_levels`, `drop_levels` (e.g. [cf]). A table whose rows are not distinct gets
TIGER's extra dedup level (`dedup: auto`), or is refused (`dedup: false`).
Protocol: leave-one-out; training targets are every event of items[:-2] with up to
`max_history` events before it (LETTER's); full ranking over the catalogue.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec.config import Config, ConfigError
from jaxrec.data.from_config import load_store, make_split
from jaxrec.data.buckets import LengthBuckets, bucket_widths
from jaxrec.data.splits import EvalExamples
from jaxrec.data.windows import popularity_counts
from jaxrec.eval.metrics import EvalProtocol
from jaxrec.eval.trie import build_trie
from jaxrec.methods.cofirec import generator_models as gm
from jaxrec.methods.cofirec.generator_records import GeneratorEvalRecords, StreamTrainRecords, T5TrainRecords
from jaxrec.methods.cofirec.semantic_ids import ARTIFACT, SemanticIds, load_semantic_ids_file
from jaxrec.methods.seqrec.popularity import popularity_metrics
from jaxrec.models.llama import LlamaConfig
from jaxrec.models.t5 import T5Config
from jaxrec.train.task import EvalSet, Task, Upstream, Variables, register

TOKENIZER_TASKS = ("cofirec.tokenizer",)


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    semantic_ids: str = ""          # tokenizer run dir | LETTER .index.json | integer .npy [n_items, K]
    backbone: Literal["t5", "decoder"] = "t5"
    d_model: int = 128              # T5 defaults = LETTER's generator
    d_kv: int = 64
    d_ff: int = 1024
    heads: int = 6
    layers: int = 4                 # encoder layers (t5) or decoder-only layers
    decoder_layers: int = 4         # t5 only
    dropout: float = 0.1
    max_history: int = 20
    level_embedding: bool = True    # E_level (encoder levels; decoder step k)
    position_embedding: bool = True  # E_pos (history slot)
    reverse_levels: bool = False    # ablation: fine → coarse
    drop_levels: tuple[str, ...] = ()   # ablation: level names to drop, e.g. [cf]
    dedup: bool | Literal["auto"] = "auto"   # auto: add a dedup level only when rows collide
    beam: int = 20
    exact_users: int = 100          # users scored exactly for the beam-vs-exact disagreement (0 = off)
    exact_chunk: int = 256          # prefixes per exact-scorer step
    both_exclusions: bool = True    # test splits also report the other eval.exclude_history setting
    valid_users: int = 0            # validation beam search on this many users (a fixed random subset; 0 = all):
                                    # the search dominates evaluation time; test splits always use every user

    def validate(self, config) -> None:
        if not self.semantic_ids:
            raise ConfigError("semantic_ids: required (a cofirec.tokenizer run directory, a LETTER .index.json "
                              "or an integer .npy table)")
        if self.beam < 1:
            raise ConfigError(f"beam: must be >= 1, got {self.beam}")
        if self.beam < max(config.eval.ks):
            raise ConfigError(f"beam: {self.beam} is narrower than the largest eval.ks cut-off "
                              f"{max(config.eval.ks)}; the beam is the ranked list")
        if self.max_history < 1:
            raise ConfigError(f"max_history: must be >= 1, got {self.max_history}")
        for key in ("d_model", "d_kv", "d_ff", "heads", "layers", "decoder_layers", "exact_chunk"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        if self.exact_users < 0:
            raise ConfigError(f"exact_users: must be >= 0, got {self.exact_users}")
        if self.valid_users < 0:
            raise ConfigError(f"valid_users: must be >= 0 (0 = every validation user), got {self.valid_users}")
        if self.backbone == "decoder" and self.d_kv % 2:
            raise ConfigError(f"d_kv: the decoder's rotary embeddings need an even head size, got {self.d_kv}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if config.eval.candidates != "full":
            raise ConfigError("eval.candidates: a generator ranks by beam search over the full catalogue; "
                              f"{config.eval.candidates!r} is not supported")


def _is_table_file(path: str) -> bool:
    return Path(path).suffix in (".json", ".npy")


@register
class GeneratorTask(Task):
    name = "cofirec"
    model_config = GeneratorConfig

    @classmethod
    def upstream(cls, config: Config) -> dict[str, Upstream]:
        path = config.model.semantic_ids
        if _is_table_file(path):
            return {}
        return {"tokenizer": Upstream("model.semantic_ids", path, TOKENIZER_TASKS,
                                      how="jaxrec train configs/cofirec/tokenizer_<data>.yaml (or "
                                          "configs/tiger/tokenizer_<data>.yaml)")}

    def __init__(self, config: Config, upstream=None):
        super().__init__(config, upstream)
        self.m = config.model
        self.store = load_store(config.data, config.source)
        self.split = make_split(self.store, config.data, config.source)
        self.raw_ids, self._file_sha = self._read_table()
        self.ids = self._variant(self.raw_ids)
        if max(config.eval.ks) > self.store.n_items:
            raise ConfigError(f"{config.source}: eval.ks: cut-off {max(config.eval.ks)} is larger than the "
                              f"catalogue ({self.store.n_items} items)")
        self.layout = gm.TokenLayout(self.ids.codebook_sizes)
        self.tokens = self.layout.item_tokens(self.ids.codes)
        self.trie = build_trie(self.ids.item_codes, self.ids.codebook_sizes)
        self.model = self._build_model()
        self._eval_cache: dict[str, list[EvalSet]] = {}

    # ------------------------------------------------------------------ semantic IDs
    def _read_table(self) -> tuple[SemanticIds, str]:
        src, key = self.config.source, "model.semantic_ids"
        run = self.upstream_runs.get("tokenizer")
        if run is None:
            ids = load_semantic_ids_file(self.m.semantic_ids, self.store.item_vocab, src, key)
            return ids, hashlib.sha256(ids.codes.tobytes()).hexdigest()
        if ARTIFACT not in run.artifacts:
            raise ConfigError(f"{src}: {key}: {run.run_dir} saved no {ARTIFACT!r} artifact")
        items = np.asarray(run.task.vocabulary().get("items", []))
        if not np.array_equal(items.astype(str), self.store.item_vocab.astype(str)):
            raise ConfigError(f"{src}: {key}: {run.run_dir} was trained on a different item vocabulary "
                              f"({max(items.size - 1, 0)} items) than {self.config.data.source} "
                              f"({self.store.n_items} items)")
        try:
            ids = SemanticIds.from_artifact(run.artifacts[ARTIFACT], str(run.run_dir))
        except ValueError as e:
            raise ConfigError(f"{src}: {key}: {e}") from None
        return ids, ""

    def _variant(self, ids: SemanticIds) -> SemanticIds:
        """Level ablations, then the uniqueness check (and dedup level)."""
        src, m = self.config.source, self.m
        if ids.n_items != self.store.n_items:
            raise ConfigError(f"{src}: model.semantic_ids: the table has {ids.n_items} item rows, the data "
                              f"{self.store.n_items} items")
        unknown = [name for name in m.drop_levels if name not in ids.level_names]
        if unknown:
            raise ConfigError(f"{src}: model.drop_levels: {unknown} are not levels of the table "
                              f"({', '.join(ids.level_names)})")
        keep = [k for k, name in enumerate(ids.level_names) if name not in m.drop_levels]
        if not keep:
            raise ConfigError(f"{src}: model.drop_levels: drops every level")
        if m.reverse_levels:
            keep = keep[::-1]
        if keep != list(range(ids.n_levels)):
            ids = ids.select_levels(keep)
        if not ids.is_unique():
            if m.dedup is False:
                raise ConfigError(f"{src}: model.dedup: {ids.collision_rate():.2%} of items share a code path "
                                  f"with another item ({'/'.join(ids.level_names)}); set model.dedup to auto or "
                                  "true to append a dedup level")
            return ids.with_dedup()
        return ids.with_dedup() if m.dedup is True else ids

    def fingerprints(self) -> dict[str, str]:
        return {"semantic_ids": self._file_sha} if self._file_sha else {}

    # ------------------------------------------------------------------ model
    def _build_model(self):
        return build_generator(self.m, self.layout, self.config.train.compute_dtype)

    def init(self, rng):
        K, T = self.ids.n_levels, self.m.max_history
        if self.m.backbone == "t5":
            history = jnp.full((1, T * K), gm.N_SPECIAL, jnp.int32)
            params = self.model.init(rng, history, jnp.full((1, K), gm.N_SPECIAL, jnp.int32))["params"]
        else:
            params = self.model.init(rng, jnp.full((1, (T + 1) * K), gm.N_SPECIAL, jnp.int32))["params"]
        return Variables(trainable=params)

    def loss(self, params, frozen, state, batch, rng, clock):
        rngs = {"dropout": rng}
        if self.m.backbone == "t5":
            logits = self.model.apply({"params": params}, batch["history"], batch["target"], deterministic=False,
                                      rngs=rngs)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target"])
            weight = jnp.ones_like(ce)
        else:
            stream = batch["stream"]
            logits = self.model.apply({"params": params}, stream, deterministic=False, rngs=rngs)[:, :-1]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, stream[:, 1:])
            weight = batch["weight"][:, 1:]
        total = jnp.sum(weight)
        loss = jnp.sum(ce * weight) / jnp.maximum(total, 1.0)
        return loss, ({"weight": total}, state)

    def beam_context(self, params, history_tokens):
        if self.m.backbone == "t5":
            return gm.t5_context(self.model, params, history_tokens)
        return gm.decoder_context(self.model, params, history_tokens)

    def logprob_fn(self, params):
        if self.m.backbone == "t5":
            return gm.t5_logprob_fn(self.model, params)
        return gm.decoder_logprob_fn(self.model, params)

    # ------------------------------------------------------------------ data
    def train_records(self):
        if "_train_records" not in self.__dict__:
            d, m = self.config.data, self.m
            self._train_records = (T5TrainRecords(self.store, self.split.train_end, self.tokens, m.max_history)
                                   if m.backbone == "t5" else
                                   StreamTrainRecords(self.store, self.split.train_end, self.tokens, m.max_history,
                                                      d.train_windows))
        return self._train_records

    def train_buckets(self) -> LengthBuckets | None:
        return self.length_buckets(self.train_records())

    def length_buckets(self, records) -> LengthBuckets | None:
        """`data.length_buckets` widths over the records' slots (None when it is 1)."""
        n = self.config.data.length_buckets
        if n <= 1:
            return None
        full = self.m.max_history + (0 if isinstance(records, (T5TrainRecords, GeneratorEvalRecords)) else 1)
        return LengthBuckets(records.slots, bucket_widths(full, n), records.trim)

    def eval_sets(self, stage: str) -> list[EvalSet]:
        if stage not in self._eval_cache:
            self._eval_cache[stage] = [self._eval_set(name, ex) for name, ex in self.split.stage(stage).items()]
        return self._eval_cache[stage]

    def _eval_set(self, name, examples) -> EvalSet:
        if name == "valid" and 0 < self.m.valid_users < len(examples):
            # Fixed by the run's seed, so every validation of a run scores the same users.
            keep = np.sort(np.random.default_rng(self.config.run.seed).permutation(len(examples))[:self.m.valid_users])
            examples = EvalExamples(examples.users[keep], examples.history_end[keep], examples.targets[keep])
        empty = examples.history_end <= self.store.user_offsets[examples.users]
        if empty.any():
            raise ConfigError(f"{self.config.source}: data.min_length: {int(empty.sum())} {name} examples have an "
                              "empty history; a generator needs at least one history item (min_length >= 2)")
        e = self.config.eval
        protocol = EvalProtocol(split=name, candidates="full", ks=e.ks, exclude_history=e.exclude_history)
        label = (f"{protocol.label(self.store.n_items)} | {self.split.protocol} | trie-constrained beam search, "
                 f"beam {self.m.beam}, {self.ids.n_levels} levels ({'/'.join(self.ids.level_names)}) | "
                 f"{len(examples):,} users")
        return EvalSet(name, GeneratorEvalRecords(self.store, examples, self.tokens, self.m.max_history,
                                                          int(self.store.lengths().max())), label)

    def eval_step(self, params, frozen, state, batch):
        raise NotImplementedError("cofirec evaluates by beam search (see evaluate)")

    def evaluate(self, eval_set, params, frozen, state, evaluator):
        from jaxrec.methods.cofirec.generator_eval import evaluate_split
        return evaluate_split(self, eval_set, params, evaluator)

    def vocabulary(self):
        return {"items": self.store.item_vocab.tolist(), "source": self.store.source,
                "levels": list(self.ids.level_names), "codebook_sizes": list(self.ids.codebook_sizes)}

    # ------------------------------------------------------------------ reporting
    def baselines(self, stage: str, frozen, evaluator):
        counts = popularity_counts(self.store, self.split.train_end)
        return {"popularity": {s.name: popularity_metrics(counts, s.records, self.config.eval.ks,
                                                          self.config.eval.exclude_history)
                               for s in self.eval_sets(stage)}}

    def artifacts(self, params, frozen, state):
        """The table the generator was trained on (after ablations and dedup)."""
        return {"generator_semantic_ids": self.ids.to_artifact()}

    def export(self, params, frozen, state, out_dir):
        from jaxrec.methods.cofirec.generator_export import export_generator
        return export_generator(self, params, out_dir, platforms=self.export_options.platforms)

    def export_manifest(self):
        return {"kind": "generative", "levels": list(self.ids.level_names),
                "codebook_sizes": list(self.ids.codebook_sizes), "beam": self.m.beam, "backbone": self.m.backbone}

    @classmethod
    def load_recommender(cls, export_dir, manifest):
        from jaxrec.methods.cofirec.generator_export import GeneratorRecommender
        return GeneratorRecommender.load(export_dir)


def build_generator(m: GeneratorConfig, layout: gm.TokenLayout, compute_dtype: str):
    """The backbone `m.backbone` over `layout`'s code vocabulary (also rebuilt from an export)."""
    dtype = "bfloat16" if compute_dtype == "bfloat16" else "float32"
    if m.backbone == "t5":
        t5 = T5Config.letter(layout.vocab_size, d_model=m.d_model, d_kv=m.d_kv, d_ff=m.d_ff, num_heads=m.heads,
                             num_layers=m.layers, num_decoder_layers=m.decoder_layers, dropout_rate=m.dropout,
                             dtype=dtype)
        return gm.CodeT5(t5, layout, m.max_history, m.level_embedding, m.position_embedding)
    llama = LlamaConfig(vocab_size=layout.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff,
                        num_layers=m.layers, num_heads=m.heads, num_kv_heads=m.heads, head_dim=m.d_kv,
                        max_position_embeddings=(m.max_history + 1) * layout.n_levels,
                        tie_word_embeddings=True, dtype=dtype)
    return gm.CodeDecoder(llama, layout, m.max_history, m.level_embedding, m.position_embedding, m.dropout)


def beam_search_items(task: GeneratorTask, params, history_tokens: np.ndarray, exclude=None) -> np.ndarray:
    """Convenience for scripts and tests: item lists [B, beam] (item indices, 0 = none) of a
    host batch, on the current devices without a mesh. Compiled once per task and shape."""
    history = None if exclude is None else jnp.asarray(exclude)
    return np.asarray(_items_search(task)(params, task.trie.tables, jnp.asarray(history_tokens), history))


def _items_search(task: GeneratorTask):
    # A fresh jax.jit per call would compile on every call: keep one per task.
    cached = task.__dict__.get("_items_search")
    if cached is not None:
        return cached
    from jaxrec.methods.cofirec.generator_eval import _seen_mask
    from jaxrec.methods.cofirec.generator_export import make_search
    search = make_search(task.model, task.m.backbone, task.m.beam, task.ids.n_items, task.ids.n_levels)

    def run(params, tables, history_tokens, history):
        seen = None if history is None else _seen_mask(history, task.ids.n_items + 1)
        return search(params, tables.transitions, history_tokens, seen)[0]
    task.__dict__["_items_search"] = jax.jit(run)
    return task.__dict__["_items_search"]
