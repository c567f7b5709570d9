"""The semantic-ID table: what a tokenizer run produces and a generator reads.

    codes  int32 [n_items + 1, K]   row i = item index i's codes, coarse -> fine; row 0
                                    (the padding item) is all -1
    codebook_sizes (n_1, ..., n_K)   codes of level k lie in [0, n_k)
    level_names                      e.g. ("category", "brand_leaf", "title", "cf") or
                                     ("rq1", "rq2", "rq3", "dedup")

Three sources give one: a tokenizer run (`task: cofirec.tokenizer`, saved with every
checkpoint as the artifact `semantic_ids`), LETTER's released index JSON
(`{"<item id - 1>": ["<a_12>", "<b_3>", ...]}`), or any integer array `[n_items, K]`
(`.npy`, read without pickles; rows in item-index order, or `[n_items + 1, K]` with a
padding row first). Whatever the source, the rows are tied to the item vocabulary of the
data they were made for; a generator refuses a table whose rows do not match its items.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxrec.config import ConfigError
from jaxrec.models.codebook_stats import collision_rate, dedup_position

FORMAT = "jaxrec.semantic_ids/1"
ARTIFACT = "semantic_ids"
_LETTER_TOKEN = re.compile(r"^<([a-z])_(\d+)>$")


@dataclasses.dataclass(frozen=True)
class SemanticIds:
    codes: np.ndarray                   # int32 [n_items + 1, K], row 0 = -1
    codebook_sizes: tuple[int, ...]
    level_names: tuple[str, ...]
    source: str = ""

    def __post_init__(self):
        codes = np.asarray(self.codes)
        if codes.ndim != 2 or codes.shape[0] < 2 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"{self.source}: a semantic-ID table is an integer array [n_items + 1, levels], "
                             f"got {codes.dtype} {codes.shape}")
        if len(self.codebook_sizes) != codes.shape[1] or len(self.level_names) != codes.shape[1]:
            raise ValueError(f"{self.source}: {codes.shape[1]} levels but {len(self.codebook_sizes)} codebook sizes "
                             f"and {len(self.level_names)} level names")
        body = codes[1:]
        if body.min() < 0 or np.any(body.max(axis=0) >= np.asarray(self.codebook_sizes)):
            raise ValueError(f"{self.source}: codes outside [0, codebook size) for sizes {list(self.codebook_sizes)}")
        object.__setattr__(self, "codes", codes.astype(np.int32))

    @property
    def n_items(self) -> int:
        return self.codes.shape[0] - 1

    @property
    def n_levels(self) -> int:
        return self.codes.shape[1]

    @property
    def item_codes(self) -> np.ndarray:
        """[n_items, K]: the table without its padding row (row j = item index j + 1)."""
        return self.codes[1:]

    def collision_rate(self) -> float:
        return collision_rate(self.item_codes)

    def is_unique(self) -> bool:
        return len(np.unique(self.item_codes, axis=0)) == self.n_items

    # ------------------------------------------------------------------ variants
    def with_dedup(self) -> "SemanticIds":
        """TIGER's extra last level numbering items that share a tuple (0 for unique ones)."""
        table = dedup_position(self.item_codes)
        size = int(table[:, -1].max()) + 1
        return self._replace(table, (*self.codebook_sizes, size), (*self.level_names, "dedup"))

    def select_levels(self, levels: Sequence[int]) -> "SemanticIds":
        """A reordered or reduced table (ablations: reversed order, no CF level)."""
        levels = list(levels)
        return self._replace(self.item_codes[:, levels], tuple(self.codebook_sizes[k] for k in levels),
                             tuple(self.level_names[k] for k in levels))

    def _replace(self, item_codes: np.ndarray, sizes, names) -> "SemanticIds":
        codes = np.concatenate([np.full((1, item_codes.shape[1]), -1, np.int32), item_codes.astype(np.int32)])
        return SemanticIds(codes, tuple(int(s) for s in sizes), tuple(names), self.source)

    # ------------------------------------------------------------------ storage
    def to_artifact(self) -> dict:
        return {"format": FORMAT, "codebook_sizes": list(self.codebook_sizes), "level_names": list(self.level_names),
                "codes": self.item_codes.tolist()}

    @classmethod
    def from_artifact(cls, data: dict, source: str) -> "SemanticIds":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source}: not a {FORMAT} table")
        item_codes = np.asarray(data["codes"], np.int64)
        codes = np.concatenate([np.full((1, item_codes.shape[1]), -1), item_codes]).astype(np.int32)
        return cls(codes, tuple(data["codebook_sizes"]), tuple(data["level_names"]), source)


