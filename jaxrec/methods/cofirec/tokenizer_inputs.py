"""The tokenizer's inputs: per-item, per-level vectors built from a config, on the host.

    text levels   `model.text` (Beauty `item_text.json`, ML-1M `movies.dat`; "" = the
                  synthetic hierarchy's own columns), `model.levels` picks and orders them
    vectors       `model.embeddings`: "features" (the planted hierarchy's level features: no
                  LLM, instant), an LLM (packaged "smollm2", an HF directory or a GGUF file;
                  cached in `model.embedding_cache`), or a user array (.npy / .safetensors,
                  [n_items(+1), levels, d])
    CF level      the item table of a `task: seqrec` run (`model.cf_guide`), rows = items
    standardise   per level and dimension (tokenizer_model.standardize)

Every problem with these inputs is a one-line ConfigError naming the key (and the file).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
from typing import Sequence

import numpy as np

from jaxrec.config import ConfigError, from_dict
from jaxrec.data.from_config import SYNTHETIC_PRESETS
from jaxrec.data.item_text import HIERARCHY_LEVELS, item_text_levels
from jaxrec.data.store import InteractionStore
from jaxrec.data.text import DataFormatError
from jaxrec.methods.cofirec.tokenizer_model import standardize

FEATURES = "features"


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizerInputs:
    level_names: tuple[str, ...]     # semantic levels, coarse -> fine
    levels: np.ndarray               # float32 [n_items + 1, K_sem, d] (standardised unless disabled), row 0 zeros
    cf: np.ndarray | None            # float32 [n_items + 1, d_cf] or None
    source: str                      # where the semantic vectors came from
    sha256: str                      # of the raw semantic vectors (and the CF table), for fingerprints

    def fused(self, names: Sequence[str]) -> np.ndarray:
        """[n_items + 1, len(names) * d]: the named levels concatenated (TIGER's one embedding)."""
        idx = [self.level_names.index(n) for n in names]
        return np.ascontiguousarray(self.levels[:, idx].reshape(self.levels.shape[0], -1))


def _hierarchy_features(store: InteractionStore, config, names: Sequence[str]) -> np.ndarray:
    d = config.data
    if d.source != "synthetic" or not d.synthetic.startswith("hierarchy"):
        raise ConfigError(f"{config.source}: model.embeddings: 'features' exist only for data.synthetic: "
                          "hierarchy | hierarchy_tiny; give an LLM (e.g. smollm2) or an array file")
    module_name, class_name, preset_name, _ = SYNTHETIC_PRESETS[d.synthetic]
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    options = from_dict(cls, d.synthetic_options, config.source, "data.synthetic_options")
    changed = {k: getattr(options, k) for k in d.synthetic_options}
    world = module.hierarchy_world(cls(**{**getattr(cls, preset_name)().__dict__, **changed}))
    assert np.array_equal(world.store.item_vocab, store.item_vocab)
    return np.asarray(world.level_features[:, [HIERARCHY_LEVELS.index(n) for n in names]], np.float32)


def build_inputs(config, store: InteractionStore, cf_table: np.ndarray | None) -> TokenizerInputs:
    """The standardised inputs the config describes (see module doc)."""
    from jaxrec.methods.cofirec.text_embeddings import EmbeddingSettings, item_level_embeddings

    m, src = config.model, config.source
    try:
        text = item_text_levels(store, m.text or None, list(m.levels) or None)
    except (DataFormatError, FileNotFoundError) as e:
        raise ConfigError(f"{src}: model.text: {_one_line(e)}") from None
    except ValueError as e:
        key = "model.levels" if str(e).startswith(("unknown text level", "text levels must")) else "model.text"
        raise ConfigError(f"{src}: {key}: {_one_line(e)}") from None
    names = text.names
    if m.embeddings == FEATURES:
        raw, source = _hierarchy_features(store, config, names), f"{FEATURES}:{store.source}"
    else:
        options = {} if m.embeddings.endswith((".npy", ".safetensors")) else {
            "cache_dir": m.embedding_cache or None, "settings": EmbeddingSettings(max_tokens=m.embedding_max_tokens)}
        try:
            emb = item_level_embeddings(text, m.embeddings, **options)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"{src}: model.embeddings: {_one_line(e)}") from None
        raw, source = emb.array, emb.source
    digest = hashlib.sha256(np.ascontiguousarray(raw).tobytes())
    if cf_table is not None:
        if cf_table.shape[0] != store.n_items + 1:
            raise ConfigError(f"{src}: model.cf_guide: item table has {cf_table.shape[0]} rows for "
                              f"{store.n_items} items (+ padding)")
        digest.update(np.ascontiguousarray(cf_table, np.float32).tobytes())
    prepare = standardize if m.standardize else (lambda a: np.asarray(a, np.float32))
    cf = None if cf_table is None else prepare(cf_table)
    levels = prepare(raw)
    levels[0] = 0.0
    if cf is not None:
        cf[0] = 0.0
    return TokenizerInputs(names, levels, cf, source, digest.hexdigest())


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
