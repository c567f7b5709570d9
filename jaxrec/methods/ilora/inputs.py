"""The one place an iLoRA/LLaRA model's inputs are assembled, for training, evaluation and
the export's recommender alike: hybrid prompt embeddings and the per-sequence expert gates.

    x = token embeddings; at each placeholder x_t = P(e_slot) (hybrid) or the frozen [PH] vector
    g = softmax(gate(SASRec(history)))      [b, E], only with E > 1 experts
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.methods.ilora.modules import Projector, apply_gate, splice_items
from jaxrec.models.llama import embed_tokens
from jaxrec.models.lora import merge_trainable


@dataclasses.dataclass(frozen=True)
class HybridInputs:
    dtype: str                  # the LLM's compute dtype
    hybrid: bool                # prompts carry projected item embeddings (else text-only)
    moe: bool                   # E > 1: a gate on the guide's sequence representation
    projector: Projector
    gate: nn.Module | None
    guide_model: Any            # the SASRec encoder (None when neither hybrid nor moe needs it)

    def __call__(self, params, frozen, stats, batch, *, tuned: bool, hybrid, train: bool):
        """(LLM params, input embeddings [b, T, d], gates [b, E] or None, new gate statistics).

        params: {"adapters", "projector"?, "gate"?}; frozen: {"llm", "ph", "guide"}.
        `hybrid` (bool or a traced scalar) selects projected item embeddings or the [PH]
        vector at the placeholders; `tuned=False` is the frozen LLM without adapters."""
        llm = merge_trainable(params["adapters"], frozen["llm"]) if tuned else frozen["llm"]
        embeds = embed_tokens(llm, batch["tokens"], jnp.dtype(self.dtype))
        ph = jnp.broadcast_to(frozen["ph"], batch["items"].shape + frozen["ph"].shape)
        vectors = ph
        if tuned and self.hybrid:
            items = jnp.take(frozen["guide"]["item_embedding"], batch["items"], axis=0)
            projected = self.projector.apply({"params": params["projector"]}, items)
            vectors = jnp.where(hybrid, projected, ph)
        embeds = splice_items(embeds, batch["slots"], vectors)
        gates = None
        if tuned and self.moe:
            h = self.guide_model.apply({"params": frozen["guide"]}, batch["history"], deterministic=True,
                                       last_only=True)
            gates, stats = apply_gate(self.gate, params["gate"], stats, jax.lax.stop_gradient(h), train)
        return llm, embeds, gates, stats
