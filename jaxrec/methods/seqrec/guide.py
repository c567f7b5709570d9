"""A finished `task: seqrec` run used read-only by another method (iLoRA's gate and item
embeddings, CoFiRec's collaborative level): its encoder, parameters and item vocabulary.

Methods declare the guide as an upstream run (`Task.upstream`); the session opens it once
and its parameter hash becomes part of the method's checkpoint fingerprints.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxrec.config import ConfigError
from jaxrec.train.task import Upstream

GUIDE_TASKS = ("seqrec",)


def guide_upstream(key: str, run_dir: str) -> Upstream:
    return Upstream(key=key, run_dir=run_dir, tasks=GUIDE_TASKS)


@dataclasses.dataclass
class Guide:
    run_dir: str
    step: int
    model: Any                 # SequenceEncoder (static)
    params: dict               # numpy leaves
    item_vocab: np.ndarray
    hidden: int
    sha256: str
    similarity: str = "dot"    # how the guide scores items (seqrec `model.similarity`)
    temperature: float = 1.0

    @classmethod
    def from_run(cls, run) -> "Guide":
        """From an opened seqrec run (`jaxrec.train.runs.OpenedRun`)."""
        params = run.host_params()
        m = run.config.model
        return cls(run_dir=str(run.run_dir), step=int(run.step), model=run.task.model, params=params,
                   item_vocab=run.task.store.item_vocab, hidden=int(params["item_embedding"].shape[1]),
                   sha256=run.sha256, similarity=m.similarity, temperature=m.temperature)

    @property
    def item_table(self) -> np.ndarray:
        """[n_items + 1, hidden]; row 0 is the pad item."""
        return np.asarray(self.params["item_embedding"])

    def require_items(self, item_vocab: np.ndarray, source: str, key: str, data_source: str) -> None:
        """The guide must have been trained on exactly this item vocabulary (same ids, same order)."""
        if not np.array_equal(self.item_vocab, item_vocab):
            raise ConfigError(f"{source}: {key}: {self.run_dir} was trained on a different item vocabulary "
                              f"({self.item_vocab.size - 1} items) than {data_source} ({item_vocab.size - 1} items)")
