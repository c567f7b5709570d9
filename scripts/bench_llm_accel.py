"""LoRA training of a 1B-class Llama on one accelerator: tokens/s and MFU, jaxrec vs transformers + peft; writes JSON.

    python scripts/bench_llm_accel.py                                   # GPU: Llama-3.2-1B shapes, seq 2048, bf16
    python scripts/bench_llm_accel.py --batch 16 --mesh 1,-1 --steps 10
    python scripts/bench_llm_accel.py --preset tiny --seq 64 --batch 4  # runs anywhere in seconds (the tests do)

Random weights at real shapes (no download; throughput does not depend on the values).
jaxrec: bfloat16 frozen base and compute, float32 LoRA adapters and AdamW state, remat per
layer, the batch split over a data x fsdp mesh of the visible devices (`--mesh DATA,FSDP`,
-1 = the rest). transformers + peft: the same config and adapters, bfloat16 base, gradient
checkpointing, torch.optim.AdamW over the adapters.

Both sides train LoRA rank 16 (alpha 32) on all seven projections with the causal-LM loss
over the whole sequence. Each figure is the fastest of `--steps` timed steps after a warm-up
step (compile time is reported on its own). MFU = model FLOPs per second / the device's
peak (`--peak-tflops`, else a table of known accelerators, else a matmul measured in this
run). Model FLOPs per token count what LoRA training must do, not what remat recomputes:
forward 2·N_matmul + causal attention 2·s·d_attn per layer, the same again for the
activation gradients (the frozen base needs no weight gradients), and 3x the adapters'
own forward FLOPs.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llm import (  # noqa: E402  (one definition of the timed step and its FLOP count)
    PROJECTIONS, lora_train_step, measured_peak_tflops, model_flops_per_token, seconds_of)

PRESETS = {
    # Llama-3.2-1B's shapes (tied embeddings, grouped-query attention).
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                     num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=True),
}

# Dense bfloat16 peak, TFLOP/s, by device kind substring (vendor data sheets, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0,
                    "TPU v5 lite": 197.0, "TPU v5": 459.0, "TPU v4": 275.0}


def peak_tflops(args) -> tuple[float, str]:
    import jax
    if args.peak_tflops:
        return args.peak_tflops, "given"
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name.lower() in kind.lower() and args.dtype == "bfloat16":
            return tflops, f"data sheet ({kind})"
    return measured_peak_tflops(args.dtype) * jax.device_count(), f"measured {args.dtype} matmul ({kind})"


# ---------------------------------------------------------------------------------------
def bench_jaxrec(args, shape: dict, ids: np.ndarray) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from jaxrec.models.llama import Llama, LlamaConfig, param_shardings
    from jaxrec.models.lora import LoraConfig, split_trainable
    from jaxrec.sharding import Layout

    data, fsdp = (int(x) for x in args.mesh.split(","))
    layout = Layout.build((data, fsdp, 1))
    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets="|".join(PROJECTIONS))
    config = LlamaConfig(**shape, max_position_embeddings=max(args.seq, 2048), dtype=args.dtype,
                         param_dtype=args.dtype, lora=lora, remat=not args.no_remat)
    model = Llama(config)
    with layout.activate():
        shardings = param_shardings(model, layout)
        params = jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]),
                         out_shardings=shardings)(jax.random.key(0))
        trainable, frozen = split_trainable(params)
        tx = optax.adamw(1e-4)
        opt_state = tx.init(trainable)
        train_step = lora_train_step(model, tx)

        batch = jax.device_put(ids, layout.batch(ids.shape))
        state = {"trainable": trainable, "opt": opt_state}

        def step():
            state["trainable"], state["opt"], loss = train_step(state["trainable"], state["opt"], frozen, batch)
            return float(loss)

        compile_s = seconds_of(step)
        times = [seconds_of(step) for _ in range(args.steps)]
    loss = step()
    if not np.isfinite(loss):
        raise SystemExit(f"jaxrec: the loss is {loss} (a broken run, not a benchmark)")
    return {"compile_and_first_step_s": compile_s, "step_s": min(times),
            "mesh": dict(layout.mesh.shape), "final_loss": loss}


def bench_torch(args, shape: dict, ids: np.ndarray) -> dict:
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    hf = HFLlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                       intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                       num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                       head_dim=shape["head_dim"], rope_theta=shape["rope_theta"],
                       tie_word_embeddings=shape["tie_word_embeddings"], max_position_embeddings=max(args.seq, 2048))
    model = LlamaForCausalLM(hf).to(device=device, dtype=dtype)
    if not args.no_remat:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, PeftLoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                 target_modules=list(PROJECTIONS)))
    for p in model.parameters():                 # float32 adapters, as on the jaxrec side
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.as_tensor(ids, dtype=torch.long, device=device)
    model.train()

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    first_s = seconds_of(step)
    times = [seconds_of(step) for _ in range(args.steps)]
    return {"first_step_s": first_s, "step_s": min(times), "device": device, "final_loss": step()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up; the fastest counts")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--mesh", default="1,-1", help="DATA,FSDP sizes over the visible devices (-1 = the rest)")
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU (default: known "
                    "accelerators' data sheet, else measured)")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers + peft side")
    ap.add_argument("--out", default="results/bench_llm_accel.json")
    args = ap.parse_args(argv)

    import jax

    from jaxrec.bench import machine_info, peak_rss_mib, write_json

    shape = PRESETS[args.preset]
    ids = np.random.default_rng(0).integers(0, shape["vocab_size"], (args.batch, args.seq)).astype(np.int32)
    tokens = args.batch * args.seq
    flops_per_step = model_flops_per_token(shape, args.seq, args.rank) * tokens
    peak, peak_source = peak_tflops(args)
    results = {"jaxrec": bench_jaxrec(args, shape, ids)}
    if not args.no_torch and importlib.util.find_spec("peft") is not None:
        results["torch_peft"] = bench_torch(args, shape, ids)
    for row in results.values():
        row["tokens_per_s"] = tokens / row["step_s"]
        row["model_tflops_per_s"] = flops_per_step / row["step_s"] / 1e12
        row["mfu"] = row["model_tflops_per_s"] / peak
    if "torch_peft" in results:
        results["ratio_jaxrec_over_torch"] = results["jaxrec"]["tokens_per_s"] / results["torch_peft"]["tokens_per_s"]
    print({k: ({m: round(v, 4) for m, v in r.items() if isinstance(v, float)} if isinstance(r, dict) else round(r, 3))
           for k, r in results.items()}, flush=True)
    payload = {"benchmark": "llm_lora_accelerator", "machine": machine_info(), "jax_backend": jax.default_backend(),
               "devices": [d.device_kind for d in jax.devices()],
               "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "shape": shape},
               "model_flops_per_step": flops_per_step, "peak_tflops": peak, "peak_source": peak_source,
               "results": results, "peak_rss_mib": round(peak_rss_mib(), 1)}
    print("wrote", write_json(args.out, payload))
    return payload


if __name__ == "__main__":
    main()
