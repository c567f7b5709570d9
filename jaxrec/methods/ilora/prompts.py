"""Hybrid prompts: item titles in text, each followed by a placeholder token whose input
embedding is later replaced by projector(item embedding).

    "This user has listened to Morcheeba [HistoryEmb], Enigma [HistoryEmb] in the previous. ...
     The artist name candidates are Heat [CansEmb], ... . ... The answer is" + " Enigma\\n"

The templates are LLaRA's/iLoRA's (three per domain; one is drawn per training example).
Two departures, both about tokenization, not content: the official templates end in a
space ("The answer is ") and the target is tokenized on its own; here the template ends
at the last word and the target is " <title>\\n", tokenized together with the prompt
(the prompt's tokens are a prefix of the joint tokenization), so training, generation
and likelihood scoring all see the continuation a tokenizer naturally produces after the
prompt. The official LastFM template 2 says "10 music artist names" with 20 candidates;
the number here is the real candidate count.

Placeholders are single added special tokens. They are not added to the LLM's
vocabulary: their input embedding is always supplied (the projected item embedding, or
in text-only prompts one frozen "[PH]" vector), so the model can never emit them.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Sequence

import numpy as np

HISTORY_TOKEN, CANDIDATE_TOKEN = "[HistoryEmb]", "[CansEmb]"
HISTORY_SLOT, CANDIDATES_SLOT = "[HistoryHere]", "[CansHere]"

TEMPLATES: dict[str, tuple[str, ...]] = {
    "artist": (
        "This user has listened to [HistoryHere] in the previous. Please predict the next music artist this "
        "user will listen to. The artist name candidates are [CansHere]. Choose only one artist from the "
        "candidates. The answer is",
        "This user has listened to [HistoryHere] in the previous. Given the following {K} music artist names, "
        "[CansHere], recommend one artist for this user to listen to next. The artist name you recommend is",
        "The listening history of this user is [HistoryHere]. Recommend the next music artist for this user to "
        "listen to from the following artist name set, [CansHere]. The recommendation should contain one "
        "artist's name only. The recommendation is",
    ),
    "movie": (
        "This user has watched [HistoryHere] in the previous. Please predict the next movie this user will "
        "watch. Choose the answer from the following {K} movie titles: [CansHere]. Answer:",
        "This user has watched [HistoryHere] in the previous. Given the following {K} movie titles: [CansHere], "
        "recommend one movie for this user to watch next. The movie title you recommend is:",
        "The visit history of this user is: [HistoryHere]. Recommend a next movie for this user to watch from "
        "the following movie title set: [CansHere]. The recommendation should contain one movie title only. "
        "Recommendation:",
    ),
    "game": (
        "This user has played [HistoryHere] in the previous. Please predict the next game this user will play. "
        "The game title candidates are [CansHere]. Choose only one game from the candidates. The answer is",
        "This user has played [HistoryHere] in the previous. Given the following {K} game titles, [CansHere], "
        "recommend one game for this user to play next. The game title you recommend is",
        "The visit history of this user is [HistoryHere]. Recommend a next game for this user to play from the "
        "following game title set, [CansHere]. The recommendation should contain one game title only. The "
        "recommendation is",
    ),
}
DOMAINS = tuple(TEMPLATES)


class PromptTooLong(ValueError):
    """Even with a one-item history the prompt does not fit `max_length` tokens."""


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    tokens: np.ndarray      # int32 [T] prompt (+ target) tokens, right-padded; placeholders hold pad_id
    mask: np.ndarray        # bool [T]
    slots: np.ndarray       # int32 [T] item slot of each placeholder (history j → j, candidate k → H + k), else -1
    length: int             # real prompt tokens (without the target)
    history_kept: int       # history items shown (the oldest are dropped when the prompt is too long)
    target: np.ndarray | None = None   # int32 [n] target tokens (" title\n"), when encoded
    text: str = ""                     # the prompt string (placeholders included)
    ids: tuple[int, ...] = ()          # its token ids (placeholder ids included)


class PromptEncoder:
    """Turns (template, history titles, candidate titles[, target title]) into fixed-shape arrays.

    `tokenizer` is a transformers tokenizer; the two placeholder tokens are added to it.
    `max_history` fixes the slot layout: history items use slots 0..H-1, candidates H..H+K-1.
    """

    def __init__(self, tokenizer, domain: str, n_candidates: int, max_history: int, max_length: int,
                 pad_id: int = 0):
        if domain not in TEMPLATES:
            raise ValueError(f"unknown prompt domain {domain!r}; choose one of {', '.join(DOMAINS)}")
        tokenizer.add_special_tokens({"additional_special_tokens": [HISTORY_TOKEN, CANDIDATE_TOKEN]})
        self.tokenizer = tokenizer
        self.history_id, self.candidate_id = tokenizer.convert_tokens_to_ids([HISTORY_TOKEN, CANDIDATE_TOKEN])
        self.templates = tuple(t.replace("{K}", str(n_candidates)) for t in TEMPLATES[domain])
        self.n_candidates, self.max_history, self.max_length, self.pad_id = (
            n_candidates, max_history, max_length, pad_id)
        # transformers re-applies its truncation/padding settings on the Rust tokenizer at
        # every call; concurrent calls from Grain's reader threads can collide ("Already borrowed").
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ text
    def text(self, template: int, history: Sequence[str], candidates: Sequence[str],
             history_token: str = HISTORY_TOKEN, candidate_token: str = CANDIDATE_TOKEN) -> str:
        """The prompt string; each title is followed by its placeholder, titles joined by ", "."""
        out = self.templates[template]
        out = out.replace(HISTORY_SLOT, ", ".join(f"{t} {history_token}" for t in history))
        return out.replace(CANDIDATES_SLOT, ", ".join(f"{t} {candidate_token}" for t in candidates))

    def ids(self, text: str, special: bool = True) -> list[int]:
        with self._lock:
            return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def continuation(self, prompt_ids: list[int], prompt: str, title: str) -> list[int]:
        """Tokens of " title\\n" as they follow the prompt in a joint tokenization."""
        answer = f" {title}\n"
        joint = self.ids(prompt + answer)
        if joint[:len(prompt_ids)] == prompt_ids:
            return joint[len(prompt_ids):]
        return self.ids(answer, special=False)   # the boundary merged: encode the answer alone

    # ------------------------------------------------------------------ arrays
    def encode(self, template: int, history: Sequence[str], candidates: Sequence[str],
               target: str | None = None, max_target_tokens: int = 32) -> EncodedPrompt:
        """Fixed-shape arrays of one prompt (and its target continuation, for training).

        If prompt + target exceed `max_length`, the oldest history items are dropped until
        it fits (`history_kept` says how many remain); the placeholders of the kept items
        still map to their slots (j = position in the full history).
        """
        if len(candidates) != self.n_candidates:
            raise ValueError(f"expected {self.n_candidates} candidate titles, got {len(candidates)}")
        if len(history) > self.max_history:
            raise ValueError(f"history of {len(history)} items exceeds max_history={self.max_history}")
        for first in range(max(len(history), 1)):
            shown = list(history[first:])
            prompt = self.text(template, shown, candidates)
            ids = self.ids(prompt)
            answer = [] if target is None else self.continuation(ids, prompt, target)[:max_target_tokens]
            if len(ids) + len(answer) <= self.max_length:
                encoded = self._arrays(ids, answer if target is not None else None, first, len(history))
                return dataclasses.replace(encoded, text=prompt, ids=tuple(ids))
        raise PromptTooLong(f"a prompt with {len(candidates)} candidates needs {len(ids) + len(answer)} tokens; "
                            f"model.max_length={self.max_length} is too small")

    def _arrays(self, ids: list[int], answer: list[int] | None, first: int, n_history: int) -> EncodedPrompt:
        T = self.max_length
        prompt = np.asarray(ids, np.int64)
        slots = np.full(T, -1, np.int32)
        is_history = np.flatnonzero(prompt == self.history_id)
        is_candidate = np.flatnonzero(prompt == self.candidate_id)
        if is_history.size != n_history - first or is_candidate.size != self.n_candidates:
            raise ValueError("a title contains a placeholder token; cannot place item embeddings")
        slots[is_history] = first + np.arange(is_history.size)
        slots[is_candidate] = self.max_history + np.arange(is_candidate.size)
        full = ids + (answer or [])
        tokens = np.full(T, self.pad_id, np.int32)
        tokens[:len(full)] = full
        tokens[slots >= 0] = self.pad_id
        mask = np.zeros(T, bool)
        mask[:len(full)] = True
        return EncodedPrompt(tokens, mask, slots, len(ids), n_history - first,
                             None if answer is None else np.asarray(answer, np.int32))
