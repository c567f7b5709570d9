"""Reading configs: YAML files (with `base:` inheritance), `a.b=value` overrides, saving.

`load_config` is the entry point: it reads the file, applies the overrides, builds the
typed sections (the `model` section's schema comes from the task registry) and runs the
cross-field validation. The resolved config is saved with every run and checkpoint.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from jaxrec import registry
from jaxrec.config.coerce import describe, from_dict, to_dict
from jaxrec.config.errors import ConfigError, config_error
from jaxrec.config.schema import Config
from jaxrec.config.validation import validate

def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The mapping in `path`, with its `base:` chain merged under it; `chain` = the files that
    named this one as their base, so a cycle is reported instead of recursing forever."""
    if path.resolve() in {p.resolve() for p in chain}:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{chain[-1]}: base: the chain of bases loops back ({cycle})")
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
        merged = _read_yaml((path.parent / str(base)).resolve(), (*chain, path))
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


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (or only defaults when `path` is None) plus overrides."""
    source = str(path) if path is not None else "defaults"
    data = _read_yaml(Path(path)) if path is not None else {}
    override_sources = apply_overrides(data, overrides)
    return build_config(data, source, override_sources)


def build_config(data: dict, source: str, override_sources: Mapping[str, str] | None = None) -> Config:
    """Typed, validated config from a raw mapping; `override_sources` marks command-line keys."""
    override_sources = override_sources or {}

    def source_of(section: str) -> str:
        hit = any(k == section or k.startswith(section + ".") for k in override_sources)
        return f"{source} (+ command-line overrides)" if hit else source

    task = data.get("task", Config.task)
    if not isinstance(task, str):
        raise config_error(source_of("task"), "task", f"expected a task name, got {describe(task)}")
    try:
        schema = registry.model_schema(task)
    except registry.UnknownTask as e:
        raise config_error(source_of("task"), "task", str(e)) from None
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


def save_config(config: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
