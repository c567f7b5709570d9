"""Typed, frozen configuration: YAML files plus `a.b=value` overrides.

    schema      the section dataclasses and their defaults
    coerce      raw YAML values → dataclasses (and back), errors naming file and key
    loading     YAML files, `base:` inheritance, overrides, saving
    validation  the cross-field checks, all in one place
"""
from jaxrec.config.coerce import from_dict, to_dict
from jaxrec.config.errors import ConfigError, config_error
from jaxrec.config.loading import apply_overrides, build_config, load_config, parse_override, save_config
from jaxrec.config.schema import (CheckpointConfig, Config, DataConfig, DistributedConfig, EvalConfig, MeshConfig,
                                  RunConfig, TrainConfig, candidate_count)

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistributedConfig", "EvalConfig", "MeshConfig",
    "RunConfig", "TrainConfig", "apply_overrides", "build_config", "candidate_count", "config_error", "from_dict",
    "load_config", "parse_override", "save_config", "to_dict",
]
