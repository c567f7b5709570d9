"""Export of an iLoRA/LLaRA run (`task: ilora`): `jaxrec export RUN OUT` writes, beside
`manifest.json` (kind "llm_rerank"):

    ilora.json              how to rebuild the recommender: the run's model config, the LLM's
                            config, the LoRA shape, the prompt templates and placeholder tokens,
                            the candidate protocol, the guide's hidden size
    items.json              the item token of every index (0 = padding)
    titles.json             the cleaned title of every index (what the prompts show)
    trained.safetensors     every trained array, "/" between names: adapters/… (all experts, jaxrec
                            layout: lora_a [layers, in, r], lora_b [layers, r, out]), projector/…,
                            gate/params/… and gate/batch_stats/… (the router's BatchNorm running
                            statistics), and ph (the frozen text-only placeholder vector)
    guide/                  the SASRec guide as a seqrec export (model.safetensors, model.json,
                            items.json): its item table feeds the projector, its sequence
                            representation the gate and the default candidates
    merged/, adapter/       one expert only (LLaRA's LoRA): the LLM with the adapter folded in, as a
                            Hugging Face directory, and the adapter alone in PEFT's format

With one expert the recommender runs on `merged/` and needs nothing outside the export. With E > 1
experts the adapter depends on each sequence's gate, so there is no single merged model: the
manifest's `external.base_model` names the base checkpoint (path + SHA-256) the recommender
loads the LLM from, and `read_manifest` refuses a base whose hash differs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict

from jaxrec.export.manifest import file_sha256
from jaxrec.models.lora import merge_lora, merge_trainable

FORMAT = "jaxrec.ilora/1"
SPEC_FILE, ITEMS_FILE, TITLES_FILE, TRAINED_FILE = "ilora.json", "items.json", "titles.json", "trained.safetensors"
TEMPLATE = 0      # the prompt template a recommendation uses (evaluation draws one per example)


def candidate_protocol(m, has_guide: bool) -> str:
    """What `recommend` ranks, in words (kept in the manifest's details)."""
    source = (f"the guide's (SASRec's) top {m.candidates} items for the history (history items left out when "
              f"exclude_history), listed in the prompt in the guide's order" if has_guide
              else f"{m.candidates} candidate tokens the caller passes per history (this run has no guide)")
    return (f"{source}; the LLM reranks them by log p(' title\\n' | prompt) with template {TEMPLATE} of the "
            f"{m.domain!r} domain, as evaluation's likelihood ranking does; k <= {m.candidates}")


def base_reference(path: Path, fingerprint: str) -> dict[str, str]:
    """{"path", "sha256"} of a base checkpoint as `read_manifest` checks it: a directory by its
    weight files' fingerprint, a single (GGUF) file by its own hash."""
    return {"path": str(path.absolute()), "sha256": fingerprint if path.is_dir() else file_sha256(path)}


def _readable(path: Path) -> None:
    # safetensors writes through a private temporary file (0600); an export is meant to be shared.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _flat(prefix: str, tree: Any) -> dict[str, np.ndarray]:
    return {"/".join((prefix,) + tuple(map(str, k))): np.asarray(jax.device_get(v), np.float32)
            for k, v in flatten_dict(nn.unbox(tree)).items()}


def export_ilora(task, params, frozen, state, out_dir: Path) -> tuple[list[Path], dict[str, Any]]:
    """Write the files above; returns (written paths, the manifest fields of this export)."""
    from safetensors.numpy import save_file

    from jaxrec.export.scoring import export_scoring
    from jaxrec.weights.hf_writer import save_hf_checkpoint, save_peft_adapter

    out_dir, m = Path(out_dir), task.m
    if m.experts == 1:
        # Refuse a base without a config.json form (GGUF-only rope factors) before writing anything.
        from jaxrec.weights.hf_writer import hf_config_dict
        hf_config_dict(task.llm_config.with_lora(None))
    writer = jax.process_index() == 0
    guide_run = task.upstream_runs.get("guide")
    written: list[Path] = []
    trained = {**_flat("adapters", params["adapters"]), "ph": np.asarray(jax.device_get(frozen["ph"]), np.float32)}
    if "projector" in params:
        trained.update(_flat("projector", params["projector"]))
    if "gate" in params:
        trained.update(_flat("gate/params", params["gate"]))
        trained.update(_flat("gate/batch_stats", state.get("gate_stats", {})))
    if writer:
        save_file(trained, str(out_dir / TRAINED_FILE), metadata={"format": FORMAT})
        _readable(out_dir / TRAINED_FILE)
        (out_dir / ITEMS_FILE).write_text(json.dumps(task.store.item_vocab.tolist()), encoding="utf-8")
        (out_dir / TITLES_FILE).write_text(json.dumps([str(t) for t in task.builder.titles.tolist()]),
                                           encoding="utf-8")
    written += [out_dir / TRAINED_FILE, out_dir / ITEMS_FILE, out_dir / TITLES_FILE]
    if guide_run is not None:
        (out_dir / "guide").mkdir(exist_ok=True)
        written += [Path(p) for p in export_scoring(guide_run.task, guide_run.host_params(), out_dir / "guide",
                                                    platforms=("cpu",))]

    base = base_reference(task.base_path, task.fingerprints()["base_model"])
    info: dict[str, Any] = {"kind": "llm_rerank"}
    llm_source = "base_model"
    if m.experts == 1:
        # LLaRA's LoRA: one adapter for every sequence, so it folds into the base weights.
        full = merge_trainable(params["adapters"], frozen["llm"])
        merged = jax.device_get(merge_lora(full, task.llm_config.lora))
        if writer:
            written += save_hf_checkpoint(out_dir / "merged", task.llm_config.with_lora(None), merged,
                                          tokenizer_from=task.base_path)
            written += save_peft_adapter(out_dir / "adapter", task.llm_config, jax.device_get(params["adapters"]),
                                         base["path"])
        llm_source = "merged"
        info["adapter_base"] = base        # what adapter/ goes on; the recommender does not need it
    else:
        info["external"] = {"base_model": base}

    lora = task.llm_config.lora
    spec = {"format": FORMAT, "model_config": dataclasses.asdict(m), "llm_source": llm_source,
            "llm_config": task.llm_config.with_lora(None).to_hf_dict(), "dtype": task.llm_config.dtype,
            "param_dtype": task.llm_config.param_dtype,
            "lora": {"rank": lora.rank, "alpha": lora.alpha, "experts": lora.num_experts,
                     "scale": lora.scale, "targets": lora.targets},
            "prompt": {"domain": m.domain, "templates": list(task.encoder.templates), "template": TEMPLATE,
                       "max_length": m.max_length, "max_history": m.max_history, "candidates": m.candidates,
                       "max_target_tokens": m.max_target_tokens},
            "n_items": int(task.store.n_items), "guide": guide_run is not None,
            "exclude_history": bool(task.config.eval.exclude_history), "batch_size": task.config.eval.batch_size}
    if writer:
        (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2), encoding="utf-8")
    written.append(out_dir / SPEC_FILE)
    info.update({
        "candidates": candidate_protocol(m, guide_run is not None),
        "llm": ("merged/ (LoRA folded into the base weights)" if llm_source == "merged"
                else "the external base_model with trained.safetensors' adapters"),
        "experts": m.experts, "gate": m.gate if m.experts > 1 else None,
        "prompt": f"{m.prompt} ({m.domain!r} templates, template {TEMPLATE})",
        "files": {SPEC_FILE: "how to rebuild the recommender", TRAINED_FILE: "adapters, projector, gate (+ BatchNorm "
                  "statistics), [PH] vector", "guide/": "the SASRec guide (a scoring export)",
                  **({"merged/": "Hugging Face directory, LoRA merged", "adapter/": "PEFT LoRA adapter"}
                     if m.experts == 1 else {})},
    })
    return written, info
