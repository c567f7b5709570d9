"""Typed, frozen configuration: YAML files plus `a.b=value` overrides.

A config file is a mapping of sections (`data`, `model`, `train`, ...). The `model`
section's schema belongs to the task named by `task` (each task registers its own
dataclass), so one loader validates every method's configs. Every problem is reported
as one line naming the source (file or command line) and the dotted key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the source and the key."""


def config_error(source: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


# --------------------------------------------------------------------------- schema
# The defaults are the embedded-data main job: `jaxrec train` with no file equals
# `jaxrec train configs/sasrec_synthetic.yaml` (a test keeps the two in step).

@dataclass(frozen=True)
class RunConfig:
    name: str = "sasrec_synthetic"
    dir: str = "runs/{name}"       # `{name}` is replaced by `name`
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"      # "synthetic" or a path (file or directory)
    format: str = "auto"           # reader: auto | pairs | sequences | movielens | recbole | llara
    synthetic: str = "default"     # preset of the embedded generator: default | tiny
    synthetic_options: dict = field(default_factory=dict)   # SyntheticConfig fields to change, e.g. {n_users: 500}
    split: Literal["leave_one_out", "gap", "temporal", "llara"] = "leave_one_out"   # llara: the directory's own rows
    min_length: int = 3            # leave-one-out: shorter users are train-only
    lapse: int = 30                # gap protocol: events between the no-gap and the gap target
    valid_start: float = 0.0       # temporal split cut points (absolute timestamps)
    test_start: float = 0.0
    max_len: int = 50
    train_windows: Literal["last", "chunks", "prefix"] = "chunks"
    num_threads: int = 2           # Grain read threads
    prefetch: int = 8              # Grain prefetch buffer (batches)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128          # global batch (all processes)
    microbatches: int = 1          # gradient accumulation: the batch is processed in this many slices
    epochs: float = 40.0           # used when steps == 0
    steps: int = 0
    lr: float = 5e-3
    warmup_steps: int = 50
    end_lr_ratio: float = 0.1      # cosine decays to lr * end_lr_ratio
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.98
    grad_clip: float = 1.0         # global-norm clipping; 0 disables
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    log_every: int = 50
    eval_every: int = 200          # steps; 0 = only at the end
    patience: int = 0              # evaluations without improvement before stopping; 0 = never stop early
    progress: bool = True


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (5, 10, 20)
    candidates: str = "full"       # "full" or "sampled:N" (N seeded negatives)
    exclude_history: bool = False
    metric: str = "ndcg@10"        # selects the best checkpoint and drives early stopping
    batch_size: int = 256
    item_chunk: int = 4096
    seed: int = 1234               # sampled negatives
    track_test: bool = False       # also log test metrics at every evaluation (learning curves; never used to select)


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, Any], ...] = ()   # empty = jaxrec.train.mesh.DEFAULT_RULES


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 200               # steps; 0 = only at evaluations and the end
    keep: int = 2                  # most recent checkpoints kept (plus the best one)
    keep_best: bool = True
    async_save: bool = True
    resume: bool = True            # rerunning the same command continues from the latest checkpoint


@dataclass(frozen=True)
class DistributedConfig:
    initialize: Literal["auto", "yes", "no"] = "auto"   # auto: when the environment describes a cluster
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1


@dataclass(frozen=True)
class Config:
    task: str = "seqrec"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = None              # the task's own dataclass
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    source: str = field(default="defaults", compare=False)   # where it was read from, for error messages

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir.replace("{name}", self.run.name))


# --------------------------------------------------------------------------- conversion

