"""`jaxrec train | evaluate | export | recommend | serve | data stats | generate`.

Expected failures (bad config, malformed data, missing or damaged checkpoints, NaN loss,
a run directory another training holds, a full disk, a read-only or forbidden path)
print one line naming the file/key/step and exit with status 2; they never show a
traceback. A training stopped by SIGTERM saves a checkpoint and exits with 143 (128 +
SIGTERM, what schedulers expect of a terminated job), so a scheduler can tell it from a
crash (1) and requeue it; Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143
# Errors of the machine rather than of jaxrec: reported as one line naming the path.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                       errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                       errno.EPERM: "operation not permitted"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrec", description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not use JAX's persistent compilation cache (default: on, in "
                             "$JAXREC_COMPILE_CACHE or ~/.cache/jaxrec/xla)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a run from a YAML config",
                       description="Train a run. Rerunning the same command resumes from its latest checkpoint.")
    p.add_argument("config", nargs="?", help="YAML file in configs/ (default: SASRec on the embedded synthetic data)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=3e-4 mesh.data=4")
    p.add_argument("--restart", action="store_true",
                   help="set the run directory's checkpoints aside (moved to set_aside/, not deleted) and start over")
    p.add_argument("--from-step", type=int, default=None, metavar="N",
                   help="resume from checkpoint N; later checkpoints are set aside (e.g. after a divergence)")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint (needs nothing but the run directory)")
    p.add_argument("run_dir", help="run directory (the one holding checkpoints/)")
    p.add_argument("overrides", nargs="*",
                   help="eval.*, mesh.* or data.source overrides, e.g. eval.candidates=sampled:100")
    p.add_argument("--other-data", action="store_true",
                   help="accept a data.source whose interactions differ from the training data's "
                        "(the item vocabulary must still match)")
    p.add_argument("--step", default="best", help="best | latest | a step number (default: best)")
    p.add_argument("--split", default="test", choices=["valid", "test", "all"])

    p = sub.add_parser("export", help="write a checkpoint's deployable artifacts")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--force", action="store_true", help="replace the contents of a non-empty out_dir")
    p.add_argument("--step", default="best", help="best | latest | a step number (default: best)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="scoring exports: how many items the compiled artifact ranks (default 100, at most the "
                        "catalogue); `recommend -k` can ask for up to this many")
    p.add_argument("--platforms", default="cpu,cuda",
                   help="platforms compiled artifacts are serialized for, comma-separated (default: cpu,cuda)")

    _add_recommend_parser(sub)

    p = sub.add_parser("serve", help="answer top-k requests over HTTP from an export (needs jaxrec[serve])",
                       description="POST /recommend, GET /health, GET /manifest; see jaxrec/serve.py.")
    p.add_argument("export_dir", help="a directory written by `jaxrec export`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the address is printed)")
    p.add_argument("--max-batch", type=_positive_int, default=256, metavar="N",
                   help="most histories in one request; larger ones get 413 (default: 256)")

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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _add_recommend_parser(sub) -> None:
    p = sub.add_parser("recommend", help="top-k items for histories of raw item tokens, from an export directory",
                       description="Top-k next items from an export alone (see docs/export.md). One history per "
                                   "argument or input line: tokens separated by spaces or commas, or a JSON list. "
                                   "Prints one JSON line per history: {\"row\", \"items\", \"scores\"}.")
    p.add_argument("export_dir", help="a directory written by `jaxrec export`")
    p.add_argument("histories", nargs="*", help="histories (default: read --file, else stdin)")
    p.add_argument("--file", default=None, help="read histories from this file, one per line ('-' = stdin)")
    p.add_argument("-k", type=int, default=10, help="items per history (default 10)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--exclude-history", dest="exclude_history", action="store_true", default=None,
                       help="never recommend an item of the history (default: the run's eval.exclude_history)")
    group.add_argument("--include-history", dest="exclude_history", action="store_false",
                       help="history items may be recommended again")
    p.add_argument("--skip-unknown", action="store_true",
                   help="drop item tokens the export does not know (reported) instead of refusing the input")
    p.add_argument("--batch-size", type=int, default=256, help="histories scored at once (default 256)")


def _recommend(args) -> int:
    from jaxrec.export.histories import read_histories, recommend_lines
    from jaxrec.export.manifest import ExportError
    from jaxrec.export.recommend import load_recommender
    rec = load_recommender(args.export_dir)
    if args.file not in (None, "-"):
        if not os.path.isfile(args.file):
            raise FileNotFoundError(f"{args.file}: no such file")
        try:
            with open(args.file, encoding="utf-8") as f:
                histories = read_histories(args.histories, f, args.file)
        except UnicodeDecodeError as e:
            raise ExportError(f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    elif args.file == "-" or not args.histories:
        histories = read_histories(args.histories, sys.stdin, "<stdin>")
    else:
        histories = read_histories(args.histories, None, "")
    lines, skipped = recommend_lines(rec, histories, args.k, args.exclude_history, args.batch_size,
                                     args.skip_unknown)
    if skipped:
        shown = "; ".join(f"row {row}: {', '.join(map(repr, tokens))}" for row, tokens in list(skipped.items())[:5])
        more = f" (and {len(skipped) - 5} more rows)" if len(skipped) > 5 else ""
        print(f"jaxrec: warning: skipped unknown item tokens: {shown}{more}", file=sys.stderr)
    for line in lines:
        print(line)
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from jaxrec.config import ConfigError
    from jaxrec.export.manifest import ExportError
    from jaxrec.registry import UnknownTask
    from jaxrec.train.task import ExportUnsupported
    from jaxrec.sharding import MeshError
    from jaxrec.train.checkpoint import CheckpointNotFound
    from jaxrec.train.run_lock import RunDirectoryBusy
    from jaxrec.train.trainer import CheckpointsDamaged, NonFiniteLoss
    from jaxrec.weights.errors import CheckpointFormatError, TensorMismatchError, UnsupportedModelError
    errors: list[type[BaseException]] = [ConfigError, UnknownTask, MeshError, CheckpointNotFound, NonFiniteLoss,
                                         CheckpointsDamaged, RunDirectoryBusy, ExportError, ExportUnsupported,
                                         FileNotFoundError,
                                         CheckpointFormatError, TensorMismatchError, UnsupportedModelError]
    try:
        from jaxrec.data.readers import DataFormatError
        errors.append(DataFormatError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after flags (`train c.yaml --from-step 4 train.lr=1e-3`), which
    # argparse's positional `nargs="*"` does not collect on its own.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "histories") and not any(x.startswith("-") for x in extra):
            args.histories = [*args.histories, *extra]
        elif not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        else:
            args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    enable_compile_cache(None if args.no_compile_cache else compile_cache_dir())
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from jaxrec.train.trainer import Preempted
    try:
        return _dispatch(args)
    except _user_errors() as e:
        print(f"jaxrec: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        # The reader of the output (`| head`) has gone: not an error. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Preempted as e:
        print(f"jaxrec: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except Exception as e:
        cause = environment_error(e)
        if cause is None:
            raise
        print(f"jaxrec: error: {cause}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("jaxrec: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


def compile_cache_dir() -> Path | None:
    """Where compiled XLA programs persist between runs: $JAXREC_COMPILE_CACHE (a directory,
    or "off"), else $XDG_CACHE_HOME/jaxrec/xla, else ~/.cache/jaxrec/xla."""
    from jaxrec.config.cache_dirs import user_cache_dir
    return user_cache_dir("JAXREC_COMPILE_CACHE", "xla")


def enable_compile_cache(directory: Path | None) -> None:
    """Turn on JAX's persistent compilation cache, so rerunning a config (a resume, an
    evaluation, the next epoch's program) loads its programs instead of compiling them.
    Programs that compile in under a second are not worth a file; an unusable directory
    only costs the cache, never the run."""
    if directory is None:
        return
    import jax
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logging.getLogger("jaxrec").warning("compilation cache off: %s (%s)", directory, e.strerror or e)
        return
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def environment_error(error: BaseException) -> str | None:
    """One line for a disk-full / read-only / permission error anywhere in the exception's
    chain (Orbax and Grain wrap the OSError of a failed write in their own errors), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
            path = error.filename or "a file"
            return (f"{path}: {_ENVIRONMENT_ERRNOS[error.errno]}; nothing already written was lost (rerun the same "
                    f"command to resume once it is fixed)")
        text = str(error)
        for code, words in _ENVIRONMENT_ERRNOS.items():
            if os.strerror(code) in text:
                return f"{words} ({text.strip().splitlines()[0][:300]}); rerun the same command once it is fixed"
        error = error.__cause__ or error.__context__
    return None


