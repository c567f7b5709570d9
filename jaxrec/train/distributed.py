"""Multi-host start-up: `jax.distributed.initialize` before any other JAX call."""
from __future__ import annotations

import os

from jaxrec.config import ConfigError, DistributedConfig

# Variables that cluster launchers set; any of them means "this is one of several hosts".
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")

_initialized = False


def wants_distributed(cfg: DistributedConfig, environ=os.environ) -> bool:
    if cfg.initialize == "yes":
        return True
    if cfg.initialize == "no":
        return False
    if cfg.coordinator_address or cfg.num_processes > 1:
        return True
    if environ.get("SLURM_NTASKS") == "1" or environ.get("OMPI_COMM_WORLD_SIZE") == "1":
        return False
    return any(environ.get(name) for name in _CLUSTER_ENV)


def maybe_initialize(cfg: DistributedConfig, source: str = "config") -> bool:
    """Initialise the JAX runtime across processes when the config or environment asks.

    Explicit config values win; otherwise JAX's own cluster detection (SLURM, Open MPI,
    Cloud TPU, JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID) fills them in.
    """
    global _initialized
    if _initialized or not wants_distributed(cfg):
        return _initialized
    import jax

    kwargs = {}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes > 0:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    if "num_processes" in kwargs and "process_id" not in kwargs:
        raise ConfigError(f"{source}: distributed.process_id: required when distributed.num_processes is set")
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise ConfigError(f"{source}: distributed: could not initialise the JAX runtime: {e}") from None
    _initialized = True
    return True
