"""The data a run's config describes: which store, which split."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxrec.config import ConfigError, DataConfig, from_dict
from jaxrec.data import splits
from jaxrec.data.store import InteractionStore

# preset name -> (generator module, its config class, the preset classmethod, the generator)
SYNTHETIC_PRESETS = {
    "default": ("jaxrec.data.synthetic", "SyntheticConfig", "default", "make_synthetic"),
    "tiny": ("jaxrec.data.synthetic", "SyntheticConfig", "tiny", "make_synthetic"),
    "hierarchy": ("jaxrec.data.synthetic_hierarchy", "HierarchyConfig", "default", "make_synthetic_hierarchy"),
    "hierarchy_tiny": ("jaxrec.data.synthetic_hierarchy", "HierarchyConfig", "tiny", "make_synthetic_hierarchy"),
}


def load_store(data: DataConfig, source: str = "config") -> InteractionStore:
    """The interaction store named by `data.source` ("synthetic" or a path)."""
    if data.source == "synthetic":
        import importlib
        if data.synthetic not in SYNTHETIC_PRESETS:
            raise ConfigError(f"{source}: data.synthetic: {data.synthetic!r} is not one of "
                              f"{', '.join(SYNTHETIC_PRESETS)}")
        module_name, class_name, preset_name, generator = SYNTHETIC_PRESETS[data.synthetic]
        module = importlib.import_module(module_name)
        config_class = getattr(module, class_name)
        preset = getattr(config_class, preset_name)()
        options = from_dict(config_class, data.synthetic_options, source, "data.synthetic_options")
        changed = {k: getattr(options, k) for k in data.synthetic_options}
        try:
            return getattr(module, generator)(config_class(**{**preset.__dict__, **changed}))
        except ValueError as e:
            raise ConfigError(f"{source}: data.synthetic_options: {e}") from None
    from jaxrec.data.readers import read_interactions
    path = Path(data.source)
    if not path.exists():
        raise ConfigError(f"{source}: data.source: {data.source} does not exist "
                          f"(relative paths are taken from the working directory)")
    if data.split == "llara":
        if not path.is_dir() or data.format not in ("auto", "llara"):
            raise ConfigError(f"{source}: data.split: 'llara' needs data.source to be a LLaRA directory "
                              f"(train.tsv, val.tsv, test.tsv), got {data.source} with format {data.format!r}")
        from jaxrec.data.llara import read_llara
        return combine_llara(read_llara(path))
    return read_interactions(path, format=data.format)


def combine_llara(stores: dict[str, InteractionStore]) -> InteractionStore:
    """One store holding the rows of a LLaRA directory's train, valid and test files (in that
    order; they share one item vocabulary). Row tokens become `<role>:<row>`, which is what
    `make_split` reads back for `data.split: llara`."""
    parts = [(role, stores[role]) for role in splits.LLARA_ROLES]
    lengths = np.concatenate([s.lengths() for _, s in parts])
    return InteractionStore(
        user_offsets=np.concatenate([[0], np.cumsum(lengths)]),
        item_ids=np.concatenate([s.item_ids for _, s in parts]), timestamps=None,
        item_vocab=parts[0][1].item_vocab,
        user_vocab=np.concatenate([np.char.add(f"{role}:", s.user_vocab) for role, s in parts]),
        item_columns=parts[0][1].item_columns, source=parts[0][1].source.replace("/train.tsv", ""))


def make_split(store: InteractionStore, data: DataConfig, source: str = "config") -> splits.Split:
    try:
        if data.split == "leave_one_out":
            return splits.leave_one_out(store, min_length=data.min_length)
        if data.split == "llara":
            return splits.llara_split(store, np.char.partition(store.user_vocab, ":")[:, 0])
        if data.split == "gap":
            return splits.gap_split(store, lapse=data.lapse)
        return splits.temporal_split(store, data.valid_start, data.test_start)
    except ValueError as e:
        raise ConfigError(f"{source}: data.split: {e}") from None