def _dispatch(args) -> int:
    if args.command == "train":
        from jaxrec.config import load_config
        from jaxrec.train.distributed import maybe_initialize
        config = load_config(args.config, args.overrides)
        maybe_initialize(config.distributed, config.source)   # before any other JAX call
        from jaxrec.train.trainer import train
        result = train(config, restart=args.restart, from_step=args.from_step)
        print(f"run directory: {result.run_dir} ({result.seconds:.0f} s)")
        return 0
    if args.command == "evaluate":
        from jaxrec.train.runs import evaluate_run
        evaluate_run(args.run_dir, step=args.step, split=args.split, overrides=args.overrides,
                     other_data=args.other_data)
        return 0
    if args.command == "export":
        from jaxrec.train.runs import export_run
        from jaxrec.train.task import ExportOptions
        options = ExportOptions(top_k=args.top_k, platforms=tuple(p for p in args.platforms.split(",") if p))
        for path in export_run(args.run_dir, args.out_dir, step=args.step, force=args.force, options=options):
            print(path)
        return 0
    if args.command == "recommend":
        return _recommend(args)
    if args.command == "serve":
        return _serve(args)
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


def _serve(args) -> int:
    try:
        from jaxrec import serve
    except ImportError as e:
        if e.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        print(f"jaxrec: error: jaxrec serve needs FastAPI and uvicorn ({e.name} is not installed): "
              f"pip install 'jaxrec[serve]'", file=sys.stderr)
        return EXIT_USER_ERROR
    from jaxrec.export.recommend import load_recommender
    try:
        sock = serve.bind(args.host, args.port)      # before the (slower) load: a taken port fails at once
    except OSError as e:
        print(f"jaxrec: error: {e.strerror}", file=sys.stderr)
        return EXIT_USER_ERROR
    with sock:
        recommender = load_recommender(args.export_dir)
        serve.warm_up(recommender)
        host, port = sock.getsockname()[:2]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        print(f"serving {args.export_dir} ({recommender.manifest.get('task')}, {len(recommender.items) - 1} items) "
              f"on http://{address} (max batch {args.max_batch})", flush=True)
        try:
            serve.serve(recommender, sock, max_batch=args.max_batch)
        except KeyboardInterrupt:    # uvicorn re-raises Ctrl-C after its clean shutdown: nothing to resume
            return 130
    return 0


def _load_store(path: str, fmt: str):
    if path == "synthetic":
        if fmt != "auto":
            from jaxrec.config import ConfigError
            raise ConfigError(f"--format {fmt}: the embedded synthetic data is not read from a file; drop --format")
        from jaxrec.data.synthetic import SyntheticConfig, make_synthetic
        return make_synthetic(SyntheticConfig.default())
    from jaxrec.data.readers import read_interactions
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    return read_interactions(Path(path), format=fmt)


if __name__ == "__main__":
    sys.exit(main())
