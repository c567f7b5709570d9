"""Reading Hugging Face config dicts (transformers 4 and 5 layouts) and rope frequencies vs transformers."""
import numpy as np
import pytest

from jaxrec.models.llama import LlamaConfig, UnsupportedModelError

LLAMA2 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
          "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
          "max_position_embeddings": 4096, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
          "hidden_act": "silu"}


def test_llama2_transformers4_layout():
    c = LlamaConfig.from_hf_dict(LLAMA2)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (32, 32, 32, 128)
    assert c.rope_theta == 10000.0 and c.rope_type == "default" and c.eos_token_ids == (2,)
    assert not c.qkv_bias and not c.tie_word_embeddings and c.layer_windows == ()


def test_llama31_scaling_and_multiple_eos():
    d = dict(LLAMA2, rope_theta=500000.0, num_key_value_heads=8, eos_token_id=[128001, 128009],
             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192})
    c = LlamaConfig.from_hf_dict(d)
    assert c.rope_type == "llama3" and c.rope_theta == 500000.0 and c.eos_token_ids == (128001, 128009)


def test_sliding_windows_per_layer():
    mistral = LlamaConfig.from_hf_dict(dict(LLAMA2, model_type="mistral", sliding_window=4096, num_hidden_layers=3))
    assert mistral.layer_windows == (4096,) * 3
    qwen = LlamaConfig.from_hf_dict(dict(LLAMA2, model_type="qwen2", num_hidden_layers=4, use_sliding_window=True,
                                         sliding_window=64, max_window_layers=2))
    assert qwen.layer_windows == (0, 0, 64, 64) and qwen.qkv_bias and not qwen.o_bias
    assert LlamaConfig.from_hf_dict(dict(LLAMA2, model_type="qwen2", sliding_window=64)).layer_windows == ()


def test_hf_dict_round_trip():
    c = LlamaConfig.from_hf_dict(dict(LLAMA2, model_type="mistral", sliding_window=128, num_key_value_heads=8))
    assert LlamaConfig.from_hf_dict(c.to_hf_dict()) == c


@pytest.mark.parametrize("params", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 16,
     "mscale": 0.707, "mscale_all_dim": 1.0},
], ids=lambda p: p["rope_type"] + ("-mscale" if "mscale" in p else ""))
def test_rope_frequencies_match_transformers(params):
    pytest.importorskip("torch")
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kw = dict(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              max_position_embeddings=1024, rope_parameters={"rope_theta": 50000.0, **params})
    hf = transformers.LlamaConfig(**kw)
    if params["rope_type"] == "default":
        want = 1.0 / (50000.0 ** (np.arange(0, 64, 2) / 64))
        factor = 1.0
    else:
        inv, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu")
        want = inv.numpy()
    got, got_factor = LlamaConfig.from_hf_dict(hf.to_dict()).rope_frequencies(max_length=256)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got_factor == pytest.approx(factor)


def test_unsupported_settings_are_named():
    with pytest.raises(UnsupportedModelError, match="model_type='phi3'"):
        LlamaConfig.from_hf_dict(dict(LLAMA2, model_type="phi3"))
    with pytest.raises(UnsupportedModelError, match="missing required key 'hidden_size'"):
        LlamaConfig.from_hf_dict({k: v for k, v in LLAMA2.items() if k != "hidden_size"}, source="x/config.json")
    dynamic = LlamaConfig.from_hf_dict(dict(LLAMA2, rope_scaling={"type": "dynamic", "factor": 2.0}))
    with pytest.raises(UnsupportedModelError, match="past the original context"):
        dynamic.rope_frequencies(max_length=8192)
    with pytest.raises(ValueError, match="dtype"):
        LlamaConfig.from_hf_dict(LLAMA2, dtype="float8")
