"""`task: cofirec.tokenizer` — semantic IDs for every item: CoFiRec's per-level codebooks
(`model.mode: levels`) or TIGER's RQ-VAE (`model.mode: residual`), one code path.

Training records are item indices; a batch gathers the items' (standardised) level vectors
from the frozen input table, and the loss is tokenizer_model.TokenizerNet.loss:
reconstruction (summed over dims) + codebook + beta x commitment, straight-through codes,
k-means codebooks at init, dead-code restarts every `restart_every` steps, optional
Sinkhorn on the last level. Evaluation codes every item (argmin, no Sinkhorn) and reports
per-level utilisation and perplexity, collision rates before/after dedup and the
reconstruction error; the table itself is the checkpoint artifact `semantic_ids`
(`jaxrec.methods.cofirec.semantic_ids.SemanticIds`) that a generator run reads.
See docs/cofirec.md ("Tokenizer") for the choices and their provenance.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import ClassVar, Literal

import jax
import numpy as np

from jaxrec.config import Config, ConfigError
from jaxrec.data.from_config import load_store
from jaxrec.methods.cofirec.semantic_ids import ARTIFACT, SemanticIds
from jaxrec.methods.cofirec.tokenizer_inputs import FEATURES, build_inputs
from jaxrec.methods.cofirec.tokenizer_model import TokenizerNet, distinct_rows
from jaxrec.methods.seqrec.guide import Guide, guide_upstream
from jaxrec.models.codebook_stats import (codebook_perplexity, codebook_utilisation, collision_rate,
                                          collision_rate_letter)
from jaxrec.train.task import EvalSet, Task, Upstream, Variables, register

log = logging.getLogger("jaxrec")
CF_LEVEL = "cf"


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    # eval.metric may name these (higher is better) besides the ranking metrics.
    selection_metrics: ClassVar[tuple[str, ...]] = ("unique_ratio", "neg_reconstruction")

    mode: Literal["levels", "residual"] = "levels"   # levels: CoFiRec; residual: TIGER's RQ-VAE
    text: str = ""                  # item text: Beauty item_text.json | ML-1M movies.dat | "" = synthetic hierarchy
    levels: tuple[str, ...] = ()    # text levels, coarse -> fine (() = all the builder has)
    embeddings: str = FEATURES      # "features" (synthetic hierarchy only) | LLM (smollm2, dir, .gguf) | .npy/.safetensors
    embedding_cache: str = ""       # directory of the LLM embedding cache ("" = no cache)
    embedding_max_tokens: int = 256
    fuse_levels: tuple[str, ...] = ()   # residual: levels concatenated into TIGER's one embedding (() = all)
    cf_guide: str = ""              # levels: run dir of a `task: seqrec` run on the same items ("" = no CF level)
    codebook_size: int = 256        # per level unless codebook_sizes says otherwise
    codebook_sizes: tuple[int, ...] = ()   # per code level; 0 = min(codebook_size, distinct inputs of the level)
    residual_levels: int = 3        # residual: code levels when codebook_sizes is empty
    latent: int = 32                # e
    hidden: tuple[int, ...] = (256, 128)   # encoder MLP widths before the latent (decoder mirrors them)
    cf_hidden: tuple[int, ...] = (64,)
    dropout: float = 0.0
    beta: float = 0.25              # commitment weight (LETTER; CoFiRec's is not published)
    standardize: bool = True        # z-score each level's dimensions, scale to mean squared norm 1
    kmeans_iters: int = 100         # k-means init of the codebooks on the initial encoder outputs (0 = uniform)
    restart_every: int = 100        # steps between dead-code restarts (0 = never)
    restart_until: float = 0.9      # no restarts in the last 10% of training
    sinkhorn_epsilon: float = 0.0   # > 0: Sinkhorn assignment on the last level while training (LETTER 0.003)
    sinkhorn_iters: int = 50
    dedup: Literal["auto", "always", "if_needed"] = "auto"   # auto: residual always, levels if_needed

    def validate(self, config) -> None:
        if self.latent < 1 or self.codebook_size < 1 or any(w < 1 for w in (*self.hidden, *self.cf_hidden)):
            raise ConfigError("latent: latent, codebook_size and hidden widths must be positive")
        if any(s < 0 for s in self.codebook_sizes):
            raise ConfigError(f"codebook_sizes: must be >= 0 (0 = sized to the distinct inputs), "
                              f"got {list(self.codebook_sizes)}")
        if self.mode == "residual" and self.cf_guide:
            raise ConfigError("cf_guide: residual mode (TIGER) quantizes the fused text levels only")
        if self.mode == "levels" and self.fuse_levels:
            raise ConfigError("fuse_levels: only residual mode fuses levels")
        if self.residual_levels < 1 or self.beta < 0 or not 0 <= self.dropout < 1:
            raise ConfigError("residual_levels: needs residual_levels >= 1, beta >= 0, 0 <= dropout < 1")
        if self.restart_every < 0 or not 0 <= self.restart_until <= 1 or self.kmeans_iters < 0:
            raise ConfigError("restart_every: needs restart_every >= 0, 0 <= restart_until <= 1, kmeans_iters >= 0")
        if self.sinkhorn_epsilon < 0 or self.sinkhorn_iters < 1:
            raise ConfigError("sinkhorn_epsilon: must be >= 0 with sinkhorn_iters >= 1")


class ItemRecords:
    """Item indices 1..n_items as records {"item": int32}."""

    def __init__(self, n_items: int):
        self.n_items = n_items

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, i):
        return {"item": np.int32(int(i) + 1)}


def purity(codes: np.ndarray, labels: np.ndarray) -> float:
    """sum over codes of the largest label count inside the code, / items (1 = every code one label)."""
    pairs, counts = np.unique(np.stack([codes, labels], 1), axis=0, return_counts=True)
    best = np.zeros(int(codes.max()) + 1)
    np.maximum.at(best, pairs[:, 0], counts)
    return float(best.sum() / len(codes))


@register
class TokenizerTask(Task):
    name = "cofirec.tokenizer"
    model_config = TokenizerConfig

    @classmethod
    def upstream(cls, config: Config) -> dict[str, Upstream]:
        m = config.model
        return {"cf_guide": guide_upstream("model.cf_guide", m.cf_guide)} if m.cf_guide else {}

    def __init__(self, config: Config, upstream=None):
        super().__init__(config, upstream)
        m, src = config.model, config.source
        self.store = load_store(config.data, src)
        cf_table = None
        if "cf_guide" in self.upstream_runs:
            guide = Guide.from_run(self.upstream_runs["cf_guide"])
            guide.require_items(self.store.item_vocab, src, "model.cf_guide", config.data.source)
            cf_table = guide.item_table
        self.inputs = build_inputs(config, self.store, cf_table)
        names = self.inputs.level_names
        if m.mode == "residual":
            fuse = list(m.fuse_levels) or list(names)
            unknown = [n for n in fuse if n not in names]
            if unknown:
                raise ConfigError(f"{src}: model.fuse_levels: unknown level {unknown[0]!r}; levels: {', '.join(names)}")
            self.x = self.inputs.fused(fuse)
            n_levels = len(m.codebook_sizes) or m.residual_levels
            self.level_names = tuple(f"rq{k + 1}" for k in range(n_levels))
            per_level = [self.x[1:]] + [None] * (n_levels - 1)      # deeper residuals are unknown before training
        else:
            self.x = self.inputs.levels
            self.level_names = names + ((CF_LEVEL,) if cf_table is not None else ())
            per_level = [self.x[1:, k] for k in range(len(names))]
            if cf_table is not None:
                per_level.append(self.inputs.cf[1:])
        self.codebook_sizes = self._sizes(per_level)
        self.net = TokenizerNet(
            mode=m.mode, d_in=self.x.shape[-1], n_sem=len(names) if m.mode == "levels" else 1,
            d_cf=0 if self.inputs.cf is None else self.inputs.cf.shape[1], codebook_sizes=self.codebook_sizes,
            latent=m.latent, hidden=tuple(m.hidden), cf_hidden=tuple(m.cf_hidden), dropout=m.dropout, beta=m.beta,
            sinkhorn_epsilon=m.sinkhorn_epsilon, sinkhorn_iters=m.sinkhorn_iters)
        self.dedup = m.dedup if m.dedup != "auto" else ("always" if m.mode == "residual" else "if_needed")
        self._codes_fn = None

    def _sizes(self, per_level: list) -> tuple[int, ...]:
        m, src = self.config.model, self.config.source
        sizes = list(m.codebook_sizes) or [m.codebook_size] * len(per_level)
        if len(sizes) != len(per_level):
            raise ConfigError(f"{src}: model.codebook_sizes: {len(sizes)} sizes for {len(per_level)} code levels "
                              f"({', '.join(self.level_names)})")
        for k, x in enumerate(per_level):
            distinct = distinct_rows(x) if x is not None else len(self.x) - 1
            wanted = sizes[k] or min(m.codebook_size, distinct)
            if m.kmeans_iters and wanted > distinct:
                raise ConfigError(f"{src}: model.codebook_sizes: level {self.level_names[k]!r} has {distinct} distinct "
                                  f"inputs, fewer than its {wanted} codes (k-means needs k <= distinct points; "
                                  "0 sizes a level to its distinct inputs)")
            sizes[k] = wanted
        return tuple(int(s) for s in sizes)

    # ------------------------------------------------------------------ frozen inputs
    def load_frozen(self, layout):
        frozen = {"x": jax.device_put(self.x, layout.replicated())}
        if self.inputs.cf is not None:
            frozen["cf"] = jax.device_put(self.inputs.cf, layout.replicated())
        log.info("cofirec.tokenizer: %s mode, levels %s, codebooks %s, inputs %s (%d items)", self.config.model.mode,
                 "/".join(self.level_names), list(self.codebook_sizes), self.inputs.source, self.store.n_items)
        return frozen

    def fingerprints(self) -> dict[str, str]:
        return {"tokenizer_inputs": self.inputs.sha256}

    def vocabulary(self):
        return {"items": self.store.item_vocab.tolist(), "source": self.store.source, "levels": list(self.level_names),
                "cf_guide": self.config.model.cf_guide}

    # ------------------------------------------------------------------ data
    def train_records(self):
        return ItemRecords(self.store.n_items)

    def eval_sets(self, stage: str) -> list[EvalSet]:
        protocol = (f"{stage} | codes of all {self.store.n_items:,} items (argmin, no Sinkhorn); a tokenizer has no "
                    "held-out items")
        return [EvalSet(stage, ItemRecords(self.store.n_items), protocol)]

    # ------------------------------------------------------------------ model
    def init(self, rng):
        cf = None if self.inputs.cf is None else self.inputs.cf[1:]
        params = self.net.init(rng, self.x[1:], cf, self.config.model.kmeans_iters)
        return Variables(trainable=params, state=self.net.init_state())

    def loss(self, params, frozen, state, batch, rng, clock):
        items = batch["item"]
        cf = frozen["cf"][items] if "cf" in frozen else None
        restart_last = int(self.config.model.restart_until * clock.total_steps)
        return self.net.loss(params, state, frozen["x"][items], cf, rng, clock.step, self.config.model.restart_every,
                             restart_last, clock.micro == clock.microbatches - 1)

    # ------------------------------------------------------------------ codes of all items
    def item_codes(self, params, frozen, state) -> tuple[np.ndarray, np.ndarray]:
        """(codes int32 [n_items, K] by argmin, reconstruction error per item [n_items]); one
        jitted function, so evaluation, artifacts and export agree. It runs where the frozen
        inputs live (replicated), with no layout of its own: no state kept from load_frozen."""
        if self._codes_fn is None:
            def codes(params, frozen, state):
                cf = frozen["cf"][1:] if "cf" in frozen else None
                out, _, per_item = self.net.forward(params, state, frozen["x"][1:], cf)
                return out.codes, per_item
            self._codes_fn = jax.jit(codes)
        codes, recon = jax.device_get(self._codes_fn(params, frozen, state))
        return np.asarray(codes, np.int32), np.asarray(recon, np.float64)

    def semantic_ids(self, codes: np.ndarray) -> SemanticIds:
        """The table with the dedup rule applied; no two items share an ID afterwards."""
        table = np.concatenate([np.full((1, codes.shape[1]), -1, np.int32), codes])
        ids = SemanticIds(table, self.codebook_sizes, self.level_names, f"cofirec.tokenizer:{self.config.run.name}")
        if self.dedup == "always" or not ids.is_unique():
            ids = ids.with_dedup()
        assert ids.is_unique(), "semantic IDs still collide after dedup"
        return ids

    def evaluate(self, eval_set: EvalSet, params, frozen, state, evaluator):
        codes, recon = self.item_codes(params, frozen, state)
        ids = self.semantic_ids(codes)
        out = {"unique_ratio": 1.0 - collision_rate_letter(codes), "collision_rate": collision_rate(codes),
               "collision_rate_letter": collision_rate_letter(codes),
               "collision_rate_dedup": ids.collision_rate(), "dedup_levels": ids.n_levels - codes.shape[1],
               "max_dedup": int(ids.item_codes[:, -1].max()) if ids.n_levels > codes.shape[1] else 0,
               "reconstruction": float(recon.mean()), "neg_reconstruction": -float(recon.mean())}
        util = codebook_utilisation(codes, self.codebook_sizes)
        ppl = codebook_perplexity(codes)
        for k, name in enumerate(self.level_names):
            out[f"utilisation/{name}"], out[f"perplexity/{name}"] = float(util[k]), float(ppl[k])
        # The planted hierarchy's labels, when the data has them (synthetic hierarchy).
        for k, column in enumerate(("topic", "subtopic")[:codes.shape[1]]):
            if column in self.store.item_columns:
                out[f"purity/{column}"] = purity(codes[:, k], np.asarray(self.store.item_columns[column][1:]))
        out["examples"] = self.store.n_items
        return out

    # ------------------------------------------------------------------ outputs
    def artifacts(self, params, frozen, state):
        return {ARTIFACT: self.semantic_ids(self.item_codes(params, frozen, state)[0]).to_artifact()}

    def export(self, params, frozen, state, out_dir):
        out_dir = Path(out_dir)
        codes, recon = self.item_codes(params, frozen, state)
        ids = self.semantic_ids(codes)
        artifact = {**ids.to_artifact(), "items": self.store.item_vocab[1:].tolist()}
        paths = [out_dir / "semantic_ids.json", out_dir / "semantic_ids.npy"]
        paths[0].write_text(json.dumps(artifact))
        np.save(paths[1], ids.codes)
        m = self.config.model
        self._export_description = {
            "format_of_table": artifact["format"], "mode": m.mode, "n_items": ids.n_items,
            "data": self.store.source, "levels": list(ids.level_names), "codebook_sizes": list(ids.codebook_sizes),
            "text_inputs": self.inputs.source, "cf_guide": m.cf_guide,
            "collision_rate_before_dedup": collision_rate(codes), "reconstruction": float(recon.mean()),
            "file_contents": {"semantic_ids.json": "the artifact plus `items` (the item token of every row)",
                              "semantic_ids.npy": "int32 [n_items + 1, levels]; row i = item index i, row 0 = -1"}}
        return [str(p) for p in paths]

    def export_manifest(self):
        return {"kind": "semantic_ids", **getattr(self, "_export_description", {})}
