"""Fixed-shape records for training (built per visit, with fresh candidates) and evaluation
(built once, with the seeded candidates).

Item slots: every record carries `items` [H + K] = the history (right-padded with 0)
followed by the K candidates; a placeholder at token t reads slot `slots[t]`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxrec.methods.ilora.examples import Examples, FixedDraws, draw_candidates
from jaxrec.methods.ilora.prompts import PromptEncoder


def _left_pad(values: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, np.int32)
    if values.size:
        out[length - values.size:] = values
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class TrainSource:
    """The raw training examples as Grain records (the prompt is built by `RecordBuilder.train`)."""

    def __init__(self, examples: Examples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        i = int(i)
        ex = self.examples
        return {"history": ex.history[i], "length": np.int32(ex.lengths[i]), "target": np.int32(ex.targets[i])}


@dataclasses.dataclass
class EvalData:
    """One evaluation split, encoded once. Row arrays feed the device; titles stay on the host."""
    name: str
    arrays: dict[str, np.ndarray]        # tokens/mask/slots [N, Tp], items [N, S], history [N, H],
                                         # target_index [N], cont/cont_mask [N, K, C]
    candidate_titles: list[list[str]]
    examples: Examples
    draws: FixedDraws
    truncated: int                       # prompts whose oldest history items were dropped to fit
    clipped_continuations: int           # candidate continuations longer than C tokens (scored in part)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        return {k: v[int(i)] for k, v in self.arrays.items()}


@dataclasses.dataclass
class RecordBuilder:
    encoder: PromptEncoder
    titles: np.ndarray          # [n_items + 1] cleaned titles (row 0 = padding)
    n_items: int
    max_target_tokens: int

    @property
    def max_history(self) -> int:
        return self.encoder.max_history

    @property
    def n_candidates(self) -> int:
        return self.encoder.n_candidates

    def train(self, record: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """A training record: a fresh candidate draw and template, prompt + " title\\n"."""
        length, target = int(record["length"]), int(record["target"])
        history = np.asarray(record["history"], np.int32)
        shown = history[:length]
        candidates, _ = draw_candidates(rng, shown, target, self.n_items, self.n_candidates)
        template = int(rng.integers(0, len(self.encoder.templates)))
        enc = self.encoder.encode(template, self.titles[shown].tolist(), self.titles[candidates].tolist(),
                                  target=str(self.titles[target]), max_target_tokens=self.max_target_tokens)
        Nt, T = self.max_target_tokens, self.encoder.max_length
        n = enc.target.size
        target_ids = np.zeros(Nt, np.int32)
        target_ids[:n] = enc.target
        return {"tokens": enc.tokens, "mask": enc.mask, "slots": enc.slots,
                "items": np.concatenate([history, candidates]).astype(np.int32),
                "history": _left_pad(shown, self.max_history),
                "target_pos": np.minimum(enc.length - 1 + np.arange(Nt), T - 1).astype(np.int32),
                "target_ids": target_ids, "target_mask": (np.arange(Nt) < n).astype(np.float32),
                "truncated": np.float32(enc.history_kept < length)}

    def evaluation(self, name: str, examples: Examples, draws: FixedDraws) -> EvalData:
        """Encode every example's prompt and the K candidate continuations (" title\\n")."""
        prompts, conts, titles, truncated = [], [], [], 0
        for i in range(len(examples)):
            shown = examples.history[i, :examples.lengths[i]]
            cand_titles = self.titles[draws.candidates[i]].tolist()
            enc = self.encoder.encode(int(draws.templates[i]), self.titles[shown].tolist(), cand_titles)
            prompts.append(enc)
            titles.append(cand_titles)
            truncated += enc.history_kept < shown.size
            conts.append([self.encoder.continuation(list(enc.ids), enc.text, t) for t in cand_titles])
        Tp = min(_round_up(max(p.length for p in prompts), 8), self.encoder.max_length)
        longest = max(len(c) for row in conts for c in row)
        C = min(_round_up(longest, 4), self.max_target_tokens)
        N, K = len(examples), self.n_candidates
        cont = np.zeros((N, K, C), np.int32)
        cont_mask = np.zeros((N, K, C), bool)
        clipped = 0
        for i, row in enumerate(conts):
            for k, ids in enumerate(row):
                clipped += len(ids) > C
                ids = ids[:C]
                cont[i, k, :len(ids)] = ids
                cont_mask[i, k, :len(ids)] = True
        arrays = {"tokens": np.stack([p.tokens[:Tp] for p in prompts]),
                  "mask": np.stack([p.mask[:Tp] for p in prompts]),
                  "slots": np.stack([p.slots[:Tp] for p in prompts]),
                  "items": np.concatenate([examples.history, draws.candidates], axis=1).astype(np.int32),
                  "history": examples.left_padded(), "target_index": draws.target_index,
                  "cont": cont, "cont_mask": cont_mask}
        return EvalData(name, arrays, titles, examples, draws, int(truncated), clipped)
