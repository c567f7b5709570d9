"""Writing Hugging Face checkpoints back: the loader's name table read backwards, a merged
LoRA model that transformers loads, and a PEFT adapter that peft loads on the base — both
giving jaxrec's logits."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxrec.models.llama import Llama
from jaxrec.models.lora import ALL_PROJECTIONS, LoraConfig, merge_lora
from jaxrec.weights import UnsupportedModelError, load_pretrained
from jaxrec.weights.hf_writer import hf_config_dict, save_hf_checkpoint, save_peft_adapter
from tests.helpers import torch_logits
from tests.models import llm_fixtures as fx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    hf = fx.make_hf_model("qwen2", seed=3)
    return fx.save_hf_model(hf, tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def any_base(request, tmp_path_factory):
    """Qwen2 (tied, q/k/v biases, yarn) and Llama 3-style (untied head, llama3 rope scaling)."""
    hf = fx.make_hf_model(request.param, seed=3)
    return fx.save_hf_model(hf, tmp_path_factory.mktemp(request.param))


def test_written_tensors_are_the_read_ones_exactly(base, tmp_path):
    config, params = load_pretrained(base)
    written = save_hf_checkpoint(tmp_path / "out", config, params)
    assert {p.name for p in written} == {"config.json", "model.safetensors"}
    original, copy = load_file(str(base / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(copy) == set(original) - {"lm_head.weight"}     # tied: the head is the embedding
    for name, value in copy.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    again = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert again.tie_word_embeddings and again.model_type == "qwen2"
    assert again.rope_parameters["rope_type"] == "yarn"


def test_merged_model_and_peft_adapter_give_jaxrec_lora_logits(any_base, tmp_path):
    base = any_base
    lora = LoraConfig(rank=4, alpha=8.0, targets=ALL_PROJECTIONS)
    config, params = load_pretrained(base, lora=lora, rng=jax.random.key(1))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(     # B = 0 at init: make every delta count
        lambda path, x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype)
        if getattr(path[-1], "key", "") == "lora_b" else x, params)
    ids, mask = fx.padded_batch(np.random.default_rng(1), [9, 6], 9, side="left")
    want = np.asarray(Llama(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits)
    real = mask == 1          # a fully masked (padding) query's output is arbitrary on both sides
    # float32 on both sides, different summation orders: ~1e-6 of the logit scale; a wrong
    # transpose, scale (alpha/r), target module or tie would move logits by a large fraction of it.
    scale = float(np.abs(want[real]).max())

    save_hf_checkpoint(tmp_path / "merged", config.with_lora(None), jax.device_get(merge_lora(params, lora)))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert np.abs(torch_logits(merged, ids, mask) - want)[real].max() <= 1e-4 * scale

    save_peft_adapter(tmp_path / "adapter", config, jax.device_get(params), str(base))
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ALL_PROJECTIONS.split("|") and adapter_config["r"] == 4
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    untuned = torch_logits(hf_base, ids, mask)
    assert np.abs(untuned - want)[real].max() > 1e-2 * scale               # the adapter matters
    adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    assert np.abs(torch_logits(adapted, ids, mask) - want)[real].max() <= 1e-4 * scale


def test_rope_forms_without_a_config_json_are_refused(base):
    config, _ = load_pretrained(base)
    gguf_style = dataclasses.replace(config, rope_scaling=(("factors", (1.0,) * 8), ("rope_type", "freq_factors")))
    with pytest.raises(UnsupportedModelError, match="freq_factors"):
        hf_config_dict(gguf_style)
    with pytest.raises(ValueError, match="experts"):
        save_peft_adapter("unused", config.with_lora(LoraConfig(rank=4, num_experts=2)), {}, "base")


def test_a_gguf_base_is_written_in_the_hugging_face_layout(tmp_path):
    """llama.cpp permutes q/k rows; the loader undoes it, so the written tensors are the
    original Hugging Face ones bit for bit (float32 GGUF), not the file's permuted rows."""
    pytest.importorskip("gguf")
    from tests.weights.test_gguf import write_gguf
    hf = fx.make_hf_model("llama", seed=5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config, params = load_pretrained(write_gguf(hf, tmp_path / "tiny.gguf"))
    save_hf_checkpoint(tmp_path / "out", config, params)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    original = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert set(written) == set(original)
    for name, value in written.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
