"""Logit and greedy-decoding parity with transformers' PyTorch models (tiny random configs)."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.generate import greedy_generate
from jaxrec.models.llama import Llama, forward, mean_pool
from jaxrec.weights import load_pretrained
from tests.models import llm_fixtures as fx

torch = pytest.importorskip("torch")


KINDS = ["llama", "qwen2", "mistral"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind → (kind, transformers model, jaxrec config, jaxrec params), built once per kind."""
    built = {}

    def get(kind):
        if kind not in built:
            hf = fx.make_hf_model(kind)
            # The Llama checkpoint is written in several shards to exercise the index file.
            shard = "40KB" if kind == "llama" else None
            path = fx.save_hf_model(hf, tmp_path_factory.mktemp(kind), max_shard_size=shard)
            built[kind] = (kind, hf, *load_pretrained(path))
        return built[kind]
    return get


@pytest.fixture(params=KINDS)
def pair(request, checkpoints):
    return checkpoints(request.param)


def test_config_read_from_checkpoint(pair):
    kind, hf, config, _ = pair
    assert config.model_type == kind
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert config.qkv_bias == (kind == "qwen2")
    assert config.layer_windows == ((5, 5) if kind == "mistral" else ())
    assert config.rope_type == {"llama": "llama3", "qwen2": "yarn", "mistral": "linear"}[kind]


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_and_hidden_states_match_transformers_on_padded_batch(pair, side):
    _, hf, config, params = pair
    ids, mask = fx.padded_batch(np.random.default_rng(0), [11, 6, 1], total=11, side=side)
    want = fx.hf_logits(hf, ids, mask)
    with torch.no_grad():
        pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
        want_hidden = hf.model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                               position_ids=torch.as_tensor(pos)).last_hidden_state.numpy()
    out = forward(Llama(config), params, jnp.asarray(ids), jnp.asarray(mask), return_hidden=True)
    real = mask.astype(bool)
    assert np.abs(np.asarray(out.logits)[real] - want[real]).max() < 1e-4
    assert np.abs(np.asarray(out.hidden)[real] - want_hidden[real]).max() < 1e-4
    pooled = (want_hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(mean_pool(out.hidden, jnp.asarray(mask)), pooled, atol=1e-4)
    assert np.abs(want[real]).std() > 1.0   # the checks above are not vacuous


def test_padding_is_invisible(checkpoints):
    """A padded row gives the same logits as the same tokens alone (independent of HF);
    Mistral's sliding window makes this the strictest of the three kinds."""
    _, _, config, params = checkpoints("mistral")
    model = Llama(config)
    ids, mask = fx.padded_batch(np.random.default_rng(1), [8, 11, 7], total=11, side="left")
    alone = forward(model, params, jnp.asarray(ids[:1, -8:])).logits
    batched = forward(model, params, jnp.asarray(ids), jnp.asarray(mask)).logits
    np.testing.assert_allclose(batched[0, -8:], alone[0], atol=2e-5)


def test_inputs_embeds_equal_input_ids(checkpoints):
    _, _, config, params = checkpoints("llama")
    model = Llama(config)
    ids = jnp.asarray(np.random.default_rng(3).integers(3, fx.VOCAB, (3, 11)))
    by_ids = forward(model, params, ids).logits
    by_embeds = forward(model, params, inputs_embeds=params["embed_tokens"][ids]).logits
    np.testing.assert_allclose(by_ids, by_embeds, atol=1e-6)


def test_greedy_generation_matches_transformers(pair):
    _, hf, config, params = pair
    ids, mask = fx.padded_batch(np.random.default_rng(4), [8, 3, 5], total=8, side="left")
    n_new = 8
    with torch.no_grad():
        want = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                           max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                           pad_token_id=0, eos_token_id=None).numpy()[:, ids.shape[1]:]
    got = greedy_generate(Llama(config), params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=n_new)
    np.testing.assert_array_equal(np.asarray(got.tokens), want)
    assert len(set(want.ravel().tolist())) > 3   # not a degenerate repeat-one-token model
