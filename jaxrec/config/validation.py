"""Cross-field checks that a single type annotation cannot express — all in one place.

The core sections are checked here; a task's `model` schema may add its own checks with
a `validate(self, config)` method that raises `ConfigError("key: problem")`, where `key`
is relative to `model` (e.g. "heads") or a full dotted key of another section
("data.split"). The message that reaches the user names the file and the full key.
"""
from __future__ import annotations

from typing import Callable

from jaxrec import sharding
from jaxrec.config.errors import ConfigError, config_error
from jaxrec.config.schema import Config, candidate_count

SECTIONS = ("run", "data", "model", "train", "eval", "mesh", "checkpoint", "distributed")
METRICS = ("hr", "ndcg", "mrr", "recall")


def validate(config: Config, source_of: Callable[[str], str]) -> None:
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
    require(d.length_buckets >= 1, "data.length_buckets", "must be >= 1 (1 = every batch at the full width)")
    require(len(e.ks) > 0 and all(k > 0 for k in e.ks), "eval.ks", "needs positive cut-offs")
    require(e.batch_size > 0 and e.item_chunk > 0, "eval.batch_size", "must be positive")
    try:
        candidate_count(e.candidates)
    except ValueError as err:
        require(False, "eval.candidates", str(err))
    # A task whose evaluation is not a ranking (a tokenizer) names its own selection metrics
    # in its model schema: `selection_metrics: ClassVar[tuple[str, ...]]` (higher is better).
    own = tuple(getattr(type(config.model), "selection_metrics", ()))
    metric_name, _, metric_k = e.metric.partition("@")
    require(e.metric in own or (metric_name in METRICS and metric_k.isdigit() and int(metric_k) in e.ks),
            "eval.metric", f"{e.metric!r} must be hr|ndcg|mrr|recall@K with K in eval.ks {list(e.ks)}"
            + (f" or one of {', '.join(own)}" if own else ""))
    require(c.keep >= 1, "checkpoint.keep", "must be >= 1")
    require(c.every >= 0, "checkpoint.every", "must be >= 0")
    for name in ("data", "fsdp", "tensor"):
        size = getattr(config.mesh, name)
        require(size == -1 or size > 0, f"mesh.{name}", "must be positive or -1 (fill the remaining devices)")
    if config.mesh.rules:
        try:
            sharding.normalize_rules(config.mesh.rules, "rules")
        except sharding.MeshError as err:
            require(False, "mesh.rules", str(err).removeprefix("rules"))
    _validate_model(config, source_of)


def _validate_model(config: Config, source_of: Callable[[str], str]) -> None:
    check = getattr(config.model, "validate", None)   # optional part of a model schema
    if check is None:
        return
    try:
        check(config)
    except ConfigError as err:
        key, _, problem = str(err).partition(":")
        if not problem:
            key, problem = "", key
        full = key if key.split(".")[0] in SECTIONS and "." in key else f"model.{key}" if key else "model"
        raise config_error(source_of(full.split(".")[0]), full, problem.strip()) from None
