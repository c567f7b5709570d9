"""One text embedding per item and level: the semantic inputs of the CoFiRec/TIGER tokenizer.

    levels = beauty_text_levels(store, "…/item_text.json")           # jaxrec.data.item_text
    emb = item_level_embeddings(levels, "smollm2", cache_dir="…")     # or a .npy/.safetensors file
    emb.array                                                          # float32 [n_items+1, L, d], row 0 zeros

Embedding: the mean of the final-normed last hidden states over a text's real tokens
(`jaxrec.models.llama.forward(..., return_hidden=True)` + `mean_pool`), as LETTER does with
LLaMA, from any Llama-family checkpoint jaxrec loads (default: the packaged SmolLM2-135M).
Every text is embedded on its own: identical texts are embedded once, texts are sorted by
token count and right-padded to one of a few bucket lengths, and the batch of each bucket
has a fixed number of rows, so jit compiles one program per bucket. Padding is invisible
(masked keys, positions from the mask), so batching changes results only at float32
round-off level. Texts longer than `max_tokens` tokens are truncated (and counted in the log).

Cache: with `cache_dir`, the array is stored as a safetensors file named and tagged by
(1) the SHA-256 of the checkpoint's weight files (`jaxrec.weights.fingerprint.checkpoint_sha256`)
plus its tokenizer files, and (2) the SHA-256 of the level names, every item's texts in item
order and the settings that change the numbers (pooling, max_tokens, add_special_tokens,
dtype). Batching settings are not in the key. A rerun with the same inputs reads the file
and never loads the model. Files are written to a temporary name and renamed, so an
interrupted run leaves no partial cache file.

User-supplied arrays (`load_level_embeddings`): `.npy` (read without pickles) or `.safetensors`
(tensor "embeddings"), float, shape [n_items, L, d] or [n_items+1, L, d] (row 0 is padding
and is set to zeros), finite.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.data.item_text import ItemTextLevels

log = logging.getLogger(__name__)

__all__ = ["EmbeddingSettings", "LevelEmbeddings", "item_level_embeddings", "embed_text_levels", "embed_texts",
           "load_level_embeddings", "load_llm", "batch_plan", "cache_file_name", "model_sha256", "inputs_sha256"]

CACHE_FORMAT = "jaxrec.text_embeddings/1"
ARRAY_KEY = "embeddings"
USER_ARRAY_SUFFIXES = (".npy", ".safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "added_tokens.json")


@dataclasses.dataclass(frozen=True)
class EmbeddingSettings:
    max_tokens: int = 256               # longer texts are truncated (Beauty's longest title is ~200 tokens)
    batch_tokens: int = 8192            # rows per batch = batch_tokens // bucket length
    buckets: tuple[int, ...] | None = None   # padded lengths; None: 16, 32, 64, … up to max_tokens
    add_special_tokens: bool = True     # whatever the tokenizer adds (SmolLM2: nothing; Llama: BOS)
    dtype: str = "float32"              # compute dtype of the LLM

    def bucket_lengths(self) -> tuple[int, ...]:
        if self.buckets is not None:
            lengths = tuple(sorted(set(int(b) for b in self.buckets)))
            if not lengths or lengths[0] < 1 or lengths[-1] < self.max_tokens:
                raise ValueError(f"EmbeddingSettings: buckets {self.buckets} must be positive and reach "
                                 f"max_tokens={self.max_tokens}")
            return lengths
        lengths, b = [], 16
        while b < self.max_tokens:
            lengths.append(b)
            b *= 2
        return (*lengths, self.max_tokens)

    def key_settings(self) -> dict:
        """The settings that change the embeddings (part of the cache key)."""
        return {"pooling": "mean", "max_tokens": self.max_tokens, "add_special_tokens": self.add_special_tokens,
                "dtype": self.dtype}


@dataclasses.dataclass(frozen=True, eq=False)
class LevelEmbeddings:
    """array: float32 [n_items+1, L, d] (row 0 zeros); sha256: of the array's bytes;
    source: the model (name + checkpoint hash) or the user file it came from."""
    array: np.ndarray
    level_names: tuple[str, ...]
    source: str
    sha256: str
    cache_path: Path | None = None
    from_cache: bool = False

    @classmethod
    def of(cls, array: np.ndarray, level_names: Sequence[str], source: str, **kw) -> "LevelEmbeddings":
        array = np.ascontiguousarray(array, dtype=np.float32)
        return cls(array, tuple(level_names), source, hashlib.sha256(array.tobytes()).hexdigest(), **kw)


# --- the LLM ---------------------------------------------------------------------------------
def load_llm(path: str | Path, dtype: str = "float32") -> tuple[Any, Any, Any]:
    """(Llama module, params, tokenizer) of a checkpoint directory or GGUF file."""
    from jaxrec.models.llama import Llama
    from jaxrec.weights import load_pretrained, load_tokenizer

    config, params = load_pretrained(path, dtype=dtype)
    return Llama(config), params, load_tokenizer(path)


@functools.partial(jax.jit, static_argnames=("model",))
def _pooled_hidden(model, params, input_ids, attention_mask):
    from jaxrec.models.llama import mean_pool

    # logit_index keeps the LM head to one position: the vocabulary-sized logits of every
    # token are not needed here.
    out = model.apply({"params": params}, input_ids, attention_mask, return_hidden=True,
                      logit_index=jnp.zeros(input_ids.shape[:1], jnp.int32))
    return mean_pool(out.hidden.astype(jnp.float32), attention_mask)


def batch_plan(lengths: Sequence[int], settings: EmbeddingSettings) -> list[tuple[int, int, np.ndarray]]:
    """[(bucket length, rows per batch, text indices)] per batch: texts sorted by length,
    each batch's texts fit its bucket, and every batch of a bucket has the same row count
    (batch_tokens // bucket, or the next power of two above the bucket's text count)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    buckets = np.asarray(settings.bucket_lengths())
    order = np.argsort(lengths, kind="stable")
    bucket_of = buckets[np.searchsorted(buckets, np.minimum(lengths[order], settings.max_tokens))]
    plan = []
    for bucket in np.unique(bucket_of):
        members = order[bucket_of == bucket]
        # A bucket with few texts gets a smaller batch (a power of two, so still few shapes).
        rows = min(max(1, settings.batch_tokens // int(bucket)), 1 << int(members.size - 1).bit_length())
        plan.extend((int(bucket), rows, members[i:i + rows]) for i in range(0, members.size, rows))
    return plan


def embed_texts(texts: Sequence[str], model, params, tokenizer, settings: EmbeddingSettings | None = None,
                progress: bool = True) -> np.ndarray:
    """float32 [len(texts), d]: the mean-pooled last hidden state of each text, alone."""
    from tqdm.auto import tqdm

    settings = settings or EmbeddingSettings()
    texts = [str(t) for t in texts]
    d = model.config.hidden_size
    if not texts:
        return np.zeros((0, d), np.float32)
    token_ids = tokenizer(texts, add_special_tokens=settings.add_special_tokens)["input_ids"]
    lengths = np.array([len(ids) for ids in token_ids])
    if (lengths == 0).any():
        k = int(np.flatnonzero(lengths == 0)[0])
        raise ValueError(f"text {k} ({texts[k]!r}) has no tokens; give every item a non-empty text")
    truncated = int((lengths > settings.max_tokens).sum())
    if truncated:
        log.info("%d of %d texts are longer than %d tokens and were truncated", truncated, len(texts),
                 settings.max_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = np.zeros((len(texts), d), np.float32)
    with tqdm(total=len(texts), desc="text embeddings", unit="text", disable=not progress) as bar:
        for bucket, rows, members in batch_plan(lengths, settings):
            ids = np.full((rows, bucket), pad_id, np.int32)
            mask = np.zeros((rows, bucket), np.int32)
            mask[members.size:, 0] = 1          # filler rows: one visible token, results dropped
            for r, k in enumerate(members):
                n = min(int(lengths[k]), settings.max_tokens)
                ids[r, :n] = token_ids[k][:n]
                mask[r, :n] = 1
            pooled = _pooled_hidden(model, params, jnp.asarray(ids), jnp.asarray(mask))
            out[members] = np.asarray(pooled)[:members.size]
            bar.update(members.size)
    return out


# --- cached per-item, per-level embeddings ---------------------------------------------------
def _sha256_files(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        digest.update(f.read_bytes())
    return digest.hexdigest()


def _tokenizer_files(path: Path) -> list[Path]:
    """Tokenizer files beside an HF checkpoint (a GGUF file carries its tokenizer inside)."""
    return [path / name for name in _TOKENIZER_FILES if path.is_dir() and (path / name).is_file()]


@functools.lru_cache(maxsize=8)
def _model_sha256(path: str, stat_signature: tuple) -> str:
    from jaxrec.weights.fingerprint import checkpoint_sha256

    tokenizer = _sha256_files(_tokenizer_files(Path(path)))
    return hashlib.sha256(f"{checkpoint_sha256(path)}:{tokenizer}".encode()).hexdigest()


def model_sha256(path: str | Path) -> str:
    """SHA-256 of a checkpoint's weight files and tokenizer files (memoised per file state)."""
    from jaxrec.weights.fingerprint import checkpoint_files

    path = Path(path)
    files = [*checkpoint_files(path), *_tokenizer_files(path)]
    signature = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _model_sha256(str(path), signature)


def inputs_sha256(levels: ItemTextLevels, settings: EmbeddingSettings) -> str:
    """SHA-256 of the level names, every item's texts in item order and the key settings."""
    digest = hashlib.sha256(json.dumps({"levels": list(levels.names), "settings": settings.key_settings()},
                                       sort_keys=True).encode())
    for row in levels.rows():
        digest.update(b"\x1e" + "\x1f".join(row).encode())
    return digest.hexdigest()


def cache_file_name(model_hash: str, inputs_hash: str) -> str:
    return f"text-embeddings-{model_hash[:16]}-{inputs_hash[:16]}.safetensors"


def embed_text_levels(levels: ItemTextLevels, model: str | Path = "smollm2", *,
                      cache_dir: str | Path | None = None, settings: EmbeddingSettings | None = None,
                      loader: Callable[[Path, str], tuple[Any, Any, Any]] = load_llm,
                      progress: bool = True) -> LevelEmbeddings:
    """float32 [n_items+1, L, d] LLM embeddings of every item's text at every level.

    model: a packaged model name ("smollm2"), an HF checkpoint directory or a GGUF file.
    cache_dir: where to keep (and look for) the result; None disables caching.
    loader: (path, dtype) → (Llama module, params, tokenizer); tests pass a counting one.
    """
    from jaxrec.weights.packaged import resolve_model_path

    settings = settings or EmbeddingSettings()
    path = resolve_model_path(model)
    model_hash, inputs_hash = model_sha256(path), inputs_sha256(levels, settings)
    source = f"{path.name} (sha256 {model_hash[:16]})"
    metadata = {"format": CACHE_FORMAT, "model": path.name, "model_sha256": model_hash,
                "inputs_sha256": inputs_hash, "levels": json.dumps(list(levels.names)),
                "settings": json.dumps(settings.key_settings(), sort_keys=True), "n_items": str(levels.n_items)}
    cache_path = None if cache_dir is None else Path(cache_dir) / cache_file_name(model_hash, inputs_hash)
    if cache_path is not None and cache_path.is_file():
        cached = _read_cache(cache_path, metadata, levels)
        if cached is not None:
            return LevelEmbeddings.of(cached, levels.names, source, cache_path=cache_path, from_cache=True)

    flat = levels.texts[1:].reshape(-1)
    unique, inverse = np.unique(flat, return_inverse=True)
    llm, params, tokenizer = loader(path, settings.dtype)
    vectors = embed_texts([str(t) for t in unique], llm, params, tokenizer, settings, progress)
    array = np.zeros((levels.n_items + 1, levels.n_levels, vectors.shape[1]), np.float32)
    array[1:] = vectors[inverse.reshape(-1)].reshape(levels.n_items, levels.n_levels, -1)
    if not np.isfinite(array).all():
        raise FloatingPointError(f"{source}: non-finite text embeddings (dtype {settings.dtype})")
    if cache_path is not None:
        _atomic_save(cache_path, array, metadata)
    return LevelEmbeddings.of(array, levels.names, source, cache_path=cache_path)


def _read_cache(path: Path, metadata: dict, levels: ItemTextLevels) -> np.ndarray | None:
    """The cached array if the file is intact and was made from exactly these inputs."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            stored = f.metadata() or {}
            array = f.get_tensor(ARRAY_KEY)
    except Exception as e:   # noqa: BLE001  (any unreadable file is recomputed, not fatal)
        log.warning("%s: unreadable text-embedding cache (%s); recomputing", path, e)
        return None
    same = all(stored.get(k) == metadata[k] for k in ("format", "model_sha256", "inputs_sha256"))
    shape_ok = array.dtype == np.float32 and array.shape[:2] == (levels.n_items + 1, levels.n_levels)
    if not (same and shape_ok and np.isfinite(array).all()):
        log.warning("%s: text-embedding cache does not match its inputs; recomputing", path)
        return None
    return array


def _atomic_save(path: Path, array: np.ndarray, metadata: dict) -> None:
    """Write to a temporary file in the same directory, flush it to disk, then rename."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({ARRAY_KEY: array}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- user-supplied arrays --------------------------------------------------------------------
def load_level_embeddings(path: str | Path, n_items: int, level_names: Sequence[str]) -> LevelEmbeddings:
    """A user's [n_items(+1), L, d] float array from .npy or .safetensors (key "embeddings")."""
    path = Path(path)
    L = len(level_names)
    expected = f"expected a float array [{n_items}, {L}, d] or [{n_items + 1}, {L}, d] (row 0 = padding)"
    if path.suffix not in USER_ARRAY_SUFFIXES:
        raise ValueError(f"{path}: item embeddings must be a .npy or .safetensors file; {expected}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            from safetensors.numpy import load_file
            tensors = load_file(str(path))
            if ARRAY_KEY not in tensors:
                raise ValueError(f"no tensor {ARRAY_KEY!r} (found: {', '.join(sorted(tensors)) or 'none'})")
            array = tensors[ARRAY_KEY]
    except ValueError as e:
        raise ValueError(f"{path}: unreadable ({_one_line(e)}); {expected}") from None
    except Exception as e:   # noqa: BLE001  (safetensors raises its own error types)
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {_one_line(e)}); {expected}") from None
    if array.dtype.kind != "f" or array.ndim != 3 or array.shape[1] != L or array.shape[0] not in (n_items,
                                                                                                  n_items + 1):
        raise ValueError(f"{path}: got shape {list(array.shape)} dtype {array.dtype}; {expected}")
    with np.errstate(over="ignore"):       # float64 beyond float32's range becomes inf, reported next
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0].tolist()
        raise ValueError(f"{path}: non-finite value at index {bad} (as float32); {expected} with finite values")
    if array.shape[0] == n_items:
        array = np.concatenate([np.zeros((1, *array.shape[1:]), np.float32), array])
    else:
        array[0] = 0.0
    return LevelEmbeddings.of(array, level_names, f"file:{path.name}")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def item_level_embeddings(levels: ItemTextLevels, source: str | Path = "smollm2", **options) -> LevelEmbeddings:
    """From a user file (`.npy`/`.safetensors`) or an LLM (anything else: a packaged model
    name, a checkpoint directory or a GGUF file); `options` go to `embed_text_levels`."""
    if Path(source).suffix in USER_ARRAY_SUFFIXES:
        if options:
            raise TypeError(f"options {sorted(options)} apply to LLM embeddings, not to a user file ({source})")
        return load_level_embeddings(source, levels.n_items, levels.names)
    return embed_text_levels(levels, source, **options)
