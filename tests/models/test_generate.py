"""KV-cache decoding: cache vs full forward, padding sides, stops, token masks, beams, scoring."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models.generate import beam_search, decode_step, greedy_generate, prefill, score_continuations
from jaxrec.models.llama import Llama, forward, init_adapters, unstack_layers
from jaxrec.models.lora import ALL_PROJECTIONS, LoraConfig, merge_lora
from jaxrec.weights import load_pretrained
from tests.models import llm_fixtures as fx

torch = pytest.importorskip("torch")
N_NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = fx.make_hf_model("llama", seed=3)
    config, params = load_pretrained(fx.save_hf_model(hf, tmp_path_factory.mktemp("gen")))
    return hf, Llama(config), params


def prompts(side, seed=0):
    ids, mask = fx.padded_batch(np.random.default_rng(seed), [7, 3, 5], total=7, side=side)
    return jnp.asarray(ids), jnp.asarray(mask)


def left_pad_concat(ids, mask, new, width=None):
    """Per row: real prompt tokens then `new`, left-padded (the uncached reference layout)."""
    rows = [np.concatenate([np.asarray(i)[np.asarray(m) == 1], n]) for i, m, n in zip(ids, mask, new)]
    width = width or max(len(r) for r in rows)
    out_ids, out_mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        out_ids[b, width - len(r):], out_mask[b, width - len(r):] = r, 1
    return jnp.asarray(out_ids), jnp.asarray(out_mask)


@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_decoding_equals_full_forward(tiny, side):
    _, model, params = tiny
    ids, mask = prompts(side)
    new = np.random.default_rng(1).integers(3, fx.VOCAB, (3, 3)).astype(np.int32)
    cache, logits = prefill(model, params, ids, mask, max_length=ids.shape[1] + 3)
    steps = [logits]
    for t in range(2):
        cache, logits = decode_step(model, params, cache, jnp.asarray(new[:, t]))
        steps.append(logits)
    full_ids, full_mask = left_pad_concat(ids, mask, new[:, :2], width=ids.shape[1] + 2)
    full = forward(model, params, full_ids, full_mask).logits
    for t, got in enumerate(steps):
        np.testing.assert_allclose(got, full[:, full_ids.shape[1] - 3 + t], atol=2e-5)


def test_the_unstacked_model_decodes_like_the_scanned_one(tiny):
    """Generation's decode loop runs one module per layer on per-layer weights."""
    _, model, params = tiny
    ids, mask = prompts("left")
    fresh_cache = lambda: prefill(model, params, ids, mask, max_length=ids.shape[1] + 1)[0]   # decode_step donates it
    tokens = jnp.asarray([5, 6, 7], jnp.int32)
    _, want = decode_step(model, params, fresh_cache(), tokens)
    step_model, step_params = unstack_layers(model, params)
    assert "layers" not in step_params and f"layers_{model.config.num_layers - 1}" in step_params
    _, got = decode_step(step_model, step_params, fresh_cache(), tokens)
    # The same float32 operations on the same values: only fusion may differ, ulps of the logits.
    np.testing.assert_allclose(got, want, rtol=0, atol=64 * np.finfo(np.float32).eps * float(jnp.max(jnp.abs(want))))


def test_greedy_is_padding_side_invariant_and_accepts_embeddings(tiny):
    _, model, params = tiny
    left = greedy_generate(model, params, *prompts("left"), max_new_tokens=N_NEW)
    right = greedy_generate(model, params, *prompts("right"), max_new_tokens=N_NEW)
    np.testing.assert_array_equal(left.tokens, right.tokens)
    ids, mask = prompts("left")
    embeds = greedy_generate(model, params, None, mask, inputs_embeds=params["embed_tokens"][ids],
                             max_new_tokens=N_NEW)
    np.testing.assert_array_equal(left.tokens, embeds.tokens)
    np.testing.assert_array_equal(left.lengths, N_NEW)


def test_repeated_calls_do_not_recompile(tiny):
    _, model, params = tiny
    ids, mask = prompts("left")
    greedy_generate(model, params, ids, mask, max_new_tokens=N_NEW)
    before = greedy_generate._cache_size()
    greedy_generate(model, params, ids + 1, mask, max_new_tokens=N_NEW)
    assert greedy_generate._cache_size() == before


def test_stop_tokens_end_a_row_and_pad_the_rest(tiny):
    _, model, params = tiny
    ids, mask = prompts("left")
    free = np.asarray(greedy_generate(model, params, ids, mask, max_new_tokens=N_NEW).tokens)
    stop = int(free[0, 2])
    first_stop = [int(np.argmax(r == stop)) if stop in r else None for r in free]
    out = greedy_generate(model, params, ids, mask, max_new_tokens=N_NEW, stop_token_ids=(stop,), pad_token_id=0)
    for b, at in enumerate(first_stop):
        row, n = np.asarray(out.tokens[b]), int(out.lengths[b])
        if at is None:
            np.testing.assert_array_equal(row, free[b])
            assert n == N_NEW
        else:
            np.testing.assert_array_equal(row[:at + 1], free[b, :at + 1])
            assert np.all(row[at + 1:] == 0) and n == at + 1


ALLOWED = np.arange(fx.VOCAB) % 7 == 3


def only_allowed(generated, step):
    return jnp.broadcast_to(jnp.asarray(ALLOWED), (generated.shape[0], fx.VOCAB))


