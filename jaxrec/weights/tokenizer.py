"""Tokenizers from the same place as the weights, through `transformers.AutoTokenizer`.

A GGUF file's tokenizer is built by transformers from the file's metadata, which it reads
with gguf's reader (a Python object per vocabulary entry: ~10 s for SmolLM2's 49k tokens).
The built tokenizer is saved once under a user cache directory keyed by the file's path,
size, modification time and the transformers version; later loads read that (under a second).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from jaxrec.config.cache_dirs import user_cache_dir
from jaxrec.weights.errors import CheckpointNotFoundError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_COMPLETE = "complete"          # written last: a directory without it is a crashed write

log = logging.getLogger(__name__)


def tokenizer_cache_dir() -> Path | None:
    """Where tokenizers built from GGUF metadata are kept: $JAXREC_TOKENIZER_CACHE (a directory,
    or "off"), else $XDG_CACHE_HOME/jaxrec/tokenizers, else ~/.cache/jaxrec/tokenizers."""
    return user_cache_dir("JAXREC_TOKENIZER_CACHE", "tokenizers")


def _gguf_tokenizer(path: Path):
    import transformers
    from transformers import AutoTokenizer

    root = tokenizer_cache_dir()
    stat = path.stat()
    # Another transformers may build another tokenizer from the same metadata: its own entry.
    source = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{transformers.__version__}"
    key = hashlib.sha256(source.encode()).hexdigest()[:32]
    entry = None if root is None else root / key
    if entry is not None and (entry / _COMPLETE).is_file():
        try:
            return AutoTokenizer.from_pretrained(str(entry), local_files_only=True)
        except Exception as e:  # a damaged entry is rebuilt, never trusted
            log.warning("tokenizer cache %s is unreadable (%s); rebuilding it from %s", entry, e, path)
            shutil.rmtree(entry, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if entry is not None:
        _save_entry(tokenizer, root, entry, path)
    return tokenizer


def _save_entry(tokenizer, root: Path, entry: Path, source: Path) -> None:
    staging = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=root))
        tokenizer.save_pretrained(str(staging))
        (staging / _COMPLETE).write_text(f"{source.resolve()}\n", encoding="utf-8")
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(staging, entry)          # whole entries only: a reader never sees half of one
    except OSError as e:                    # a read-only or full cache only costs speed
        log.info("could not cache the tokenizer of %s under %s (%s)", source, root, e.strerror or e)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def load_tokenizer(path: str | Path):
    """The tokenizer of an HF checkpoint directory or of a GGUF file (built from its
    metadata by transformers). Never downloads: only local files are read."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_tokenizer(path)
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
