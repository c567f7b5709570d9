"""chat() end to end on a local HF directory (weights + tokenizer), against transformers' greedy decoding."""
import pytest
from transformers import AutoTokenizer

from jaxrec.chat import chat
from tests.models import llm_fixtures as fx

torch = pytest.importorskip("torch")


def test_chat_on_a_local_directory_matches_transformers(tmp_path):
    hf = fx.make_hf_model("qwen2", seed=11, vocab_size=320)
    fx.save_hf_model(hf, tmp_path)
    fx.save_tiny_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    prompt = "the cat sat."          # no chat template: the plain text is the prompt
    answer = chat(tmp_path, prompt, max_new_tokens=8)

    ids = torch.as_tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          eos_token_id=[1, 2], pad_token_id=0)[0, ids.shape[1]:]
    assert answer == tokenizer.decode(out.tolist(), skip_special_tokens=True).strip()
    assert len(answer) > 3            # the comparison above is between real texts
