"""The data a run's config describes: which store, which split."""
from __future__ import annotations

from pathlib import Path

from jaxrec.config import ConfigError, DataConfig, from_dict
from jaxrec.data import splits
from jaxrec.data.store import InteractionStore

SYNTHETIC_PRESETS = ("default", "tiny")


def load_store(data: DataConfig, source: str = "config") -> InteractionStore:
    """The interaction store named by `data.source` ("synthetic" or a path)."""
    if data.source == "synthetic":
        from jaxrec.data.synthetic import SyntheticConfig, make_synthetic
        if data.synthetic not in SYNTHETIC_PRESETS:
            raise ConfigError(f"{source}: data.synthetic: {data.synthetic!r} is not one of "
                              f"{', '.join(SYNTHETIC_PRESETS)}")
        preset = getattr(SyntheticConfig, data.synthetic)()
        options = from_dict(SyntheticConfig, data.synthetic_options, source, "data.synthetic_options")
        changed = {k: getattr(options, k) for k in data.synthetic_options}
        try:
            return make_synthetic(type(preset)(**{**preset.__dict__, **changed}))
        except ValueError as e:
            raise ConfigError(f"{source}: data.synthetic_options: {e}") from None
    from jaxrec.data.readers import read_interactions
    path = Path(data.source)
    if not path.exists():
        raise ConfigError(f"{source}: data.source: {data.source} does not exist "
                          f"(relative paths are taken from the working directory)")
    return read_interactions(path, format=data.format)


def make_split(store: InteractionStore, data: DataConfig, source: str = "config") -> splits.Split:
    try:
        if data.split == "leave_one_out":
            return splits.leave_one_out(store, min_length=data.min_length)
        if data.split == "gap":
            return splits.gap_split(store, lapse=data.lapse)
        return splits.temporal_split(store, data.valid_start, data.test_start)
    except ValueError as e:
        raise ConfigError(f"{source}: data.split: {e}") from None
