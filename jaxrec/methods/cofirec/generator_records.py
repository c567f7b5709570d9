"""Fixed-shape numpy records of the generators: item ids → code-token streams, host side.

All records read the store through `jaxrec.data.windows` (leave-one-out train ends,
left-padded windows) and look items up in a token table [n_items + 1, K] whose row 0 is
all pad, so padding items become padding tokens.

- `T5TrainRecords`: one record per training event t >= 1 (every prefix of items[:-2],
  LETTER's protocol): history = the <= T events before it, target = event t.
      {"history": int32 [T·K], "target": int32 [K]}
- `StreamTrainRecords` (decoder-only): windows of T + 1 events (`data.train_windows`:
  "chunks" makes every training event but a user's first a target exactly once, with up
  to T events of history) flattened into one code stream, and a weight per token that is
  1 where the token is a target code (an event that has a real event before it).
      {"stream": int32 [(T+1)·K], "weight": float32 [(T+1)·K]}
- `GeneratorEvalRecords`: {"history_tokens": int32 [T·K], "target": int32 [] (item
  index), "history": int32 [H] (the full history, right-padded to the store's longest
  sequence, for excluding seen items and for the popularity baseline)}.

Each source's `slots` is the number of item slots each record really fills (its length
for `jaxrec.data.buckets`: the token fields are left-padded, K tokens per slot).
"""
from __future__ import annotations

import numpy as np

from jaxrec.data.windows import EvalRecords, TrainWindows


class T5TrainRecords:
    def __init__(self, store, train_end, tokens: np.ndarray, max_history: int):
        self.windows = TrainWindows(store, train_end, max_history, "prefix")
        self.tokens = tokens
        self.slots = self.windows.ends - self.windows.starts - 1        # history items before the target
        self.trim = {"history": tokens.shape[1]}

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i):
        w = self.windows[i]
        return {"history": self.tokens[w["inputs"]].reshape(-1), "target": self.tokens[w["targets"][-1]]}


class StreamTrainRecords:
    def __init__(self, store, train_end, tokens: np.ndarray, max_history: int, mode: str):
        self.windows = TrainWindows(store, train_end, max_history, mode)
        self.tokens = tokens
        self.K = tokens.shape[1]
        self.slots = self.windows.ends - self.windows.starts             # inputs + the last target
        self.trim = {"stream": self.K, "weight": self.K}

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i):
        w = self.windows[i]
        items = np.concatenate([w["inputs"], w["targets"][-1:]])           # [T + 1]
        # Slot j + 1 is a target when targets[j] is set (then inputs[j], its predecessor, is real).
        is_target = np.concatenate([[False], w["targets"] > 0])
        weight = np.repeat(is_target, self.K).astype(np.float32)
        return {"stream": self.tokens[items].reshape(-1), "weight": weight}


class GeneratorEvalRecords:
    def __init__(self, store, examples, tokens: np.ndarray, max_history: int, history_len: int):
        # One history width for every split, so valid and test batches share compiled programs.
        self.records = EvalRecords(store, examples, max_history, history_len)
        self.tokens = tokens
        self.slots = np.minimum(examples.history_end - self.records.history_start, max_history)
        self.trim = {"history_tokens": tokens.shape[1]}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        return {"history_tokens": self.tokens[r["inputs"]].reshape(-1), "target": r["target"],
                "history": r["history"]}


class Subset:
    """The first n records of a source (the exact scorer's user subsample)."""

    def __init__(self, records, n: int):
        self.records, self.n = records, min(n, len(records))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if not 0 <= int(i) < self.n:
            raise IndexError(f"record {i} out of range [0, {self.n})")
        return self.records[i]
