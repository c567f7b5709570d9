"""Hugging Face directory loading: dtypes, streaming placement, tokenizers, and errors that name the culprit."""
import json

import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrec.sharding import Layout, fit_spec
from jaxrec.weights import (CheckpointFormatError, CheckpointNotFoundError, TensorMismatchError,
                            UnsupportedModelError, load_config, load_pretrained, load_tokenizer,
                            token_ids_containing)
from jaxrec.weights.safetensors_io import SafetensorsFile
from tests.models import llm_fixtures as fx

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf = fx.make_hf_model("qwen2", seed=2)
    return hf, fx.save_hf_model(hf, tmp_path_factory.mktemp("qwen2"))


def copy_checkpoint(src, dst, edit_config=None):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if edit_config:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_values_land_transposed_and_cast(hf_dir):
    hf, path = hf_dir
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    config, params = load_pretrained(path, dtype="bfloat16", param_dtype="bfloat16")
    assert config.dtype == config.param_dtype == "bfloat16"
    q = np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][1], np.float32)
    want = state["model.layers.1.self_attn.q_proj.weight"].T.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(q, want)
    bias = np.asarray(params["layers"]["self_attn"]["k_proj"]["bias"][0], np.float32)
    np.testing.assert_array_equal(bias, state["model.layers.0.self_attn.k_proj.bias"].astype(ml_dtypes.bfloat16))
    assert "lm_head" not in params   # tied


def test_bf16_safetensors_are_read(tmp_path, hf_dir):
    hf, _ = hf_dir
    path = fx.save_hf_model(hf.to(torch.bfloat16), tmp_path / "bf16")
    hf.float()
    f = SafetensorsFile(path / "model.safetensors")
    arr = f.read("model.norm.weight")
    assert arr.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(arr.astype(np.float32),
                                  hf.model.norm.weight.detach().to(torch.bfloat16).float().numpy())


def test_placement_follows_logical_shardings(hf_dir):
    _, path = hf_dir
    _, params = load_pretrained(path, layout=Layout.build((1, 2, 4)))
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]          # [layers, embed, heads]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert params["embed_tokens"].sharding.spec == P("tensor", "fsdp")
    _, single = load_pretrained(path)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(single["layers"]["self_attn"]["q_proj"]["kernel"]))


def test_fit_spec_replicates_dimensions_a_mesh_axis_does_not_divide():
    sizes = {"data": 1, "fsdp": 2, "tensor": 4}
    spec = P("fsdp", "tensor")
    assert fit_spec(spec, (576, 192), sizes) == P("fsdp", "tensor")
    assert fit_spec(spec, (576, 3 * 64 + 2), sizes) == P("fsdp", None)
    assert fit_spec(spec, (9, 8), sizes) == P(None, "tensor")


@pytest.mark.parametrize("edit, error, words", [
    (lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]), UnsupportedModelError, "gpt2"),
    (lambda c: c.update(intermediate_size=96), TensorMismatchError, "model.layers.0.mlp.gate_proj.weight"),
    (lambda c: c.update(num_hidden_layers=3), TensorMismatchError, "model.layers.2."),
    (lambda c: c.update(hidden_act="gelu"), UnsupportedModelError, "hidden_act"),
    (lambda c: c.update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), UnsupportedModelError,
     "longrope"),
], ids=["architecture", "shape", "missing-layer", "activation", "rope-type"])
def test_bad_checkpoints_name_the_problem(tmp_path, hf_dir, edit, error, words):
    _, path = hf_dir
    broken = copy_checkpoint(path, tmp_path / "broken", edit)
    with pytest.raises(error, match=words.replace(".", r"\.")):
        load_pretrained(broken)


def test_missing_and_malformed_files(tmp_path, hf_dir):
    _, path = hf_dir
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "empty")
    bad_json = copy_checkpoint(path, tmp_path / "badjson")
    (bad_json / "config.json").write_text('{"model_type": "llama",\n  oops}')
    with pytest.raises(CheckpointFormatError, match="line 2"):
        load_config(bad_json)
    corrupt = copy_checkpoint(path, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointFormatError, match="model.safetensors"):
        load_pretrained(corrupt)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_bytes((path / "config.json").read_bytes())
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointNotFoundError, match="model-00001-of-00002.safetensors"):
        load_pretrained(sharded)


def test_tokenizer_from_directory(tmp_path):
    fx.save_tiny_tokenizer(tmp_path)
    loaded = load_tokenizer(tmp_path)
    ids = loaded("the cat sat.\n")["input_ids"]
    assert loaded.decode(ids) == "the cat sat.\n"
    newline = token_ids_containing(loaded, "\n")
    assert newline and all("\n" in loaded.decode([i]) for i in newline)
    assert any(i in newline for i in ids)
    (tmp_path / "weights_only").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path / "weights_only")
