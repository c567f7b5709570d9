"""Tokenizers from the same place as the weights, through `transformers.AutoTokenizer`."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from jaxrec.weights.errors import CheckpointNotFoundError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str | Path):
    """The tokenizer of an HF checkpoint directory or of a GGUF file (built from its
    metadata by transformers). Never downloads: only local files are read."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory or GGUF file")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_tokenizer(ggufs[0])
        raise CheckpointNotFoundError(f"{path}: no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@lru_cache(maxsize=8)
def _stop_ids(tokenizer, text: str) -> tuple[int, ...]:
    ids = []
    for token_id in range(len(tokenizer)):
        if text in tokenizer.decode([token_id]):
            ids.append(token_id)
    return tuple(ids)


def token_ids_containing(tokenizer, text: str = "\n") -> tuple[int, ...]:
    """Every token id whose decoded text contains `text` — e.g. all newline-bearing tokens,
    for "stop at the first newline" generation (byte-level BPEs have many: "\\n", ".\\n", …)."""
    return _stop_ids(tokenizer, text)