def test_token_mask_hook_constrains_greedy(tiny):
    _, model, params = tiny
    ids, mask = prompts("left")
    out = greedy_generate(model, params, ids, mask, max_new_tokens=N_NEW, token_mask_fn=only_allowed)
    assert ALLOWED[np.asarray(out.tokens)].all()
    # brute force: argmax over the allowed tokens of the uncached model, step by step
    seq = np.zeros((3, 0), np.int32)
    for _ in range(N_NEW):
        full_ids, full_mask = left_pad_concat(ids, mask, seq, width=ids.shape[1] + N_NEW)
        logits = np.asarray(forward(model, params, full_ids, full_mask).logits[:, -1])
        seq = np.concatenate([seq, np.argmax(np.where(ALLOWED, logits, -np.inf), -1)[:, None]], 1).astype(np.int32)
    np.testing.assert_array_equal(out.tokens, seq)


def reference_beam_search(hf, ids, mask, num_beams, steps, stop):
    """Plain-Python beam search scored by the transformers model (full forward, no cache);
    each step scores every live beam of every prompt in one left-padded batch."""
    prompts = [row[m == 1].tolist() for row, m in zip(np.asarray(ids), np.asarray(mask))]
    beams = [[([], 0.0, False)] for _ in prompts]
    for _ in range(steps):
        live = [(b, i) for b, row in enumerate(beams) for i, (_, _, done) in enumerate(row) if not done]
        seqs = [prompts[b] + beams[b][i][0] for b, i in live]
        width = max(map(len, seqs))
        batch, batch_mask = np.zeros((len(seqs), width), np.int64), np.zeros((len(seqs), width), np.int64)
        for r, seq in enumerate(seqs):
            batch[r, width - len(seq):], batch_mask[r, width - len(seq):] = seq, 1
        last = fx.hf_logits(hf, batch, batch_mask)[:, -1].astype(np.float64)
        logp = last - last.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        new = []
        for b, row in enumerate(beams):
            cands = []
            for i, (toks, score, done) in enumerate(row):
                if done:
                    cands.append((toks + [0], score, True))
                    continue
                lp = logp[live.index((b, i))]
                cands += [(toks + [int(v)], score + lp[v], int(v) == stop) for v in np.argsort(-lp)[:num_beams]]
            new.append(sorted(cands, key=lambda c: -c[1])[:num_beams])
        beams = new
    return beams


def test_beam_search_matches_reference(tiny):
    hf, model, params = tiny
    ids, mask = prompts("left", seed=5)
    greedy = np.asarray(greedy_generate(model, params, ids, mask, max_new_tokens=N_NEW).tokens)
    stop = int(greedy[1, 1])
    out = beam_search(model, params, ids, mask, num_beams=3, max_new_tokens=N_NEW, stop_token_ids=(stop,),
                      length_penalty=0.0)
    ref = reference_beam_search(hf, ids, mask, 3, N_NEW, stop)
    for b in range(3):
        for w in range(3):
            toks, score, _ = ref[b][w]
            np.testing.assert_array_equal(out.tokens[b, w], toks)
            np.testing.assert_allclose(out.scores[b, w], score, rtol=1e-4, atol=1e-4)
    assert np.asarray(out.lengths).min() < N_NEW   # the stop token ended some beam


def test_score_continuations_equals_full_forward(tiny):
    _, model, params = tiny
    ids, mask = prompts("right", seed=7)
    rng = np.random.default_rng(8)
    K, C = 4, 3
    cont = rng.integers(3, fx.VOCAB, (3, K, C)).astype(np.int32)
    cont_mask = (np.arange(C)[None, None] < rng.integers(1, C + 1, (3, K, 1))).astype(np.int32)
    got = score_continuations(model, params, jnp.asarray(cont), jnp.asarray(cont_mask), ids, mask)
    # reference: every prompt+continuation as its own left-padded row of one uncached batch
    rows = [(b, k) for b in range(3) for k in range(K)]
    lens = [int(cont_mask[b, k].sum()) for b, k in rows]
    full_ids, full_mask = left_pad_concat([ids[b] for b, _ in rows], [mask[b] for b, _ in rows],
                                          [cont[b, k, :n] for (b, k), n in zip(rows, lens)])
    logp = np.asarray(jax.nn.log_softmax(forward(model, params, full_ids, full_mask).logits))
    L = full_ids.shape[1]
    for i, ((b, k), n) in enumerate(zip(rows, lens)):
        want = sum(logp[i, L - n - 1 + j, cont[b, k, j]] for j in range(n))
        np.testing.assert_allclose(got.total[b, k], want, rtol=1e-4, atol=1e-4)
        assert np.all(np.asarray(got.per_token[b, k, n:]) == 0)


def test_moe_gates_flow_through_generation_and_scoring(tiny):
    """Generating with gate g equals generating with the adapter merged for g."""
    _, base_model, base_params = tiny
    lora = LoraConfig(rank=4, alpha=8.0, num_experts=2, targets=ALL_PROJECTIONS)
    model = Llama(base_model.config.with_lora(lora))
    params = init_adapters(model, base_params, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.2 if p[-1].key == "lora_b" else x, params)
    gates = jnp.asarray([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], jnp.float32)
    ids, mask = prompts("left")
    out = greedy_generate(model, params, ids, mask, lora_gates=gates, max_new_tokens=N_NEW)
    cont = jnp.asarray(np.random.default_rng(2).integers(3, fx.VOCAB, (3, 4, 3)))   # shapes as above: no recompile
    scored = score_continuations(model, params, cont, jnp.ones_like(cont), ids, mask, lora_gates=gates)
    for b in range(3):
        merged = merge_lora(params, lora, gates[b])
        want = greedy_generate(base_model, merged, ids, mask, max_new_tokens=N_NEW)
        np.testing.assert_array_equal(out.tokens[b], want.tokens[b])
        want = score_continuations(base_model, merged, cont, jnp.ones_like(cont), ids, mask)
        np.testing.assert_allclose(scored.total[b], want.total[b], rtol=1e-4, atol=1e-4)
