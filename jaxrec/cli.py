"""`jaxrec train | evaluate | export | data stats | generate`.

Expected failures (bad config, malformed data, missing checkpoint, NaN loss) print one
line naming the file/key/step and exit with status 2; they never show a traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a run from a YAML config",
                       description="Train a run. Rerunning the same command resumes from its latest checkpoint.")
    p.add_argument("config", nargs="?", help="YAML file in configs/ (default: SASRec on the embedded synthetic data)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=3e-4 mesh.data=4")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint (needs nothing but the run directory)")
    p.add_argument("run_dir", help="run directory (the one holding checkpoints/)")
    p.add_argument("overrides", nargs="*", help="eval.* or mesh.* overrides, e.g. eval.candidates=sampled:100")
    p.add_argument("--step", default="best", help="best | latest | a step number (default: best)")
    p.add_argument("--split", default="test", choices=["valid", "test", "all"])

    p = sub.add_parser("export", help="write a checkpoint's deployable artifacts")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--step", default="best", help="best | latest | a step number (default: best)")

    p = sub.add_parser("data", help="inspect data sets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("stats", help="users / items / interactions / sequence-length percentiles")
    s.add_argument("path", help="a data file or directory, or 'synthetic'")
    s.add_argument("--format", default="auto")

    p = sub.add_parser("generate", help="chat with a Llama-family checkpoint (HF directory or GGUF file)")
    p.add_argument("model", help="a Hugging Face checkpoint directory or a .gguf file ('smollm2' = the packaged one)")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--system", default=None)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxrec.config import ConfigError
    from jaxrec.registry import UnknownTask
    from jaxrec.sharding import MeshError
    from jaxrec.train.checkpoint import CheckpointNotFound
    from jaxrec.train.trainer import NonFiniteLoss
    from jaxrec.weights.errors import CheckpointFormatError, TensorMismatchError, UnsupportedModelError
    errors: list[type[BaseException]] = [ConfigError, UnknownTask, MeshError, CheckpointNotFound, NonFiniteLoss,
                                         FileNotFoundError,
                                         CheckpointFormatError, TensorMismatchError, UnsupportedModelError]
    try:
        from jaxrec.data.readers import DataFormatError
        errors.append(DataFormatError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return _dispatch(args)
    except _user_errors() as e:
        print(f"jaxrec: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("jaxrec: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    if args.command == "train":
        from jaxrec.config import load_config
        from jaxrec.train.distributed import maybe_initialize
        config = load_config(args.config, args.overrides)
        maybe_initialize(config.distributed, config.source)   # before any other JAX call
        from jaxrec.train.trainer import train
        result = train(config)
        print(f"run directory: {result.run_dir} ({result.seconds:.0f} s)")
        return 0
    if args.command == "evaluate":
        from jaxrec.train.runs import evaluate_run
        evaluate_run(args.run_dir, step=args.step, split=args.split, overrides=args.overrides)
        return 0
    if args.command == "export":
        from jaxrec.train.runs import export_run
        for path in export_run(args.run_dir, args.out_dir, step=args.step):
            print(path)
        return 0
    if args.command == "data":
        from jaxrec.data.stats import describe, format_stats
        store = _load_store(args.path, args.format)
        print(format_stats(describe(store)))
        return 0
    if args.command == "generate":
        from jaxrec.chat import chat
        from jaxrec.weights.packaged import resolve_model_path
        print(chat(resolve_model_path(args.model), args.prompt, max_new_tokens=args.max_new_tokens,
                   system=args.system))
        return 0
    raise AssertionError(args.command)


def _load_store(path: str, fmt: str):
    if path == "synthetic":
        from jaxrec.data.synthetic import SyntheticConfig, make_synthetic
        return make_synthetic(SyntheticConfig.default())
    from jaxrec.data.readers import read_interactions
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    return read_interactions(Path(path), format=fmt)


if __name__ == "__main__":
    sys.exit(main())
