"""Time one jitted SASRec training step (forward + backward + AdamW) and write JSON.

    python scripts/bench_step.py --out bench_step.json            # both settings, fp32
    python scripts/bench_step.py --setting prefix --dtype bfloat16 --rng unsafe_rbg
    python scripts/bench_step.py --smoke                          # tiny sizes, seconds

Settings:
  ce      the full-softmax loss alone, value and gradients for N = 25,600 rows (128 x 200)
          x 3,707 items: plain autodiff vs jaxrec's custom VJP at several chunk sizes,
          with XLA's temporary-memory figure for each.
  full    SASRec.pytorch-style: batch 128 x length 200, H 64, 2 layers, 1 head, inner 64,
          CE over 3,706 items at every position (ML-1M's catalogue).
  prefix  RecBole's: batch 2048 x length 50, H 64, 2 layers, 2 heads, inner 256, dropout
          0.5, CE at the last position only (the last block computes one query).

Batches are random left-padded sequences held on the device, so the figure is the
step alone (no input pipeline).

What makes the CPU step fast (each measured with this script, see the report JSON):
- micro-batches: the step scans over `--micro-batches` slices of the batch and sums
  their gradients (one optimizer update, same loss as the whole batch). Activations of
  a slice stay in cache instead of streaming hundreds of MB through DRAM per layer.
- hash dropout masks (jaxrec.models.layers) instead of jax.random.bernoulli:
  compare with `--dropout-mask jax [--rng unsafe_rbg]`.
- glibc returns buffers over 32 MB to the OS after each use, so XLA re-faults big
  activations every step; `--malloc-tuned` (default on) re-executes the script with
  MALLOC_MMAP_MAX_=0 / MALLOC_TRIM_THRESHOLD_ set (matters mostly without micro-batches).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}

SETTINGS = {
    "full": dict(batch=128, length=200, hidden=64, layers=2, heads=1, inner=64, items=3706, dropout=0.2,
                 last_only=False),
    "prefix": dict(batch=2048, length=50, hidden=64, layers=2, heads=2, inner=256, items=3706, dropout=0.5,
                   last_only=True),
}
SMOKE = dict(batch=16, length=20, items=300)


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=[*SETTINGS, "both", "ce"], default="both")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rng", choices=["threefry2x32", "rbg", "unsafe_rbg"], default="threefry2x32",
                   help="PRNG impl of the dropout key")
    p.add_argument("--dropout-mask", choices=["hash", "jax"], default="hash",
                   help="jaxrec's hash mask, or jax.random.bernoulli (for comparison)")
    p.add_argument("--loss-chunk", type=int, default=0, help="CE rows per block (0: all at once)")
    p.add_argument("--micro-batches", type=int, default=16, help="gradient slices per step (1: whole batch)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-malloc-tuned", dest="malloc_tuned", action="store_false")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    return p.parse_args()


def _machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version()}


def _use_jax_bernoulli():
    """Swap the hash mask for jax.random.bernoulli (comparison only)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jaxrec.models import layers

    def call(self, x, deterministic):
        if deterministic or self.rate == 0.0:
            return x
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)

    layers.Dropout.__call__ = nn.compact(call)


def run_setting(name, cfg, args):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxrec.models.encoder import build_sequence_model
    from jaxrec.models.losses import softmax_cross_entropy

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = build_sequence_model("sasrec", cfg["items"], cfg["length"], hidden=cfg["hidden"], n_layers=cfg["layers"],
                                 n_heads=cfg["heads"], inner=cfg["inner"], dropout=cfg["dropout"], dtype=dtype)
    rs = np.random.RandomState(0)
    B, L = cfg["batch"], cfg["length"]
    seqs = rs.randint(1, cfg["items"] + 1, (B, L + 1))
    n_pad = rs.randint(0, L, B)                       # lengths spread over 1..L
    seqs[np.arange(L + 1)[None, :] <= n_pad[:, None]] = 0
    inputs, targets = jnp.asarray(seqs[:, :-1]), jnp.asarray(seqs[:, 1:])
    if cfg["last_only"]:
        targets = targets[:, -1]
    chunk = args.loss_chunk or None

    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), inputs)["params"])
    tx = optax.adamw(1e-3, b1=0.9, b2=0.98, weight_decay=0.0)
    opt_state = tx.init(params)

    n_micro = args.micro_batches
    if B % n_micro:
        raise ValueError(f"--micro-batches {n_micro} does not divide the batch {B}")

    def summed_loss(p, inp, tgt, rng):
        h = model.apply({"params": p}, inp, deterministic=False, last_only=cfg["last_only"], rngs={"dropout": rng})
        loss, metrics = softmax_cross_entropy(h, p["item_embedding"], tgt, chunk=chunk)
        return loss * metrics["weight"], metrics["weight"]

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def step(p, o, rng):
        # Strided slices (rows i, i + n_micro, ...): under data parallelism every slice
        # spans all devices instead of living on one of them.
        strided = lambda a: jnp.swapaxes(a.reshape((-1, n_micro) + a.shape[1:]), 0, 1)
        slices = (strided(inputs), strided(targets), jax.random.split(rng, n_micro))

        def accumulate(acc, xs):
            (total, weight), grads = grad_fn(p, *xs)
            return jax.tree.map(jnp.add, acc, (total, weight, grads)), None

        zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, p))
        (total, weight, grads), _ = jax.lax.scan(accumulate, zeros, slices)
        grads = jax.tree.map(lambda g: g / weight, grads)    # mean over every target of the batch
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, total / weight

    step = jax.jit(step, donate_argnums=(0, 1))
    base = jax.random.key(1, impl=args.rng)
    t0 = time.perf_counter()
    compiled = step.lower(params, opt_state, base).compile()
    compile_s = time.perf_counter() - t0
    params, opt_state, loss = compiled(params, opt_state, base)        # warm-up
    float(loss)
    times, cpu = [], []
    for i in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        params, opt_state, loss = compiled(params, opt_state, jax.random.fold_in(base, i))
        loss = float(loss)                                               # blocks
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    if not np.isfinite(loss):
        raise FloatingPointError(f"{name}: loss became {loss}")
    return {"setting": name, "config": {**cfg, "dtype": args.dtype, "rng": args.rng, "dropout_mask": args.dropout_mask,
                                        "loss_chunk": chunk, "micro_batches": n_micro,
                                        "steps": args.steps},
            "compile_s": round(compile_s, 2), "ms_per_step_median": round(statistics.median(times), 1),
            "ms_per_step_min": round(min(times), 1), "ms_per_step": [round(t, 1) for t in times],
            # CPU time of all threads: robust to other load on a shared machine (~ wall x cores when quiet)
            "cpu_ms_per_step_median": round(statistics.median(cpu), 1),
            "final_loss": round(loss, 4)}


