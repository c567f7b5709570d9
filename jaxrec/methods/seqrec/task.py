"""`task: seqrec` — next-item prediction with SASRec or GRU4Rec over one item table."""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.config import Config, ConfigError
from jaxrec.data.from_config import load_store, make_split
from jaxrec.data.windows import EvalRecords, TrainWindows, popularity_counts
from jaxrec.eval import scoring
from jaxrec.eval.metrics import EvalProtocol, ranking_metrics
from jaxrec.eval.negatives import sample_negatives
from jaxrec.eval.ranking import sampled_ranks, target_ranks
from jaxrec.methods.seqrec.popularity import popularity_metrics
from jaxrec.models.encoder import build_sequence_model
from jaxrec.models.losses import make_loss
from jaxrec.train.task import EvalSet, Task, Variables, register


@dataclasses.dataclass(frozen=True)
class SeqRecConfig:
    backbone: Literal["sasrec", "gru4rec"] = "sasrec"
    hidden: int = 64
    layers: int = 2
    heads: int = 1
    inner: int = 0                 # feed-forward width; 0 = hidden (SASRec.pytorch)
    dropout: float = 0.2
    attn_dropout: float = -1.0     # < 0: same as dropout
    loss: Literal["ce", "sampled_softmax", "bce"] = "ce"
    negatives: int = 128           # sampled_softmax: shared uniform negatives per batch
    loss_chunk: int = 0            # ce: rows per logits block (0 = all rows at once)
    similarity: Literal["dot", "cosine"] = "dot"   # cosine: scores = cos(h, e) / temperature
    temperature: float = 0.05      # cosine only

    def validate(self, config) -> None:
        if self.hidden < 1 or self.layers < 1 or self.heads < 1:
            raise ConfigError("hidden: hidden, layers and heads must be positive")
        if self.hidden % self.heads:
            raise ConfigError(f"heads: {self.heads} heads do not divide hidden={self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.loss == "sampled_softmax" and self.negatives < 1:
            raise ConfigError("negatives: sampled_softmax needs at least one negative")
        if self.similarity == "cosine" and not self.temperature > 0:
            raise ConfigError(f"temperature: must be positive, got {self.temperature}")


class SampledEvalRecords:
    """Evaluation records plus a fixed set of negatives per example (sampled protocols)."""

    def __init__(self, records: EvalRecords, negatives: np.ndarray):
        self.records, self.negatives = records, negatives

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return {**self.records[i], "candidates": self.negatives[int(i)]}


@register
class SeqRecTask(Task):
    name = "seqrec"
    model_config = SeqRecConfig

    def __init__(self, config: Config, upstream=None):
        super().__init__(config, upstream)
        m, d = config.model, config.data
        self.store = load_store(d, config.source)
        self.split = make_split(self.store, d, config.source)
        self.model = self.build_model(jnp.bfloat16 if config.train.compute_dtype == "bfloat16" else jnp.float32)
        options = {"negatives": {"n_negatives": m.negatives}, "loss_chunk": {"chunk": m.loss_chunk or None}}
        self.loss_fn = make_loss(m.loss, **(options["negatives"] if m.loss == "sampled_softmax" else
                                            options["loss_chunk"] if m.loss == "ce" else {}))
        self.last_only = d.train_windows == "prefix"   # RecBole-style records carry one target, at the end
        self.n_negatives = config.eval.n_negatives
        self._eval_cache: dict[str, list[EvalSet]] = {}

    def build_model(self, dtype, **overrides):
        """The encoder; methods that wrap the backbone pass e.g. `make_level` here."""
        m, d = self.config.model, self.config.data
        return build_sequence_model(
            m.backbone, self.store.n_items, d.max_len, hidden=m.hidden, n_layers=m.layers, n_heads=m.heads,
            inner=m.inner or None, dropout=m.dropout, attn_dropout=None if m.attn_dropout < 0 else m.attn_dropout,
            dtype=dtype, **overrides)

    # ------------------------------------------------------------------ data
    def train_records(self):
        return TrainWindows(self.store, self.split.train_end, self.config.data.max_len,
                            self.config.data.train_windows)

    def _protocol(self, split_name: str) -> EvalProtocol:
        e = self.config.eval
        return EvalProtocol(split=split_name, candidates=e.candidates, ks=e.ks,
                            exclude_history=e.exclude_history, seed=e.seed)

    def eval_sets(self, stage: str) -> list[EvalSet]:
        if stage not in self._eval_cache:
            self._eval_cache[stage] = [self._eval_set(name, ex) for name, ex in self.split.stage(stage).items()]
        return self._eval_cache[stage]

    def _eval_set(self, name, examples) -> EvalSet:
        e = self.config.eval
        needs_history = e.exclude_history or self.n_negatives is not None
        records = EvalRecords(self.store, examples, self.config.data.max_len, None if needs_history else 1)
        if self.n_negatives is not None:
            history = records_history(self.store, examples) if e.exclude_history else None
            # Keyed by (seed, split, example): the same example always gets the same negatives.
            negatives = sample_negatives(self.store.n_items, examples.targets, history, self.n_negatives,
                                         seed=e.seed + _split_salt(name))
            records = SampledEvalRecords(records, negatives)
        label = (f"{self._protocol(name).label(self.store.n_items)} | {self.split.protocol} | "
                 f"{len(examples):,} users")
        return EvalSet(name, records, label)

    def vocabulary(self):
        return {"items": self.store.item_vocab.tolist(), "source": self.store.source}

    # ------------------------------------------------------------------ model
    def init(self, rng):
        inputs = jnp.zeros((1, self.config.data.max_len), jnp.int32)
        return Variables(trainable=self.model.init(rng, inputs)["params"])

    def loss(self, params, frozen, state, batch, rng, clock):
        dropout_rng, loss_rng = jax.random.split(rng)
        h = self.model.apply({"params": params}, batch["inputs"], deterministic=False, last_only=self.last_only,
                             rngs={"dropout": dropout_rng})
        targets = batch["targets"][:, -1] if self.last_only else batch["targets"]
        h, table = self.score_space(h, params["item_embedding"])
        loss, metrics = self.loss_fn(h, table, targets, None, loss_rng)
        return loss, ({"weight": metrics["weight"]}, state)

    def eval_step(self, params, frozen, state, batch):
        return self.rank_metrics(params, self.query(params, batch["inputs"]), batch)

    def query(self, params, inputs):
        """The test-time query [B, H] after each history [B, L] (what evaluation and the
        exported scoring artifact rank the item table with)."""
        return self.model.apply({"params": params}, inputs, deterministic=True, last_only=True)

    def score_space(self, h, table):
        """(h, table) whose dot products are the model's scores: raw for "dot"; unit vectors
        with h scaled by 1/temperature for "cosine" (training and ranking share this)."""
        return scoring.score_space(h, table, self.config.model.similarity, self.config.model.temperature)

    def rank_metrics(self, params, query, batch):
        """Per-example ranking metrics of the queries [B, H] under the configured protocol."""
        query, table = self.score_space(query.astype(jnp.float32), params["item_embedding"].astype(jnp.float32))
        if self.n_negatives is not None:
            ranks = sampled_ranks(query, table, batch["target"], batch["candidates"])
        else:
            exclude = batch["history"] if self.config.eval.exclude_history else None
            ranks = target_ranks(query, table, batch["target"], exclude, self.config.eval.item_chunk)
        return ranking_metrics(ranks, self.config.eval.ks)

    # ------------------------------------------------------------------ reporting
    def baselines(self, stage: str, frozen, evaluator):
        counts = popularity_counts(self.store, self.split.train_end)
        rows = {}
        for eval_set in self.eval_sets(stage):
            rows[eval_set.name] = popularity_metrics(counts, eval_set.records, self.config.eval.ks,
                                                     self.config.eval.exclude_history)
        return {"popularity": rows}

    def export(self, params, frozen, state, out_dir):
        from jaxrec.export.scoring import export_scoring
        options = self.export_options
        return export_scoring(self, params, out_dir, top_k=options.top_k, platforms=options.platforms)

    def export_manifest(self):
        from jaxrec.export.scoring import ARTIFACT_FILE, resolved_top_k
        options = self.export_options
        # Recommendations rank the whole catalogue, whatever protocol the metrics used.
        return {"kind": "scoring", "top_k": resolved_top_k(options.top_k, int(self.store.n_items)),
                "artifact": {"file": ARTIFACT_FILE, "platforms": list(options.platforms), "batch": "symbolic"},
                "exclude_history": self.config.eval.exclude_history}

    @classmethod
    def load_recommender(cls, export_dir, manifest):
        from jaxrec.export.scoring import ScoringRecommender
        return ScoringRecommender.load(export_dir)


def records_history(store, examples):
    """CSR (offsets, items) of each example's full input history."""
    starts = store.user_offsets[examples.users]
    lengths = examples.history_end - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return offsets, store.item_ids[index]


def _split_salt(name: str) -> int:
    return sum(ord(c) * 31 ** i for i, c in enumerate(name)) % 1_000_003
