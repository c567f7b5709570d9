"""`task: caseq` — CaseQ on a SASRec or GRU4Rec backbone, reusing the seqrec task.

What CaseQ changes relative to `task: seqrec` (data, splits, protocols, baselines and
ranking are inherited unchanged):
- the encoder: every backbone layer becomes a `BranchingLevel` (via the encoder's
  `make_level` hook), so the model is L levels of C context branches with gates;
- the loss: prediction loss (default SASRec's BCE with one history-avoiding negative
  per position, as the official sampler) + kl_weight * KL(q(c|S) || p_hat(c));
- evaluation: besides the ranking metrics, the average context distribution of each
  split at the prediction position and two entropies (see `evaluate`);
- optional intermediate gap tests (`model.eval_gaps`) under the gap protocol.

With contexts = 1 and kl_weight = 0 the model and loss are exactly the backbone's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Literal

import flax.linen as nn
import jax
import numpy as np

from jaxrec.config import Config, ConfigError
from jaxrec.data.splits import EvalExamples
from jaxrec.methods.caseq.branching import branching_levels, level_gates, path_distribution
from jaxrec.methods.caseq.negatives import HistoryExcludingNegatives
from jaxrec.methods.caseq.objective import context_kl, entropy, mixture_prior, pseudo_sequences
from jaxrec.methods.seqrec.task import SeqRecConfig, SeqRecTask
from jaxrec.models.encoder import SequenceEncoder
from jaxrec.train.task import EvalSet, register

log = logging.getLogger("jaxrec")


@dataclasses.dataclass(frozen=True)
class CaseQConfig(SeqRecConfig):
    hidden: int = 50
    loss: Literal["ce", "sampled_softmax", "bce"] = "bce"
    contexts: int = 3                   # C: branches per level; levels = `layers`
    kl_weight: float = 0.5              # lambda; 0 skips the prior and the KL
    pseudo_sequences: int = 5           # N: random sequences that estimate the prior, redrawn each step
    positions: bool = True              # position embeddings (CaseQ keeps them for the GRU backbone too)
    history_negatives: bool = True      # bce: negatives avoid the user's training items (official sampler)
    eval_gaps: tuple[int, ...] = ()     # gap split: extra tests at these gaps (0 < g < data.lapse)

    def validate(self, config) -> None:
        super().validate(config)
        if self.contexts < 1:
            raise ConfigError(f"contexts: must be >= 1, got {self.contexts}")
        if self.kl_weight < 0:
            raise ConfigError(f"kl_weight: must be >= 0, got {self.kl_weight}")
        if self.pseudo_sequences < 1:
            raise ConfigError(f"pseudo_sequences: must be >= 1, got {self.pseudo_sequences}")
        if len(set(self.eval_gaps)) != len(self.eval_gaps) or any(g <= 0 for g in self.eval_gaps):
            raise ConfigError(f"eval_gaps: must be distinct positive gaps, got {list(self.eval_gaps)}")
        if self.eval_gaps and config.data.split != "gap":
            raise ConfigError(f"eval_gaps: needs data.split=gap, got {config.data.split}")
        if self.eval_gaps and max(self.eval_gaps) >= config.data.lapse:
            raise ConfigError(f"eval_gaps: every gap must be < data.lapse={config.data.lapse} (the gap test "
                              f"itself), got {list(self.eval_gaps)}")


@register
class CaseQTask(SeqRecTask):
    name = "caseq"
    model_config = CaseQConfig

    def __init__(self, config: Config, upstream=None):
        super().__init__(config, upstream)
        m = config.model
        self.uses_prior = m.kl_weight > 0 and m.contexts > 1

    def build_model(self, dtype, **overrides):
        m = self.config.model
        return super().build_model(dtype, make_level=branching_levels(m.contexts, m.hidden, dtype),
                                   use_positions=m.positions, **overrides)

    # ------------------------------------------------------------------ data
    def train_transform(self):
        m = self.config.model
        if m.loss == "bce" and m.history_negatives:
            return HistoryExcludingNegatives(self.store, self.split.train_end)
        return None

    def eval_sets(self, stage: str) -> list[EvalSet]:
        fresh = stage not in self._eval_cache
        sets = super().eval_sets(stage)
        if stage == "test" and fresh:
            no_gap = self.split.tests["test"]
            for gap in self.config.model.eval_gaps:
                ends = no_gap.history_end + gap
                examples = EvalExamples(no_gap.users, ends, self.store.item_ids[ends].astype(np.int32))
                sets.append(self._eval_set(f"test_gap{gap}", examples))
        return sets

    # ------------------------------------------------------------------ model
    def forward(self, params, inputs, deterministic: bool, last_only: bool, rng=None):
        """(h, level gates) of the encoder; h is [B, L, H] or [B, H] with last_only."""
        rngs = {} if rng is None else {"dropout": rng}
        h, mutated = self.model.apply({"params": params}, inputs, deterministic=deterministic, last_only=last_only,
                                      rngs=rngs, mutable=["intermediates"])
        return h, level_gates(mutated["intermediates"], self.config.model.layers)

    def prior(self, params, rng) -> jax.Array:
        """p_hat [C^K] from N fresh pseudo sequences, in train mode without embedding dropout."""
        sequence_rng, dropout_rng = jax.random.split(rng)
        pseudo = pseudo_sequences(sequence_rng, self.config.model.pseudo_sequences, self.config.data.max_len,
                                  self.store.n_items)
        with without_embedding_dropout():
            _, gates = self.forward(params, pseudo, deterministic=False, last_only=True, rng=dropout_rng)
        return mixture_prior(path_distribution(gates))

    def loss(self, params, frozen, state, batch, rng, clock):
        m = self.config.model
        dropout_rng, loss_rng, prior_rng = jax.random.split(rng, 3)
        h, gates = self.forward(params, batch["inputs"], deterministic=False, last_only=self.last_only,
                                rng=dropout_rng)
        targets = batch["targets"][:, -1:] if self.last_only else batch["targets"]
        options = {}
        if "negatives" in batch:
            options["negatives"] = batch["negatives"][:, -1:] if self.last_only else batch["negatives"]
        h_at, table = self.score_space(h[:, None] if self.last_only else h, params["item_embedding"])
        prediction, stats = self.loss_fn(h_at, table, targets, None, loss_rng, **options)
        # Both terms are means over the target positions, so micro-batches combine exactly by that count.
        metrics = {"weight": stats["weight"], "prediction_loss": prediction}
        if not self.uses_prior:
            return prediction, (metrics, state)
        kl = context_kl(path_distribution(gates), self.prior(params, prior_rng), targets > 0)
        metrics["kl"] = kl
        return prediction + m.kl_weight * kl, (metrics, state)

    def eval_step(self, params, frozen, state, batch):
        h, gates = self.forward(params, batch["inputs"], deterministic=True, last_only=True)
        values = self.rank_metrics(params, h, batch)
        q = path_distribution(gates)[:, -1]
        values["context"] = q
        values["context_entropy"] = entropy(q)
        return values

    def evaluate(self, eval_set: EvalSet, params, frozen, state, evaluator):
        """Ranking metrics plus the context report of the split:

        context              the average q(c|S) at the prediction position, [C^K]
        context_entropy      mean over sequences of H(q(.|S)) (nats): low = each sequence
                             commits to few contexts
        context_mix_entropy  H(average q) (nats): high = sequences use different contexts
        Their difference is the mutual information between sequence and context, which
        is 0 when every sequence gets the same mixture (branches not specialised).
        """
        result = evaluator.run(eval_set, params, frozen, state)
        if "context" in result:
            mean_q = np.asarray(result["context"], np.float64)
            # max(0, .): a one-context model's entropies are exactly 0, not -0.0.
            result["context_mix_entropy"] = max(0.0, float(-np.sum(mean_q * np.log(np.maximum(mean_q, 1e-300)))))
            result["context_entropy"] = max(0.0, result["context_entropy"])
            if jax.process_index() == 0:
                log.info(context_summary(eval_set.name, result, self.config.model.contexts,
                                         self.config.model.layers))
        return result

    # Export: the seqrec task's scoring export. `query` (the encoder's last position, gates
    # applied deterministically) is CaseQ's test-time prediction, the one `eval_step` ranks with,
    # so the artifact, its loader and `jaxrec recommend` need nothing of their own.


def context_summary(split: str, result: dict, n_contexts: int, levels: int) -> str:
    """One line: the split's average context distribution and its entropies."""
    q = np.asarray(result["context"], np.float64)
    return (f"[{split}] contexts (C={n_contexts}, {levels} levels, {q.size} paths): mean q = "
            f"[{' '.join(f'{v:.3f}' for v in q)}]; H(mean q) = {result['context_mix_entropy']:.3f}, "
            f"mean H(q) = {result['context_entropy']:.3f} nats (max {np.log(q.size):.3f})")


@contextlib.contextmanager
def without_embedding_dropout():
    """Skip the encoder's embedding dropout inside the block (the prior's pseudo
    sequences run in train mode without it, as in the official code); raises if the
    encoder no longer has that layer, rather than silently keeping it."""
    hits = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name == "__call__" and module.name == "embed_dropout"
                and isinstance(module.parent, SequenceEncoder)):
            hits.append(module)
            return args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield
    if not hits:
        raise RuntimeError("SequenceEncoder has no 'embed_dropout' layer to skip for the pseudo sequences")