def run_ce(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxrec.models.losses import softmax_cross_entropy

    n, v, d = (SMOKE["batch"] * SMOKE["length"], SMOKE["items"] + 1, 64) if args.smoke else (25600, 3707, 64)
    rs = np.random.RandomState(0)
    h = jnp.asarray(rs.randn(n, d).astype(np.float32) * 0.1)
    table = jnp.asarray(rs.randn(v, d).astype(np.float32) * 0.1)
    targets = jnp.asarray(rs.randint(0, v, n))

    def plain(h, table):
        logp = jax.nn.log_softmax(h @ table[1:].T, axis=-1)
        w = (targets > 0).astype(jnp.float32)
        return -jnp.sum(w * jnp.take_along_axis(logp, jnp.maximum(targets - 1, 0)[:, None], -1)[:, 0]) / w.sum()

    variants = {"plain_autodiff": plain}
    for chunk in (None, 4096, 1024):
        variants[f"custom_vjp_chunk_{chunk}"] = (
            lambda c: lambda h, table: softmax_cross_entropy(h, table, targets, chunk=c)[0])(chunk)
    rows = []
    for name, fn in variants.items():
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(h, table).compile()
        jax.block_until_ready(compiled(h, table))
        times, cpu = [], []
        for _ in range(args.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(h, table))
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        mem = compiled.memory_analysis()
        rows.append({"variant": name, "ms_median": round(statistics.median(times), 1),
                     "cpu_ms_median": round(statistics.median(cpu), 1),
                     "temp_mib": round(mem.temp_size_in_bytes / 2**20, 1) if mem is not None else None})
        print(f"ce {name}: {rows[-1]['ms_median']} ms (cpu {rows[-1]['cpu_ms_median']} ms), "
              f"temp {rows[-1]['temp_mib']} MiB", flush=True)
    return {"setting": "ce", "config": {"rows": n, "items": v - 1, "hidden": d, "steps": args.steps}, "variants": rows}


def main():
    args = _parse()
    if args.malloc_tuned and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **MALLOC_ENV})
    if args.dropout_mask == "jax":
        _use_jax_bernoulli()
    import flax
    import jax
    import optax

    names = list(SETTINGS) if args.setting == "both" else [] if args.setting == "ce" else [args.setting]
    if args.smoke:
        args.steps = min(args.steps, 2)
        args.micro_batches = min(args.micro_batches, 4)
    results = []
    for name in names:
        cfg = dict(SETTINGS[name], **(SMOKE if args.smoke else {}))
        res = run_setting(name, cfg, args)
        print(f"{name}: {res['ms_per_step_median']} ms/step (min {res['ms_per_step_min']}, "
              f"cpu {res['cpu_ms_per_step_median']} ms), compile {res['compile_s']} s, {args.dtype}, rng {args.rng}", flush=True)
        results.append(res)
    if args.setting == "ce":
        results.append(run_ce(args))
    report = {"benchmark": "sasrec_train_step", "machine": _machine(),
              "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
              "env": {k: os.environ.get(k) for k in ["XLA_FLAGS", *MALLOC_ENV]},
              "devices": [str(d) for d in jax.devices()], "smoke": args.smoke, "results": results,
              "reference": "RecBole's SASRec took 2.86 s per prefix batch (2048 x 50) on the 2-core development CPU"}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
