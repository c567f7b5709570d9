"""Evaluation of an iLoRA/LLaRA model (or the frozen LLM, or the SASRec guide) on one split.

Two protocols over the same fixed 20 candidates per example:
- generation (official): greedy decoding of ≤ max_new_tokens tokens from the prompt,
  stopped at a newline or EOS, matched against the candidate titles (see metrics.py);
- likelihood ranking: every candidate continuation " title\\n" scored by its summed
  log-probability given the prompt, the prompt prefilled once and its KV cache shared by
  the K continuations (`score_continuations`); always valid, gives rank_hr@K / rank_ndcg@K.
The guide ranks the candidates by <h, item embedding>; it always names exactly one
candidate, so its valid_ratio is 1 and hr@1 = hr@1_valid = rank_hr@1.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.eval.metrics import mean_ranking_metrics
from jaxrec.eval.scoring import score_space
from jaxrec.methods.ilora.metrics import candidate_ranks, generation_metrics, generation_outcomes
from jaxrec.methods.ilora.records import EvalData
from jaxrec.models.generate import greedy_generate, score_continuations
from jaxrec.sharding import Layout
from jaxrec.train import pipeline


def _eval_functions(task, tuned: bool, layout: Layout):
    """(generate, score) jitted for the tuned model or the frozen base; cached on the task."""
    cache = task.__dict__.setdefault("_eval_fn_cache", {})
    key = (tuned, id(layout.mesh))
    if key in cache:
        return cache[key]
    model = task.model if tuned else task.base_model

    def generate(params, frozen, stats, batch):
        llm, embeds, gates, _ = task.prompt_embeddings(params, frozen, stats, batch, tuned=tuned, hybrid=True,
                                                       train=False)
        out = greedy_generate(model, llm, inputs_embeds=embeds, attention_mask=batch["mask"], lora_gates=gates,
                              max_new_tokens=task.m.max_new_tokens, stop_token_ids=task.stop_ids,
                              pad_token_id=task.pad_id)
        return out.tokens, out.lengths

    def score(params, frozen, stats, batch):
        llm, embeds, gates, _ = task.prompt_embeddings(params, frozen, stats, batch, tuned=tuned, hybrid=True,
                                                       train=False)
        return score_continuations(model, llm, batch["cont"], batch["cont_mask"], prompt_embeds=embeds,
                                   prompt_mask=batch["mask"], lora_gates=gates).total

    out = layout.replicated()
    cache[key] = (jax.jit(generate, out_shardings=(out, out)), jax.jit(score, out_shardings=out))
    return cache[key]


def _host(x: jax.Array) -> np.ndarray:
    return np.asarray(x.addressable_data(0))     # replicated: every process holds the whole array


def evaluate(task, data: EvalData, params: Any, frozen: Any, state: Any, layout: Layout, batch_size: int,
             modes: Sequence[str], tuned: bool = True) -> dict[str, Any]:
    """Metrics of one split; generated texts are kept in `task.last_outputs[<split>]`."""
    N = len(data)
    G = layout.round_batch(batch_size)
    generate_fn, score_fn = _eval_functions(task, tuned, layout)
    stats = state["gate_stats"] if state is not None else {}
    outputs: list[str] = []
    scores: list[np.ndarray] = []
    with layout.activate():
        for b, batch in enumerate(pipeline.eval_batches(data, G)):
            batch.pop("valid")
            real = min(G, N - b * G)
            batch = pipeline.to_global(batch, layout)
            if "generate" in modes:
                tokens, lengths = (_host(x) for x in generate_fn(params, frozen, stats, batch))
                outputs += [task.tokenizer.decode(tokens[r, :lengths[r]].tolist(), skip_special_tokens=True)
                            for r in range(real)]
            if "likelihood" in modes:
                scores.append(_host(score_fn(params, frozen, stats, batch))[:real])
    result: dict[str, Any] = {}
    target_index = data.arrays["target_index"]
    if "generate" in modes:
        valid, correct = generation_outcomes(outputs, data.candidate_titles, target_index)
        result.update(generation_metrics(valid, correct))
        task.last_outputs[("" if tuned else "untuned/") + data.name] = outputs
    if "likelihood" in modes:
        ranks = candidate_ranks(np.concatenate(scores), target_index)
        result.update(mean_ranking_metrics(ranks, task.config.eval.ks, prefix="rank_"))
    result["examples"] = N
    return result


def sasrec_metrics(task, data: EvalData, ks: Sequence[int]) -> dict[str, Any]:
    """The frozen guide ranking each example's candidates by its own scores (<h, e_item>, or cosine
    when the guide was trained that way); ties count against the target."""
    guide = task.guide
    h = jax.jit(lambda p, x: guide.model.apply({"params": p}, x, deterministic=True, last_only=True))(
        guide.params, jnp.asarray(data.arrays["history"]))
    h, table = score_space(jnp.asarray(h, jnp.float32), jnp.asarray(guide.params["item_embedding"], jnp.float32),
                           guide.similarity, guide.temperature)
    candidates = np.asarray(table)[data.arrays["items"][:, task.m.max_history:]]
    scores = np.einsum("nd,nkd->nk", np.asarray(h), candidates)
    ranks = candidate_ranks(scores, data.arrays["target_index"])
    top1 = float((ranks == 1).mean())
    return {"valid_ratio": 1.0, "hr@1": top1, "hr@1_valid": top1, **mean_ranking_metrics(ranks, ks, prefix="rank_"), "examples": len(data)}