def read_letter_index(path: Path, item_vocab: np.ndarray) -> SemanticIds:
    """LETTER's `<dataset>.index.json`: key = the data file's item id - 1, value = one
    `<letter_code>` token per level (`<a_183>`, `<b_70>`, ...)."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a LETTER index JSON ({e})") from None
    first = next(iter(index.values()), None)
    if not isinstance(first, list) or not first:
        raise ValueError(f"{path}: expected {{item: [\"<a_1>\", ...]}}")
    n_levels, n_items = len(first), len(item_vocab) - 1
    codes = np.full((n_items + 1, n_levels), -1, np.int64)
    letters = [""] * n_levels
    for i in range(1, n_items + 1):
        token = str(item_vocab[i])
        key = str(int(token) - 1) if token.lstrip("-").isdigit() else token
        if key not in index:
            raise ValueError(f"{path}: no codes for item {token} (key {key!r}); the index was made for other data")
        row = index[key]
        if len(row) != n_levels:
            raise ValueError(f"{path}: item key {key!r} has {len(row)} codes, expected {n_levels}")
        for k, code in enumerate(row):
            match = _LETTER_TOKEN.match(code)
            if match is None:
                raise ValueError(f"{path}: item key {key!r}: {code!r} is not a <letter_number> code token")
            letters[k] = match.group(1)
            codes[i, k] = int(match.group(2))
    sizes = tuple(int(codes[1:, k].max()) + 1 for k in range(n_levels))
    return SemanticIds(codes.astype(np.int32), sizes, tuple(f"letter_{c}" for c in letters), str(path))


def read_code_array(path: Path, n_items: int) -> SemanticIds:
    """An integer `.npy` array [n_items, K] (rows in item-index order) or [n_items + 1, K]."""
    try:
        table = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: not a plain numpy array ({e})") from None
    if table.ndim != 2 or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"{path}: expected an integer array [n_items, levels], got {table.dtype} {table.shape}")
    if table.shape[0] == n_items:
        table = np.concatenate([np.full((1, table.shape[1]), -1, table.dtype), table])
    elif table.shape[0] != n_items + 1:
        raise ValueError(f"{path}: {table.shape[0]} rows, but the data has {n_items} items "
                         f"(expected {n_items} or {n_items + 1} rows)")
    table = table.astype(np.int64)
    table[0] = -1
    sizes = tuple(int(table[1:, k].max()) + 1 for k in range(table.shape[1]))
    return SemanticIds(table.astype(np.int32), sizes, tuple(f"level{k + 1}" for k in range(table.shape[1])),
                       str(path))


def load_semantic_ids_file(path: str | Path, item_vocab: np.ndarray, source: str, key: str) -> SemanticIds:
    """A LETTER index (`.json`) or an integer array (`.npy`), as a `ConfigError` naming `key` on failure."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{source}: {key}: {path} does not exist (a tokenizer run directory, a LETTER "
                          f".index.json or an integer .npy table)")
    try:
        if path.suffix == ".json":
            return read_letter_index(path, item_vocab)
        if path.suffix == ".npy":
            return read_code_array(path, len(item_vocab) - 1)
    except ValueError as e:
        raise ConfigError(f"{source}: {key}: {e}") from None
    raise ConfigError(f"{source}: {key}: {path}: unknown table format (expected .json or .npy)")
