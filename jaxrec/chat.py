"""One-call chat with a local checkpoint (HF directory or GGUF file), greedy decoding.

    from jaxrec.chat import chat
    print(chat("path/to/SmolLM2-135M-Instruct.Q4_1.gguf", "What is the capital of France?"))

The loaded model is kept (one at a time) so repeated questions do not reload it, and
prompts are left-padded to a multiple of 64 tokens so most questions reuse one compiled
decoding program.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxrec.models.generate import greedy_generate
from jaxrec.models.llama import Llama

PROMPT_BUCKET = 64


@functools.lru_cache(maxsize=1)
def load_chat_model(model_path: str, dtype: str = "float32"):
    """(model, params, tokenizer) for a checkpoint directory or GGUF file, cached."""
    from jaxrec.weights import load_pretrained, load_tokenizer

    config, params = load_pretrained(model_path, dtype=dtype)
    return Llama(config), params, load_tokenizer(model_path)


def encode_chat(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn conversation, through the tokenizer's chat template if it has one."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):          # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = f"{system}\n\n{prompt}" if system else prompt
    return list(tokenizer(text)["input_ids"])


def stop_ids(config, tokenizer) -> tuple[int, ...]:
    ids = set(config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def chat(model_path: str | Path, prompt: str, max_new_tokens: int = 128, system: str | None = None,
         *, dtype: str = "float32") -> str:
    """The model's greedy answer to `prompt` (special tokens removed, whitespace stripped)."""
    model, params, tokenizer = load_chat_model(str(model_path), dtype)
    ids = encode_chat(tokenizer, prompt, system)
    width = -(-len(ids) // PROMPT_BUCKET) * PROMPT_BUCKET
    pad = model.config.pad_token_id or 0
    padded = np.full((1, width), pad, np.int32)
    mask = np.zeros((1, width), np.int32)
    padded[0, width - len(ids):], mask[0, width - len(ids):] = ids, 1
    out = greedy_generate(model, params, jnp.asarray(padded), jnp.asarray(mask), max_new_tokens=max_new_tokens,
                          stop_token_ids=stop_ids(model.config, tokenizer), pad_token_id=pad)
    tokens = np.asarray(out.tokens[0, :int(out.lengths[0])])
    return tokenizer.decode(tokens.tolist(), skip_special_tokens=True).strip()
