"""`task: ilora` — an LLM recommender on LLaRA-style hybrid prompts with a sequence-gated
mixture of LoRA experts (iLoRA); one expert is LLaRA's LoRA, `prompt: text` its text-only form.

Per micro-batch (see docs/ilora.md for the full method and the departures):
  h = SASRec(history)                        frozen guide, deterministic  [b, 64]
  g = softmax(gate(h))                       [b, E], shared by every token and layer
  e_j = SASRec item table[item_j]            frozen                       [b, H+K, 64]
  x = token embeddings, x[placeholder_j] = projector(e_j)   (hybrid) or the frozen [PH] vector (text)
  loss = cross-entropy of " target title\\n" given the prompt, through LLM + MoE-LoRA(g)
The hybrid prompt is used with probability (micro step)/(total micro steps) — LLaRA's
curriculum, clocked by the trainer's `Clock` — or always (`curriculum: false`).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.config import Config, ConfigError
from jaxrec.data.llara import read_llara
from jaxrec.methods.ilora import evaluation
from jaxrec.methods.ilora.examples import examples_from_store, fixed_draws
from jaxrec.methods.ilora.inputs import HybridInputs
from jaxrec.methods.ilora.modules import GATES, Projector, build_gate
from jaxrec.methods.ilora.optim import ilora_optimizer
from jaxrec.methods.ilora.prompts import DOMAINS, PromptEncoder
from jaxrec.methods.ilora.records import RecordBuilder, TrainSource
from jaxrec.methods.seqrec.guide import Guide, guide_upstream
from jaxrec.models.llama import Llama, output_table
from jaxrec.models.lora import ALL_PROJECTIONS, LoraConfig, split_trainable
from jaxrec.train.task import EvalSet, Task, Upstream, Variables, register
from jaxrec.weights.fingerprint import checkpoint_sha256

log = logging.getLogger("jaxrec")
EVAL_MODES = ("generate", "likelihood")
BASELINES = ("sasrec", "untuned")


@dataclasses.dataclass(frozen=True)
class ILoRAConfig:
    base_model: str = "smollm2"           # HF directory, GGUF file, or a packaged name ("smollm2")
    # Compute dtype of the LLM. auto: float32 on CPU (no native bf16 dot on the CPUs measured,
    # docs/llm.md "Benchmark"), bfloat16 on GPU/TPU; adapters and optimizer state stay float32.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    param_dtype: str = ""                  # storage dtype of the frozen base ("" = the compute dtype)
    remat: bool = False                    # recompute each decoder layer in the backward pass
    guide: str = ""                        # run directory of the SASRec guide (`task: seqrec`)
    domain: Literal["artist", "movie", "game"] = "artist"   # prompt templates
    experts: int = 4                       # E; 1 = plain LoRA (LLaRA)
    lora_rank: int = 8                     # total rank r (each expert r / E)
    lora_alpha: float = 32.0               # scale = alpha / (r / E)
    lora_dropout: float = 0.1
    lora_targets: str = ALL_PROJECTIONS
    gate: Literal["resnet", "linear", "mlp"] = "resnet"
    gate_lr_ratio: float = 0.3
    weight_decay: float = 1e-5             # projector and gate (L2 added to the gradient, torch Adam)
    prompt: Literal["hybrid", "text"] = "hybrid"
    curriculum: bool = True                # P(hybrid prompt) rises from 0 to 1 over training
    max_history: int = 10
    min_history: int = 3                   # LLaRA keeps examples with >= 3 history items
    candidates: int = 20
    max_length: int = 384                  # tokens of prompt + target (training) / prompt (evaluation)
                                           # (gradient accumulation: train.microbatches)
    max_target_tokens: int = 32            # tokens of " title\n"
    max_new_tokens: int = 64
    valid_modes: tuple[str, ...] = ("generate", "likelihood")
    test_modes: tuple[str, ...] = ("generate", "likelihood")
    eval_limit: int = 0                    # evaluate only the first N examples of each split (0 = all)
    report_baselines: tuple[str, ...] = ("sasrec", "untuned")

    def validate(self, config) -> None:
        if self.experts < 1 or self.lora_rank < 1 or self.lora_rank % self.experts:
            raise ConfigError(f"lora_rank: {self.lora_rank} must be a positive multiple of experts={self.experts}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.candidates < 2 or self.max_history < 1 or not 1 <= self.min_history <= self.max_history:
            raise ConfigError("candidates: need >= 2 candidates and 1 <= min_history <= max_history")
        if self.max_length < 16 or self.max_target_tokens < 2 or self.max_new_tokens < 1:
            raise ConfigError("max_length: max_length >= 16, max_target_tokens >= 2, max_new_tokens >= 1")
        for key, modes, allowed in (("valid_modes", self.valid_modes, EVAL_MODES),    # [] skips validation
                                    ("test_modes", self.test_modes, EVAL_MODES),
                                    ("report_baselines", self.report_baselines, BASELINES)):
            bad = [m for m in modes if m not in allowed]
            if bad:
                raise ConfigError(f"{key}: {bad} not in {', '.join(allowed)}")
        if self.param_dtype not in ("", "float32", "bfloat16", "float16"):
            raise ConfigError(f"param_dtype: {self.param_dtype!r} is not '', float32, bfloat16 or float16")
        assert self.gate in GATES and self.domain in DOMAINS


def resolve_compute_dtype(dtype: str, backend: str | None = None) -> str:
    """`model.dtype: auto` → float32 on CPU, bfloat16 on an accelerator; explicit dtypes pass."""
    if dtype != "auto":
        return dtype
    return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


def lora_config(m: ILoRAConfig) -> LoraConfig:
    """E experts of rank r/E on the target projections, scale alpha / (r/E) (the official
    MoE-LoRA scaling); E = 1 is LLaRA's LoRA with scale alpha / r."""
    return LoraConfig(rank=m.lora_rank, alpha=m.lora_alpha, dropout=m.lora_dropout, num_experts=m.experts,
                      targets=m.lora_targets)


