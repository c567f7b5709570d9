"""The typed, frozen config sections and their defaults.

The defaults are the embedded-data main job: `jaxrec train` with no file equals
`jaxrec train configs/sasrec_synthetic.yaml` (a test keeps the two in step). The `model`
section's schema belongs to the task named by `task`; each task declares its own
dataclass (`Task.model_config`), found through `jaxrec.registry`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class RunConfig:
    name: str = "sasrec_synthetic"
    dir: str = "runs/{name}"       # `{name}` is replaced by `name`
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"      # "synthetic" or a path (file or directory)
    # reader (jaxrec.data.readers.FORMATS; a test keeps the two equal)
    format: Literal["auto", "pairs", "sequences", "ratings", "movielens", "recbole", "llara"] = "auto"
    synthetic: str = "default"     # preset of the embedded generator: default | tiny | hierarchy | hierarchy_tiny
    synthetic_options: dict = field(default_factory=dict)   # generator fields to change, e.g. {n_users: 500}
    split: Literal["leave_one_out", "gap", "temporal", "llara"] = "leave_one_out"   # llara: the directory's own rows
    min_length: int = 3            # leave-one-out: shorter users are train-only
    lapse: int = 30                # gap protocol: events between the no-gap and the gap target
    valid_start: float = 0.0       # temporal split cut points (absolute timestamps)
    test_start: float = 0.0
    max_len: int = 50
    train_windows: Literal["last", "chunks", "prefix"] = "chunks"
    num_threads: int = 2           # Grain read threads
    prefetch: int = 8              # Grain prefetch buffer (batches)
    length_buckets: int = 1        # tasks with length buckets (generators): batches padded to one of this many
                                   # widths instead of the full history (1 = always the full width)


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


def candidate_count(candidates: str) -> int | None:
    """None for "full" (rank against the whole catalogue), N for "sampled:N"."""
    if candidates == "full":
        return None
    kind, _, count = candidates.partition(":")
    if kind != "sampled" or not count.isdigit() or int(count) < 1:
        raise ValueError(f"must be 'full' or 'sampled:N' with N > 0, got {candidates!r}")
    return int(count)


@dataclass(frozen=True)
class EvalConfig:
    ks: tuple[int, ...] = (5, 10, 20)
    candidates: str = "full"       # "full" or "sampled:N" (N seeded negatives)
    exclude_history: bool = False  # the one default: evaluation, export and serving read it from here
    metric: str = "ndcg@10"        # selects the best checkpoint and drives early stopping
    batch_size: int = 256
    item_chunk: int = 4096
    seed: int = 1234               # sampled negatives
    track_test: bool = False       # also log test metrics at every evaluation (learning curves; never used to select)

    @property
    def n_negatives(self) -> int | None:
        return candidate_count(self.candidates)


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, Any], ...] = ()   # empty = the table in jaxrec/sharding_rules.yaml


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