def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _coerce(value: Any, tp: Any, source: str, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, source, key)
            except ConfigError as e:
                errors.append(str(e))
        raise config_error(source, key, f"{_describe(value)} matches none of {tp}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise config_error(source, key, f"{_describe(value)} is not one of {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, key)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise config_error(source, key, f"expected a list, got {_describe(value)}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise config_error(source, key, f"expected {len(args)} entries, got {len(value)}")
        return tuple(_coerce(v, a, source, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise config_error(source, key, f"expected a mapping, got {_describe(value)}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise config_error(source, key, f"expected true/false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise config_error(source, key, f"expected an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):   # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise config_error(source, key, f"expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise config_error(source, key, f"expected a string, got {_describe(value)}")
    raise config_error(source, key, f"unsupported annotation {tp}")


def from_dict(cls: type, data: Any, source: str = "<config>", prefix: str = "") -> Any:
    """Build the frozen dataclass `cls` from a mapping, rejecting unknown keys."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise config_error(source, prefix, f"expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise config_error(source, dotted, f"unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], source, dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise config_error(source, prefix, str(e)) from None


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able view of a config (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- loading

def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is not None:
        merged = _read_yaml((path.parent / str(base)).resolve())
        _deep_update(merged, data)
        return merged
    return data


def _deep_update(target: dict, update: Mapping) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` → (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"command line: override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict[str, str]:
    """Write overrides into the raw mapping; returns key → source for error messages."""
    sources = {}
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"command line: {'.'.join(path)}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
        sources[".".join(path)] = "command line"
    return sources


def load_config(path: str | Path | None, overrides: Sequence[str] = (), model_schema=None) -> Config:
    """Read a YAML file (or only defaults when `path` is None) plus overrides.

    `model_schema(task_name)` returns the dataclass of the task's `model` section; by
    default it is looked up in the task registry.
    """
    source = str(path) if path is not None else "defaults"
    data = _read_yaml(Path(path)) if path is not None else {}
    override_sources = apply_overrides(data, overrides)
    return build_config(data, source, override_sources, model_schema)


def build_config(data: dict, source: str, override_sources: Mapping[str, str] | None = None,
                 model_schema=None) -> Config:
    override_sources = override_sources or {}

    def source_of(section: str) -> str:
        hit = any(k == section or k.startswith(section + ".") for k in override_sources)
        return f"{source} (+ command-line overrides)" if hit else source

    if model_schema is None:
        from jaxrec.train.task import model_config_class as model_schema
    task = data.get("task", Config.task)
    if not isinstance(task, str):
        raise config_error(source_of("task"), "task", f"expected a task name, got {_describe(task)}")
    try:
        schema = model_schema(task)
    except KeyError as e:
        raise config_error(source_of("task"), "task", str(e.args[0]) if e.args else f"unknown task {task!r}") from None
    sections = {}
    for f in dataclasses.fields(Config):
        if f.name in ("task", "source") or f.name not in data:
            continue
        cls = schema if f.name == "model" else typing.get_type_hints(Config)[f.name]
        sections[f.name] = from_dict(cls, data[f.name], source_of(f.name), f.name)
    unknown = set(data) - {f.name for f in dataclasses.fields(Config)} - {"source"}
    if unknown:
        key = sorted(unknown)[0]
        close = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(Config)], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise config_error(source_of(key), key, f"unknown section{hint}")
    sections.setdefault("model", from_dict(schema, {}, source, "model"))
    config = Config(task=task, source=source_of("mesh"), **sections)
    validate(config, source_of)
    return config


def validate(config: Config, source_of) -> None:
    """Cross-field checks that a single type annotation cannot express."""
    def require(ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise config_error(source_of(key.split(".")[0]), key, problem)

    t, d, e, c = config.train, config.data, config.eval, config.checkpoint
    require(t.batch_size > 0, "train.batch_size", "must be positive")
    require(t.microbatches > 0 and t.batch_size % t.microbatches == 0, "train.microbatches",
            f"must be a positive divisor of train.batch_size={t.batch_size}")
    require(t.steps > 0 or t.epochs > 0, "train.epochs", "set train.steps or a positive train.epochs")
    require(t.lr > 0, "train.lr", "must be positive")
    require(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    require(0 <= t.end_lr_ratio <= 1, "train.end_lr_ratio", "must be in [0, 1]")
    require(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
    require(t.log_every > 0, "train.log_every", "must be positive")
    require(t.eval_every >= 0 and t.patience >= 0, "train.eval_every", "must be >= 0")
    require(d.max_len > 0, "data.max_len", "must be positive")
    require(d.min_length >= 3, "data.min_length", "leave-one-out needs at least 3 events (train, valid, test)")
    require(d.lapse >= 0, "data.lapse", "must be >= 0")
    require(len(e.ks) > 0 and all(k > 0 for k in e.ks), "eval.ks", "needs positive cut-offs")
    require(e.batch_size > 0 and e.item_chunk > 0, "eval.batch_size", "must be positive")
    require(e.candidates == "full" or _sampled_count(e.candidates) > 0, "eval.candidates",
            f"must be 'full' or 'sampled:N' with N > 0, got {e.candidates!r}")
    metric_name, _, metric_k = e.metric.partition("@")
    require(metric_name in {"hr", "ndcg", "mrr", "recall"} and metric_k.isdigit() and int(metric_k) in e.ks,
            "eval.metric", f"{e.metric!r} must be hr|ndcg|mrr|recall@K with K in eval.ks {list(e.ks)}")
    require(c.keep >= 1, "checkpoint.keep", "must be >= 1")
    require(c.every >= 0, "checkpoint.every", "must be >= 0")
    for name in ("data", "fsdp", "tensor"):
        size = getattr(config.mesh, name)
        require(size == -1 or size > 0, f"mesh.{name}", "must be positive or -1 (fill the remaining devices)")
    check = getattr(config.model, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as err:
            raise config_error(source_of("model"), "model." + str(err).split(":", 1)[0],
                               str(err).split(":", 1)[1].strip() if ":" in str(err) else str(err)) from None


def _sampled_count(candidates: str) -> int:
    kind, _, count = candidates.partition(":")
    return int(count) if kind == "sampled" and count.isdigit() else 0


def save_config(config: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