@register
class ILoRATask(Task):
    name = "ilora"
    model_config = ILoRAConfig

    @classmethod
    def upstream(cls, config: Config) -> dict[str, Upstream]:
        m = config.model
        needs_guide = m.prompt == "hybrid" or m.experts > 1 or "sasrec" in m.report_baselines
        if needs_guide and not m.guide:
            raise ConfigError(f"{config.source}: model.guide: hybrid prompts, a gate (experts > 1) and the SASRec "
                              "baseline need a trained SASRec run directory (see configs/ilora/)")
        return {"guide": guide_upstream("model.guide", m.guide)} if m.guide else {}

    def __init__(self, config: Config, upstream=None):
        super().__init__(config, upstream)
        from jaxrec.weights import load_config, load_tokenizer, token_ids_containing
        from jaxrec.weights.packaged import resolve_model_path
        m = self.m = config.model
        self.hybrid, self.moe = m.prompt == "hybrid", m.experts > 1
        self.stores = self._read_data()
        self.store = self.stores["train"]
        titles = self.store.item_columns.get("title")
        if titles is None:
            raise ConfigError(f"{config.source}: data.source: {config.data.source} has no item names "
                              "(id2name.txt); hybrid prompts need titles")
        self.examples = {split: examples_from_store(s, m.max_history, m.min_history) for split, s in self.stores.items()}

        self.base_path = resolve_model_path(m.base_model)
        dtype = resolve_compute_dtype(m.dtype)
        self.llm_config = load_config(self.base_path, dtype=dtype, param_dtype=m.param_dtype or dtype,
                                      lora=lora_config(m), remat=m.remat)
        self.model = Llama(self.llm_config)
        self.base_model = Llama(self.llm_config.with_lora(None))
        tokenizer = load_tokenizer(self.base_path)
        pad_id = self.llm_config.pad_token_id if self.llm_config.pad_token_id is not None else 0
        self.pad_id = int(pad_id) if 0 <= int(pad_id) < self.llm_config.vocab_size else 0
        self.encoder = PromptEncoder(tokenizer, m.domain, m.candidates, m.max_history, m.max_length, self.pad_id)
        self.builder = RecordBuilder(self.encoder, titles, self.store.n_items, m.max_target_tokens)
        self.stop_ids = tuple(sorted(set(self.llm_config.eos_token_ids) |
                                     set(token_ids_containing(tokenizer, "\n"))))
        self.tokenizer = tokenizer

        guide_run = self.upstream_runs.get("guide")
        self.guide = Guide.from_run(guide_run) if guide_run is not None else None
        if self.guide is not None:
            self.guide.require_items(self.store.item_vocab, config.source, "model.guide", config.data.source)
        self.projector = Projector(self.llm_config.hidden_size)
        self.gate = build_gate(m.gate, m.experts)
        self.inputs = HybridInputs(self.llm_config.dtype, self.hybrid, self.moe, self.projector, self.gate,
                                   None if self.guide is None else self.guide.model)
        self._base_sha256 = ""
        self._eval_cache: dict[str, list[EvalSet]] = {}
        self._baseline_cache: dict[str, dict] = {}
        self.last_outputs: dict[str, list[str]] = {}     # split → generated text (for reports)

    def _read_data(self):
        d = self.config.data
        path = Path(d.source)
        if not path.is_dir():
            raise ConfigError(f"{self.config.source}: data.source: {d.source} is not a LLaRA directory "
                              "(train.tsv, val.tsv, test.tsv, id2name.txt)")
        return read_llara(path)

    # ------------------------------------------------------------------ frozen inputs
    def load_frozen(self, layout):
        from jaxrec.weights import load_params, open_checkpoint
        m = self.m
        ckpt, _, _ = open_checkpoint(self.base_path)
        llm = load_params(ckpt, self.llm_config.with_lora(None), layout=layout)
        table = llm["embed_tokens"]
        # The text-only placeholder "[PH]": a new-token row, initialised as recent transformers
        # versions initialise resized embeddings (the mean of the existing rows), and frozen.
        ph = jax.device_put(jnp.mean(table.astype(jnp.float32), axis=0), layout.replicated())
        guide = {} if self.guide is None else jax.device_put(self.guide.params, layout.replicated())
        log.info("ilora: base %s (sha256 %s…), guide %s, E=%d, rank %d, prompt %s", self.base_path,
                 self.fingerprints()["base_model"][:12], m.guide or "-", m.experts, m.lora_rank, m.prompt)
        return {"llm": llm, "ph": ph, "guide": guide}

    def fingerprints(self) -> dict[str, str]:
        if not self._base_sha256:       # hashing a multi-GB base takes a while: once, on demand
            self._base_sha256 = checkpoint_sha256(self.base_path)
        return {"base_model": self._base_sha256}

    def vocabulary(self):
        return {"items": self.store.item_vocab.tolist(), "source": self.store.source,
                "base_model": str(self.base_path), "guide": self.m.guide,
                "guide_step": None if self.guide is None else self.guide.step}

    # ------------------------------------------------------------------ data
    def train_records(self):
        return TrainSource(self.examples["train"])

    def train_transform(self):
        return self.builder.train

    def eval_sets(self, stage: str) -> list[EvalSet]:
        if stage not in self._eval_cache:
            split = "valid" if stage == "valid" else "test"
            examples = self.examples[split]
            if self.m.eval_limit:
                examples = examples.take(np.arange(min(self.m.eval_limit, len(examples))))
            draws = fixed_draws(examples, self.store.n_items, self.m.candidates, len(self.encoder.templates),
                                self.config.eval.seed, split)
            data = self.builder.evaluation(split, examples, draws)
            if data.truncated:
                log.warning("ilora %s: %d prompt(s) exceed model.max_length=%d; their oldest history items "
                            "were dropped", split, data.truncated, self.m.max_length)
            self._eval_cache[stage] = [EvalSet(split, data, self.protocol(split, len(examples)))]
        return self._eval_cache[stage]

    def protocol(self, split: str, n: int) -> str:
        m, K = self.m, self.m.candidates
        modes = m.valid_modes if split == "valid" else m.test_modes
        parts = [f"{Path(self.config.data.source).name} {split}",
                 f"{K} candidates (target + {K - 1} negatives outside the history) fixed by seed {self.config.eval.seed}"]
        if "generate" in modes:
            parts.append(f"greedy generation ≤ {m.max_new_tokens} tokens cut at the first newline; valid = exactly "
                         "one candidate title (lower-cased) in the output; hr@1 = correct/all, "
                         "hr@1_valid = correct/valid (official HR@1)")
        if "likelihood" in modes:
            parts.append("rank_* = candidates ranked by log p(' title\\n' | prompt)")
        return " | ".join(parts + [f"{n:,} examples"])

    # ------------------------------------------------------------------ model
    def init(self, rng):
        k_lora, k_proj, k_gate = jax.random.split(rng, 3)
        call = {"input_ids": jnp.zeros((1, 1), jnp.int32)}
        if self.moe:
            call["lora_gates"] = jnp.full((1, self.m.experts), 1.0 / self.m.experts)
        adapters, _ = split_trainable(self.model.init(k_lora, **call)["params"])
        trainable, state = {"adapters": adapters}, {"gate_stats": {}}
        d_s = self.guide.hidden if self.guide is not None else 1
        if self.hybrid:
            trainable["projector"] = self.projector.init(k_proj, jnp.zeros((1, 1, d_s)))["params"]
        if self.moe:
            variables = self.gate.init(k_gate, jnp.zeros((2, d_s)), train=False)
            trainable["gate"] = variables["params"]
            state["gate_stats"] = variables.get("batch_stats", {})
        return Variables(trainable=trainable, state=state)

    def optimizer(self, schedule):
        t, m = self.config.train, self.m
        groups = {"adapters": dict(factor=1.0, weight_decay=0.0)}
        if self.hybrid:
            groups["projector"] = dict(factor=1.0, weight_decay=m.weight_decay, skip_when_silent=True)
        if self.moe:
            groups["gate"] = dict(factor=m.gate_lr_ratio, weight_decay=m.weight_decay)
        return ilora_optimizer(schedule, groups, t.b1, t.b2)

    def prompt_embeddings(self, params, frozen, stats, batch, *, tuned: bool, hybrid, train: bool):
        """(LLM params, input embeddings [b, T, d], gates [b, E] or None, new gate statistics).

        `hybrid` (bool or a traced scalar) selects projected item embeddings or the [PH]
        vector at the placeholders; `tuned=False` is the frozen LLM without adapters
        (`HybridInputs`, shared with the export's recommender)."""
        return self.inputs(params, frozen, stats, batch, tuned=tuned, hybrid=hybrid, train=train)

    def _micro_loss(self, params, frozen, stats, clock, batch, rng):
        k_hybrid, k_dropout = jax.random.split(rng)
        if self.m.curriculum:
            # Official: P(hybrid) = (micro-batch index + 1) / micro-batches of the whole run.
            p = clock.progress()
            hybrid = jax.random.uniform(k_hybrid) < p
        else:
            hybrid = jnp.asarray(True)
        llm, embeds, gates, stats = self.prompt_embeddings(params, frozen, stats, batch, tuned=True, hybrid=hybrid,
                                                           train=True)
        out = self.model.apply({"params": llm}, inputs_embeds=embeds, attention_mask=batch["mask"],
                               lora_gates=gates, deterministic=False, rngs={"dropout": k_dropout},
                               return_hidden=True, logit_index=jnp.zeros(embeds.shape[:1], jnp.int32))
        hidden = jnp.take_along_axis(out.hidden, batch["target_pos"][..., None], axis=1)
        logits = self._output_logits(llm, hidden)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["target_ids"][..., None], axis=-1)[..., 0]
        weight = batch["target_mask"]
        loss = (nll * weight).sum() / jnp.maximum(weight.sum(), 1.0)
        metrics = {"hybrid": hybrid.astype(jnp.float32), "truncated": batch["truncated"].mean(),
                   "tokens_per_example": batch["mask"].sum(-1).mean().astype(jnp.float32)}
        if gates is not None:
            metrics["gate_entropy"] = -(gates * jnp.log(jnp.maximum(gates, 1e-12))).sum(-1).mean()
        return loss, metrics, stats

    def _output_logits(self, llm, hidden):
        dtype = jnp.dtype(self.llm_config.dtype)
        table = output_table(llm, self.llm_config).astype(dtype)
        return jnp.einsum("bnd,vd->bnv", hidden.astype(dtype), table, preferred_element_type=jnp.float32)

    def loss(self, params, frozen, state, batch, rng, clock):
        """Token-mean loss of one (micro-)batch. No `weight` metric is reported, so the
        trainer's gradient accumulation (`train.microbatches`) averages the micro-batch
        losses as Lightning's accumulation does in the official code; the curriculum is
        clocked by micro-batches (`clock.progress()`)."""
        loss, metrics, stats = self._micro_loss(params, frozen, state["gate_stats"], clock, batch, rng)
        return loss, (metrics, {"gate_stats": stats})

    def eval_step(self, params, frozen, state, batch):
        raise NotImplementedError("ilora evaluates by generation and likelihood ranking (see evaluate)")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, eval_set, params, frozen, state, evaluator):
        modes = self.m.valid_modes if eval_set.name == "valid" else self.m.test_modes
        return evaluation.evaluate(self, eval_set.records, params, frozen, state, evaluator.layout,
                                   self.config.eval.batch_size, modes, tuned=True)

    def baselines(self, stage: str, frozen, evaluator):
        rows: dict[str, dict] = {}
        for name in self.m.report_baselines:
            key = f"{name}/{stage}"
            if key not in self._baseline_cache:
                self._baseline_cache[key] = {s.name: self.baseline_metrics(name, s, frozen, evaluator.layout)
                                             for s in self.eval_sets(stage)}
            rows[name] = self._baseline_cache[key]
        return rows

    def baseline_metrics(self, name: str, eval_set: EvalSet, frozen, layout) -> dict:
        """The SASRec guide ranking the same candidates, or the frozen LLM on text-only prompts."""
        if name == "sasrec":
            return evaluation.sasrec_metrics(self, eval_set.records, self.config.eval.ks)
        modes = self.m.valid_modes if eval_set.name == "valid" else self.m.test_modes
        return evaluation.evaluate(self, eval_set.records, None, frozen, None, layout,
                                   self.config.eval.batch_size, modes, tuned=False)

    # ------------------------------------------------------------------ export
    def export(self, params, frozen, state, out_dir):
        """The trained pieces, the guide, prompts and candidate protocol (`export.py`); with one
        expert also the merged Hugging Face model and the PEFT adapter."""
        from jaxrec.methods.ilora.export import export_ilora
        paths, self._export_info = export_ilora(self, params, frozen, state, Path(out_dir))
        return [str(p) for p in paths]

    def export_manifest(self):
        return dict(getattr(self, "_export_info", {"kind": "llm_rerank"}))

    @classmethod
    def load_recommender(cls, export_dir, manifest):
        from jaxrec.methods.ilora.recommender import ILoRARecommender
        return ILoRARecommender.load(export_dir, manifest)
