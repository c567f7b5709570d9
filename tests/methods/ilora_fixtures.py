"""Tiny, offline stand-ins for iLoRA's inputs: a LLaRA directory with a planted next-item rule,
a byte-level BPE tokenizer, a random Llama checkpoint (HF layout, written with numpy) and a
SASRec guide trained for a few steps by the seqrec task."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = ["Red", "Blue", "Green", "Cat", "Dog", "Moon", "Star", "Rain", "Fire", "Stone", "River", "Wolf"]
N_ITEMS = 36


def item_names() -> list[str]:
    """36 distinct two-word titles, two of them with a trailing article (cleaned on reading)."""
    names = [f"{WORDS[i % 12]} {WORDS[(i // 12 + 3 + i) % 12]}" for i in range(N_ITEMS)]
    names = list(dict.fromkeys(names))
    k = 0
    while len(names) < N_ITEMS:
        names.append(f"{WORDS[k % 12]} {WORDS[k % 12]} {k}")
        k += 1
    names[5] = "Wolf, The"
    return names


def make_llara_dir(directory: Path, n_train_users: int = 24, seed: int = 0) -> Path:
    """Users walk the items in steps of +1 (mod N) with a random start; rows are LLaRA prefixes."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def walk(length):
        start = int(rng.integers(0, N_ITEMS))
        return [(start + j) % N_ITEMS for j in range(length)]

    train = ["seq\tnext"]
    for _ in range(n_train_users):
        seq = walk(int(rng.integers(6, 14)))
        for t in range(1, len(seq)):
            train.append(" ".join(map(str, seq[max(0, t - 10):t])) + f"\t{seq[t]}")
    for name in ("val", "test"):
        rows = ["seq\tnext"]
        for _ in range(6):
            seq = walk(int(rng.integers(4, 12)))
            rows.append(" ".join(map(str, seq[-11:-1])) + f"\t{seq[-1]}")
        (directory / f"{name}.tsv").write_text("\n".join(rows) + "\n")
    (directory / "train.tsv").write_text("\n".join(train) + "\n")
    (directory / "id2name.txt").write_text("\n".join(f"{i}::{n}" for i, n in enumerate(item_names())) + "\n")
    return directory


def make_tiny_llm(directory: Path, tie: bool = True, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random Llama checkpoint + BPE tokenizer in one HF directory (no torch needed)."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from jaxrec.methods.ilora.prompts import TEMPLATES

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [t for ts in TEMPLATES.values() for t in ts] + [", ".join(item_names()) + "\n"]
    tok.train_from_iterator(corpus * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(directory)
    vocab = tok.get_vocab_size()
    heads, kv_heads, inter = 4, 2, 2 * hidden
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 512,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": tie,
              "bos_token_id": None, "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tie:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (heads * hd, hidden),
                       p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
                       p + "self_attn.v_proj.weight": (kv_heads * hd, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * hd),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter)})
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif "embed_tokens" in name or "lm_head" in name:
            tensors[name] = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def train_guide(llara_dir: Path, run_dir: Path, hidden: int = 16, steps: int = 40) -> Path:
    """A 1-block SASRec trained on the LLaRA train rows (`data.split: llara`)."""
    from jaxrec.config import build_config
    from jaxrec.train.trainer import train

    raw = {"task": "seqrec", "run": {"dir": str(run_dir), "seed": 0},
           "data": {"source": str(llara_dir), "format": "llara", "split": "llara", "max_len": 10,
                    "train_windows": "last"},
           "model": {"backbone": "sasrec", "hidden": hidden, "layers": 1, "heads": 1, "dropout": 0.1, "loss": "ce"},
           "train": {"batch_size": 16, "steps": steps, "lr": 0.01, "warmup_steps": 2, "eval_every": 0,
                     "log_every": 10, "progress": False},
           "eval": {"ks": [1, 5], "batch_size": 16, "metric": "hr@5"},
           "checkpoint": {"every": 0, "keep": 1, "async_save": False}}
    train(build_config(raw, "guide"))
    return run_dir


def guide_config(llara_dir: Path, run_dir: Path, hidden: int = 16) -> dict:
    return {"task": "seqrec", "run": {"dir": str(run_dir), "seed": 0},
            "data": {"source": str(llara_dir), "format": "llara", "split": "llara", "max_len": 10,
                     "train_windows": "last"},
            "model": {"backbone": "sasrec", "hidden": hidden, "layers": 1, "heads": 1, "dropout": 0.1, "loss": "ce"},
            "train": {"batch_size": 16, "steps": 1, "progress": False},
            "eval": {"ks": [1, 5], "batch_size": 16, "metric": "hr@5"},
            "checkpoint": {"every": 0, "keep": 1, "async_save": False}}


def save_untrained_guide(llara_dir: Path, run_dir: Path, hidden: int = 16) -> Path:
    """A seqrec run directory holding one checkpoint of a randomly initialised SASRec: what
    a task's guide upstream reads, without paying for training (unit tests need shapes, not quality)."""
    return save_untrained_run(guide_config(llara_dir, run_dir, hidden), run_dir)


def save_untrained_run(raw: dict, run_dir: Path) -> Path:
    """A run directory with one checkpoint of the config's freshly initialised model."""
    from jaxrec.config import build_config, to_dict
    from jaxrec.train.checkpoint import RunCheckpoints
    from jaxrec.train.session import Session
    from jaxrec.train.state import schedule, with_clipping

    config = build_config({**raw, "run": {**raw.get("run", {}), "dir": str(run_dir)}}, "untrained")
    session = Session(config)
    make_state, _, shardings = session.state_layout(
        with_clipping(session.task.optimizer(schedule(config.train, 1)), config.train.grad_clip))
    state = session.init_state(make_state, shardings)
    ckpts = RunCheckpoints(run_dir, async_save=False)
    ckpts.save(1, state, None, meta={"best_step": 1, "step": 1}, config=to_dict(config),
               vocab=dict(session.task.vocabulary()))
    ckpts.close()
    return run_dir


def ilora_raw_config(llara_dir: Path, llm_dir: Path, guide_dir: Path, run_dir: Path, **model) -> dict:
    return {"task": "ilora", "run": {"dir": str(run_dir), "seed": 0},
            "data": {"source": str(llara_dir), "format": "llara", "num_threads": 1, "prefetch": 2},
            "model": {"base_model": str(llm_dir), "guide": str(guide_dir), "max_length": 256,
                      "max_target_tokens": 12, "max_new_tokens": 6, "report_baselines": [], **model},
            "train": {"batch_size": 8, "steps": 4, "lr": 1e-3, "warmup_steps": 1, "end_lr_ratio": 0.01,
                      "b2": 0.999, "grad_clip": 0.0, "eval_every": 0, "log_every": 2, "progress": False},
            "eval": {"ks": [1, 5], "batch_size": 8, "metric": "hr@1", "seed": 7},
            "checkpoint": {"every": 0, "keep": 1, "async_save": False}}
