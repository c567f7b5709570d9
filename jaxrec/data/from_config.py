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
    """The split `data.split` names, checked to leave something to train on and to evaluate."""
    try:
        if data.split == "leave_one_out":
            split = splits.leave_one_out(store, min_length=data.min_length)
        elif data.split == "llara":
            split = splits.llara_split(store, np.char.partition(store.user_vocab, ":")[:, 0])
        elif data.split == "gap":
            split = splits.gap_split(store, lapse=data.lapse)
        else:
            split = splits.temporal_split(store, data.valid_start, data.test_start)
    except ValueError as e:
        raise ConfigError(f"{source}: data.split: {e}") from None
    require_usable_split(store, split, data, source)
    return split


def require_usable_split(store: InteractionStore, split: splits.Split, data: DataConfig,
                         source: str = "config") -> None:
    """Stop before training when the data cannot train or evaluate a model under this split.

    Without this, a run on too-short data trains, "evaluates" zero users (an empty metrics
    line) and exits 0, and a run with no training record is blamed on train.batch_size.
    """
    longest = int(store.lengths().max(initial=0))
    where = f"{data.source} ({store.n_users:,} users, longest {longest} events)"
    empty = [name for name, examples in (("validation", split.valid), *split.tests.items()) if not len(examples)]
    if empty:
        key, need = _evaluation_needs(store, data)
        raise ConfigError(f"{source}: {key}: {where}: no {' or '.join(empty)} example: {need}")
    if not (split.train_lengths(store) >= 2).any():
        raise ConfigError(f"{source}: data.source: {where}: no training record: no user keeps the >= 2 training "
                          f"events a next-item record needs once {split.protocol} holds back its evaluation events")


def _evaluation_needs(store: InteractionStore, data: DataConfig) -> tuple[str, str]:
    """(the key to change, why no example exists) for a split without evaluation examples."""
    longest = int(store.lengths().max(initial=0))
    if data.split == "leave_one_out":
        if longest >= 3:
            return "data.min_length", (f"no user has the >= {data.min_length} events leave-one-out needs; "
                                       f"lower data.min_length to at most {longest}")
        return "data.source", "no user has the >= 3 events leave-one-out needs (train, valid, test)"
    if data.split == "gap":
        if longest >= 3:
            return "data.lapse", (f"no user has the >= 3 + data.lapse = {3 + data.lapse} events the gap split "
                                  f"needs; lower data.lapse to at most {longest - 3}")
        return "data.source", "no user has the >= 3 events the gap split needs"
    if data.split == "temporal":
        times = store.timestamps if store.timestamps is not None and store.timestamps.size else np.zeros(1)
        return "data.valid_start", (f"validation targets need an event in [data.valid_start, data.test_start) = "
                                    f"[{data.valid_start:g}, {data.test_start:g}), test targets one at or after "
                                    f"data.test_start, each after an earlier event of its user; the timestamps "
                                    f"run from {times.min():g} to {times.max():g}")
    return "data.source", "the LLaRA val.tsv / test.tsv rows need a history before their next item"
