"""Evaluation protocols as index arithmetic on a store.

A `Split` says, for every user, where its training events end (`train_end`, an
absolute index into `store.item_ids`; training events of user u are
`item_ids[user_offsets[u]:train_end[u]]`) and lists evaluation examples as
(user, history_end, target): the input is `item_ids[user_offsets[u]:history_end]`.

Users too short for a protocol are *train-only* by default (their whole sequence is
training data, they are never evaluated), as in SASRec and CaseQ; `short_users="drop"`
removes them from training as well (train_end = their first event).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxrec.data.store import InteractionStore

_SHORT_USERS = ("train", "drop")


@dataclasses.dataclass(frozen=True)
class EvalExamples:
    users: np.ndarray        # int64 [n] row index into the store
    history_end: np.ndarray  # int64 [n] absolute end (exclusive) of the input history
    targets: np.ndarray      # int32 [n] item to predict

    def __len__(self) -> int:
        return self.users.size


@dataclasses.dataclass(frozen=True)
class Split:
    protocol: str
    train_end: np.ndarray                # int64 [n_users]
    valid: EvalExamples
    tests: dict[str, EvalExamples]       # "test" (+ "test_gap" for the gap protocol)

    def train_lengths(self, store: InteractionStore) -> np.ndarray:
        return self.train_end - store.user_offsets[:-1]

    def stage(self, stage: str) -> dict[str, EvalExamples]:
        """The non-empty evaluation splits of a stage: "valid" (model selection) or "test"."""
        examples = {"valid": self.valid} if stage == "valid" else self.tests
        return {name: ex for name, ex in examples.items() if len(ex)}

    def train_mask(self, store: InteractionStore) -> np.ndarray:
        return train_mask(store, self.train_end)


def train_mask(store: InteractionStore, train_end: np.ndarray) -> np.ndarray:
    """bool [n_interactions]: which events are training events under `train_end`."""
    return np.arange(store.n_interactions) < np.repeat(np.asarray(train_end), store.lengths())


def _examples(store: InteractionStore, users: np.ndarray, history_end: np.ndarray) -> EvalExamples:
    users = users.astype(np.int64)
    history_end = history_end.astype(np.int64)
    return EvalExamples(users, history_end, store.item_ids[history_end].astype(np.int32))


def _train_end_for_short(store: InteractionStore, long_enough: np.ndarray, short_users: str) -> np.ndarray:
    if short_users not in _SHORT_USERS:
        raise ValueError(f"short_users must be one of {_SHORT_USERS}, got {short_users!r}")
    ends = store.user_offsets[1:] if short_users == "train" else store.user_offsets[:-1]
    return np.where(long_enough, 0, ends).astype(np.int64)


def leave_one_out(store: InteractionStore, min_length: int = 3, short_users: str = "train") -> Split:
    """Last event = test, second-to-last = validation, the rest = training.

    Users with fewer than `min_length` events (at least 3, so that the validation input
    is never empty) are train-only (or dropped, see module doc).
    """
    if min_length < 3:
        raise ValueError(f"min_length must be at least 3 (train, validation, test), got {min_length}")
    start, end = store.user_offsets[:-1], store.user_offsets[1:]
    long_enough = end - start >= min_length
    users = np.flatnonzero(long_enough)
    train_end = _train_end_for_short(store, long_enough, short_users)
    train_end[users] = end[users] - 2
    return Split(protocol=f"leave-one-out(min_length={min_length})", train_end=train_end,
                 valid=_examples(store, users, end[users] - 2),
                 tests={"test": _examples(store, users, end[users] - 1)})


def gap_split(store: InteractionStore, lapse: int = 30, short_users: str = "train") -> Split:
    """CaseQ's lapse protocol (events counted, not time), for users with n >= 3 + lapse:

    train = events[:-(2+lapse)]; valid target = events[-(2+lapse)];
    "test" (no gap): input = events[:-(1+lapse)], target = events[-(1+lapse)];
    "test_gap": input = events[:-1] (includes the lapse), target = events[-1].
    """
    if lapse < 0:
        raise ValueError(f"lapse must be >= 0, got {lapse}")
    start, end = store.user_offsets[:-1], store.user_offsets[1:]
    long_enough = end - start >= 3 + lapse
    users = np.flatnonzero(long_enough)
    train_end = _train_end_for_short(store, long_enough, short_users)
    train_end[users] = end[users] - (2 + lapse)
    return Split(protocol=f"gap(lapse={lapse})", train_end=train_end,
                 valid=_examples(store, users, end[users] - (2 + lapse)),
                 tests={"test": _examples(store, users, end[users] - (1 + lapse)),
                        "test_gap": _examples(store, users, end[users] - 1)})


def temporal_split(store: InteractionStore, valid_start, test_start, min_history: int = 1,
                   targets: str = "first") -> Split:
    """Split by absolute time: training = events with t < valid_start.

    Each user's validation target is its first event with valid_start <= t < test_start,
    its test target its first event with t >= test_start (`targets="all"`: every event in
    the window is an example). The input is all of the user's earlier events, so a test
    input includes the validation-period events. An example needs at least `min_history`
    input events. Training never sees events at or after valid_start.
    """
    if store.timestamps is None:
        raise ValueError(f"temporal_split needs timestamps; {store.source} has none")
    if not valid_start <= test_start:
        raise ValueError(f"valid_start ({valid_start}) must not be after test_start ({test_start})")
    if targets not in ("first", "all"):
        raise ValueError(f"targets must be 'first' or 'all', got {targets!r}")
    user = store.user_of_interaction()
    start = store.user_offsets[:-1]
    ts = store.timestamps
    train_end = start + np.bincount(user[ts < valid_start], minlength=store.n_users)
    examples = []
    for lo, hi in ((valid_start, test_start), (test_start, None)):
        in_window = (ts >= lo) if hi is None else ((ts >= lo) & (ts < hi))
        idx = np.flatnonzero(in_window)
        if targets == "first":
            idx = idx[np.r_[True, user[idx][1:] != user[idx][:-1]]] if idx.size else idx
        idx = idx[idx - start[user[idx]] >= min_history]
        examples.append(_examples(store, user[idx], idx))
    rule = "all" if targets == "all" else "first"
    return Split(protocol=f"temporal(valid_start={valid_start}, test_start={test_start}, targets={rule})",
                 train_end=train_end.astype(np.int64), valid=examples[0], tests={"test": examples[1]})


LLARA_ROLES = ("train", "valid", "test")


def llara_split(store: InteractionStore, roles: np.ndarray) -> Split:
    """The split a LLaRA/iLoRA directory ships: each row (pseudo-user) has a fixed role.

    roles [n_users] in {"train", "valid", "test"} (the file the row came from). A train
    row is training data entirely; a valid/test row is one example (its history → its
    last item) and is never trained on, as in the LLM methods that use these files.
    Rows whose history is empty are not evaluated.
    """
    roles = np.asarray(roles).astype(str)
    if roles.shape != (store.n_users,):
        raise ValueError(f"llara_split needs one role per row ({store.n_users}), got shape {roles.shape}")
    unknown = sorted(set(roles.tolist()) - set(LLARA_ROLES))
    if unknown:
        raise ValueError(f"unknown row roles {unknown}; expected {', '.join(LLARA_ROLES)}")
    start, end = store.user_offsets[:-1], store.user_offsets[1:]
    train_end = np.where(roles == "train", end, start).astype(np.int64)
    examples = {}
    for role in ("valid", "test"):
        users = np.flatnonzero((roles == role) & (end - start >= 2))
        examples[role] = _examples(store, users, end[users] - 1)
    return Split(protocol="llara(rows of train/val/test files)", train_end=train_end, valid=examples["valid"],
                 tests={"test": examples["test"]})
