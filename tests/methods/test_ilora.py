"""iLoRA pieces against independent references: splicing, prompts, gates (vs a torch
router), the MoE-LoRA scaling, metrics, candidates, the optimizer groups and the loss."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrec.data.store import InteractionStore
from jaxrec.methods.ilora.examples import draw_candidates, examples_from_store, fixed_draws
from jaxrec.eval.metrics import mean_ranking_metrics
from jaxrec.methods.ilora.metrics import candidate_ranks, generation_metrics, generation_outcomes
from jaxrec.methods.ilora.modules import ResNetRouter, apply_gate, build_gate, splice_items
from jaxrec.methods.ilora.optim import ilora_optimizer
from jaxrec.methods.ilora.prompts import PromptEncoder
from jaxrec.methods.ilora.task import ILoRAConfig, lora_config, resolve_compute_dtype
from jaxrec.models.lora import LoRADense, merge_trainable
from tests.methods.ilora_fixtures import item_names, make_tiny_llm


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("llm"))


def _encoder(llm_dir, max_length=256, history=10):
    from jaxrec.weights import load_tokenizer
    return PromptEncoder(load_tokenizer(llm_dir), "artist", 20, history, max_length, pad_id=0)


# --------------------------------------------------------------------------- hybrid prompts
def test_splice_puts_each_projected_vector_exactly_at_its_token():
    rng = np.random.default_rng(0)
    B, T, S, d = 3, 12, 5, 4
    embeds, vectors = rng.normal(size=(B, T, d)), rng.normal(size=(B, S, d))
    slots = np.full((B, T), -1)
    for b in range(B):
        at = rng.choice(T, S, replace=False)
        slots[b, at] = rng.permutation(S)
    out = np.asarray(splice_items(jnp.asarray(embeds), jnp.asarray(slots), jnp.asarray(vectors)))
    for b in range(B):
        for t in range(T):
            expected = vectors[b, slots[b, t]] if slots[b, t] >= 0 else embeds[b, t]
            np.testing.assert_array_equal(out[b, t], expected.astype(np.float32))


def test_hybrid_prompt_with_the_placeholder_embedding_equals_the_text_prompt(tiny_llm):
    encoder = _encoder(tiny_llm)
    tok = encoder.tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["[HistoryEmb]", "[CansEmb]", "[PH]"]})
    ph_id = tok.convert_tokens_to_ids("[PH]")
    names = item_names()
    history, candidates = names[:7], names[10:30]
    enc = encoder.encode(1, history, candidates)
    text_ids = tok(encoder.text(1, history, candidates, "[PH]", "[PH]"))["input_ids"]   # LLaRA's text-only prompt
    assert enc.length == len(text_ids)
    table = np.random.default_rng(1).normal(size=(len(tok), 8)).astype(np.float32)     # rows for added tokens too
    hybrid = splice_items(jnp.asarray(table[enc.tokens])[None], jnp.asarray(enc.slots)[None],
                          jnp.broadcast_to(jnp.asarray(table[ph_id]), (1, 30, 8)))
    np.testing.assert_array_equal(np.asarray(hybrid)[0, :enc.length], table[text_ids])
    # every placeholder follows its own title: slot j ↔ history[j], slot 10 + k ↔ candidates[k]
    titles = {j: history[j] for j in range(7)} | {10 + k: candidates[k] for k in range(20)}
    ids = list(enc.ids)
    at = np.flatnonzero(enc.slots >= 0)
    assert sorted(enc.slots[at].tolist()) == sorted(titles)
    previous = 0
    for t in at:
        assert tok.decode(ids[previous:t]).rstrip(" ").endswith(titles[int(enc.slots[t])])
        previous = t + 1


def test_prompts_drop_the_oldest_history_items_when_too_long(tiny_llm):
    names = item_names()
    full = _encoder(tiny_llm).encode(0, names[:10], names[10:30], target=names[3])
    budget = full.length + full.target.size - 6
    short = _encoder(tiny_llm, max_length=budget).encode(0, names[:10], names[10:30], target=names[3])
    assert short.history_kept < 10 and short.length + short.target.size <= budget
    kept = names[10 - short.history_kept:10]
    assert short.text.startswith("This user has listened to " + kept[0] + " [HistoryEmb]")
    assert sorted(set(short.slots[short.slots >= 0].tolist()) & set(range(10))) == \
        list(range(10 - short.history_kept, 10))                 # kept items keep their slots
    # the target continuation is the joint tokenization's tail: " title\n"
    tok = short_tok = _encoder(tiny_llm).tokenizer
    assert tok.decode(full.target.tolist()) == f" {names[3]}\n"
    assert list(full.ids) + full.target.tolist() == short_tok(full.text + f" {names[3]}\n")["input_ids"]


# --------------------------------------------------------------------------- gates
@pytest.mark.parametrize("kind", ["resnet", "linear", "mlp"])
def test_gate_weights_are_a_distribution_per_sequence(kind):
    gate = build_gate(kind, 4)
    h = jax.random.normal(jax.random.key(0), (6, 64))
    variables = jax.jit(lambda key: gate.init(key, h, train=False))(jax.random.key(1))
    stats = variables.get("batch_stats", {})
    run = jax.jit(apply_gate, static_argnums=(0, 4))
    for train in (True, False):
        g, new_stats = run(gate, variables["params"], stats, h, train)
        assert g.shape == (6, 4)
        np.testing.assert_allclose(np.asarray(g).sum(-1), 1.0, atol=1e-6)
        assert np.all(np.asarray(g) > 0)
        assert (kind == "resnet" and train) == (not _same(new_stats, stats))   # only BN in training moves stats


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _torch_router(flax_params, flax_stats, num_experts):
    """The official router written directly in torch, loaded with the flax weights."""
    import torch
    from torch import nn as tnn
    import torch.nn.functional as F

    def conv(p, stride):
        w = torch.tensor(np.asarray(p["kernel"])).permute(2, 1, 0)          # [k, in, out] → [out, in, k]
        c = tnn.Conv1d(w.shape[1], w.shape[0], 3, stride=stride, padding=1, bias=False)
        c.weight.data = w.contiguous()
        return c

    def bn(p, s):
        b = tnn.BatchNorm1d(p["scale"].shape[0], eps=1e-5, momentum=0.1)
        b.weight.data, b.bias.data = torch.tensor(np.asarray(p["scale"])), torch.tensor(np.asarray(p["bias"]))
        b.running_mean.data, b.running_var.data = torch.tensor(np.asarray(s["mean"])), torch.tensor(np.asarray(s["var"]))
        return b

    class Block(tnn.Module):
        def __init__(self, name, stride):
            super().__init__()
            p, s = flax_params[name], flax_stats[name]
            self.conv1, self.bn1 = conv(p["conv1"], stride), bn(p["bn1"], s["bn1"])
            self.conv2, self.bn2 = conv(p["conv2"], 1), bn(p["bn2"], s["bn2"])
            self.stride = stride

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            c_in, c_out = x.shape[1], out.shape[1]
            if self.stride != 1 or c_in != c_out:
                diff = c_out - c_in
                x = F.pad(x[:, :, ::2], (0, 0, diff // 2, (diff + 1) // 2))
            return F.relu(out + x)

    class Router(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = conv(flax_params["conv1"], 1), bn(flax_params["bn1"], flax_stats["bn1"])
            self.blocks = tnn.Sequential(*[Block(f"stage{s}_block{b}", 2 if s and not b else 1)
                                           for s in range(3) for b in range(3)])
            self.fc = tnn.Linear(64, num_experts)
            self.fc.weight.data = torch.tensor(np.asarray(flax_params["gate"]["kernel"])).T.contiguous()
            self.fc.bias.data = torch.tensor(np.asarray(flax_params["gate"]["bias"]))

        def forward(self, h):
            x = F.relu(self.bn1(self.conv1(h[:, None, :])))
            return F.softmax(self.fc(self.blocks(x).mean(-1)), dim=-1)

    return Router()


def test_resnet_router_matches_a_torch_reference_in_training_and_evaluation():
    import torch
    router = ResNetRouter(4)
    h = jax.random.normal(jax.random.key(0), (5, 64))
    variables = jax.jit(lambda key: router.init(key, h, train=False))(jax.random.key(1))
    params = nn.unbox(variables["params"])
    stats = jax.tree.map(lambda x: x + 0.3 * jax.random.uniform(jax.random.key(2), x.shape), variables["batch_stats"])
    reference = _torch_router(params, stats, 4).double()
    with torch.no_grad():
        for train in (False, True):          # evaluation first: a torch training pass moves the running stats
            reference.train(train)
            expected = reference(torch.tensor(np.asarray(h), dtype=torch.float64)).numpy()
            got, _ = jax.jit(apply_gate, static_argnums=(0, 4))(router, params, stats, h, train)
            np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5)


# --------------------------------------------------------------------------- MoE-LoRA scaling
@pytest.mark.parametrize("experts, scale", [(4, 16.0), (2, 8.0), (1, 4.0)])
def test_official_scaling_alpha_over_expert_rank(experts, scale):
    lora = lora_config(ILoRAConfig(experts=experts, lora_rank=8, lora_alpha=32.0, lora_dropout=0.0))
    assert lora.scale == scale
    layer = LoRADense(6, ("embed", "mlp"), lora=lora)
    x = jax.random.normal(jax.random.key(0), (3, 2, 5))
    g = jax.nn.softmax(jax.random.normal(jax.random.key(1), (3, experts)))
    gates = g if experts > 1 else None
    params = nn.unbox(layer.init(jax.random.key(2), x, gates)["params"])
    params["lora_b"] = jax.random.normal(jax.random.key(3), params["lora_b"].shape)
    y = np.asarray(layer.apply({"params": params}, x, gates), np.float64)
    W, A, Bm = (np.asarray(params[k], np.float64) for k in ("kernel", "lora_a", "lora_b"))
    xn, gn = np.asarray(x, np.float64), np.asarray(g, np.float64)
    r_e = 8 // experts
    delta = sum(gn[:, None, e:e + 1] * (xn @ A[:, e * r_e:(e + 1) * r_e]) @ Bm[e * r_e:(e + 1) * r_e]
                for e in range(experts)) if experts > 1 else xn @ A @ Bm
    np.testing.assert_allclose(y, xn @ W + 32.0 / r_e * delta, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- metrics
def test_generation_metrics_follow_the_official_matching():
    cands = [["Heat", "Heatwave", "Muse"], ["Muse", "Blur", "Oasis"], ["Muse", "Blur", "Oasis"],
             ["A", "B", "C"], ["Muse", "Blur", "Oasis"]]
    outputs = ["heatwave", "  BLUR (band)\nOasis", "Muse and Oasis", "nothing", "Oasis!"]
    targets = [0, 1, 0, 0, 1]
    valid, correct = generation_outcomes(outputs, cands, targets)
    # "heatwave" contains both "heat" and "heatwave" → invalid; line 2 is cut at the newline
    assert valid.tolist() == [False, True, False, False, True]
    assert correct.tolist() == [False, True, False, False, False]
    m = generation_metrics(valid, correct)
    assert m == {"valid_ratio": 0.4, "hr@1_valid": 0.5, "hr@1": 0.2}


def test_candidate_ranks_count_ties_against_the_target():
    scores = np.array([[0.1, 0.5, 0.5, 0.2], [3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    ranks = candidate_ranks(scores, np.array([1, 0, 3]))
    assert ranks.tolist() == [2, 1, 4]
    m = mean_ranking_metrics(ranks, [1, 2], prefix="rank_")
    assert m["rank_hr@1"] == pytest.approx(1 / 3) and m["rank_hr@2"] == pytest.approx(2 / 3)
    assert m["rank_ndcg@2"] == pytest.approx((1 / np.log2(3) + 1) / 3)


# --------------------------------------------------------------------------- candidates
def _examples():
    rng = np.random.default_rng(0)
    seqs = [rng.choice(np.arange(1, 61), size=int(rng.integers(2, 15)), replace=False) for _ in range(40)]
    return examples_from_store(InteractionStore.from_sequences(seqs, n_items=60), max_history=10, min_history=1), seqs


def test_examples_keep_the_last_ten_history_items():
    ex, seqs = _examples()
    for i, s in enumerate(seqs):
        hist = s[:-1][-10:]
        assert ex.lengths[i] == hist.size and ex.targets[i] == s[-1]
        assert ex.history[i, :hist.size].tolist() == hist.tolist() and not ex.history[i, hist.size:].any()
        assert ex.left_padded()[i, 10 - hist.size:].tolist() == hist.tolist()


def test_fixed_candidates_are_seeded_per_example_and_avoid_the_history():
    ex, _ = _examples()
    draws = fixed_draws(ex, 60, 20, 3, seed=5, split="test")
    for i in range(len(ex)):
        c = draws.candidates[i]
        assert len(set(c.tolist())) == 20 and c[draws.target_index[i]] == ex.targets[i]
        others = np.delete(c, draws.target_index[i])
        assert not set(others.tolist()) & (set(ex.history[i, :ex.lengths[i]].tolist()) | {int(ex.targets[i])})
    again = fixed_draws(ex.take(np.arange(7)), 60, 20, 3, seed=5, split="test")
    for field in ("candidates", "target_index", "templates"):
        np.testing.assert_array_equal(getattr(again, field), getattr(draws, field)[:7])
    other = fixed_draws(ex, 60, 20, 3, seed=5, split="valid")
    assert not np.array_equal(other.candidates, draws.candidates)
    assert set(draws.templates.tolist()) == {0, 1, 2} and set(draws.target_index.tolist()) > {0, 19}


def test_training_candidates_are_uniform_outside_the_history():
    rng = np.random.default_rng(0)
    history, counts = np.array([1, 2, 3, 0, 0]), np.zeros(13)
    slots = np.zeros(4)
    for _ in range(3000):
        c, slot = draw_candidates(rng, history, 4, 12, 4)
        assert c[slot] == 4 and len(set(c.tolist())) == 4 and not set(c.tolist()) & {1, 2, 3}
        counts[c] += 1
        slots[slot] += 1
    assert counts[[0, 1, 2, 3]].sum() == 0 and counts[4] == 3000
    free = counts[5:] / 3000                      # 3 negatives over 8 free items
    np.testing.assert_allclose(free, 3 / 8, atol=0.04)
    np.testing.assert_allclose(slots / 3000, 0.25, atol=0.04)


# --------------------------------------------------------------------------- optimizer
def _adam_step(g, p, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    g = g + wd * p
    m, v = (1 - b1) * g, (1 - b2) * g * g
    return p - lr * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)


def test_parameter_groups_follow_torch_adam_and_skip_a_silent_projector():
    schedule = optax.constant_schedule(0.01)
    tx = ilora_optimizer(schedule, {"adapters": dict(factor=1.0, weight_decay=0.0),
                                    "projector": dict(factor=1.0, weight_decay=1e-2, skip_when_silent=True),
                                    "gate": dict(factor=0.3, weight_decay=1e-2)}, b1=0.9, b2=0.999)
    params = {"adapters": {"a": jnp.array([1.0, -2.0])}, "projector": {"w": jnp.array([0.5, 0.25])},
              "gate": {"k": jnp.array([2.0])}}
    grads = {"adapters": {"a": jnp.array([0.1, 0.2])}, "projector": {"w": jnp.array([0.3, -0.1])},
             "gate": {"k": jnp.array([-0.5])}}
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["adapters"]["a"], _adam_step(np.array([0.1, 0.2]), np.array([1.0, -2.0]), 0.01, 0),
                               rtol=1e-6)
    np.testing.assert_allclose(new["projector"]["w"], _adam_step(np.array([0.3, -0.1]), np.array([0.5, 0.25]), 0.01,
                                                                 1e-2), rtol=1e-6)
    np.testing.assert_allclose(new["gate"]["k"], _adam_step(np.array([-0.5]), np.array([2.0]), 0.003, 1e-2), rtol=1e-6)
    # a text-only step: the projector gets an exactly-zero gradient → parameters and Adam state untouched
    silent = dict(grads, projector={"w": jnp.zeros(2)})
    updates, state2 = tx.update(silent, state, new)
    after = optax.apply_updates(new, updates)
    np.testing.assert_array_equal(after["projector"]["w"], new["projector"]["w"])
    jax.tree.map(np.testing.assert_array_equal, state2["projector"][0], state["projector"][0])
    assert not np.array_equal(after["adapters"]["a"], new["adapters"]["a"])


# --------------------------------------------------------------------------- the task's loss
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llm):
    from tests.methods.ilora_fixtures import make_llara_dir, save_untrained_guide
    tmp = tmp_path_factory.mktemp("ilora")
    data = make_llara_dir(tmp / "data")
    return data, tiny_llm, save_untrained_guide(data, tmp / "guide"), tmp


def _task(inputs, train=None, **model):
    from jaxrec.config import build_config
    from jaxrec.methods.ilora.task import ILoRATask
    from jaxrec.sharding import Layout
    from jaxrec.train.runs import open_run
    from tests.methods.ilora_fixtures import ilora_raw_config
    data, llm, guide, tmp = inputs
    raw = ilora_raw_config(data, llm, guide, tmp / "run", **model)
    raw["train"].update(train or {})
    config = build_config(raw, "test")
    upstream = {name: open_run(spec.run_dir, load_frozen=False)
                for name, spec in ILoRATask.upstream(config).items()}
    task = ILoRATask(config, upstream)
    frozen = task.load_frozen(Layout.build((1, 1, 1), devices=jax.devices()[:1]))
    return task, frozen


def _clock(step=0, total=1, micro=0, microbatches=1):
    from jaxrec.train.task import Clock
    return Clock.at(step, total, micro, microbatches)


def _init(task):
    from jaxrec.train.task import Variables
    def init(key):           # jitted: an eager flax init of the LLM is slow
        variables = task.init(key)
        return variables.trainable, variables.state
    trainable, state = jax.jit(init)(jax.random.key(0))
    return Variables(nn.unbox(trainable), state)


def _batch(task, n=4, seed=0):
    source = task.train_records()
    records = [task.train_transform()(source[i], np.random.default_rng([seed, i])) for i in range(n)]
    return {k: jnp.asarray(np.stack([r[k] for r in records])) for k in records[0]}, records


def test_loss_is_the_cross_entropy_of_the_target_title_and_newline(inputs):
    task, frozen = _task(inputs, curriculum=False, lora_dropout=0.0, gate="mlp")
    variables = _init(task)
    params = dict(variables.trainable)
    params["adapters"] = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.key(1), x.shape),
                                      params["adapters"])          # B != 0: the adapters matter
    state = variables.state
    batch, records = _batch(task)
    loss, (metrics, new_state) = jax.jit(task.loss)(params, frozen, state, batch, jax.random.key(2), _clock())

    # reference: the full-sequence logits of the same hybrid embeddings, every target token scored
    guide = task.guide

    @jax.jit
    def gates_and_projections(params, history, items):
        h = guide.model.apply({"params": guide.params}, history, deterministic=True, last_only=True)
        gates, _ = apply_gate(task.gate, params["gate"], state["gate_stats"], h, True)
        e = jnp.take(guide.params["item_embedding"], items, axis=0)
        return gates, task.projector.apply({"params": params["projector"]}, e)

    gates, projected = gates_and_projections(params, batch["history"], batch["items"])
    projected = np.asarray(projected)
    llm = merge_trainable(params["adapters"], frozen["llm"])
    embeds = np.asarray(llm["embed_tokens"])[np.asarray(batch["tokens"])]
    for b, record in enumerate(records):
        for t in np.flatnonzero(record["slots"] >= 0):
            embeds[b, t] = projected[b, record["slots"][t]]
    full = jax.jit(lambda p, e, m, g: task.model.apply({"params": p}, inputs_embeds=e, attention_mask=m,
                                                       lora_gates=g).logits)
    logits = np.asarray(full(llm, jnp.asarray(embeds), batch["mask"], gates), np.float64)
    total, count = 0.0, 0
    titles = task.builder.titles
    for b, record in enumerate(records):
        length, n = int(record["mask"].sum()), int(record["target_mask"].sum())
        target_tokens = record["tokens"][length - n:length]
        title = titles[int(task.train_records()[b]["target"])]
        assert task.tokenizer.decode(target_tokens.tolist()) == f" {title}\n"
        for t in range(length - n, length):
            row = logits[b, t - 1]
            total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[record["tokens"][t]]
            count += 1
    assert float(loss) == pytest.approx(total / count, rel=1e-4)
    assert float(metrics["hybrid"]) == 1.0 and set(new_state) == {"gate_stats"} and "weight" not in metrics


@pytest.mark.slow   # compiles a second, accumulating train step
def test_accumulated_micro_batches_average_their_losses_as_the_official_code(inputs):
    from jaxrec.train.session import make_train_step
    task, frozen = _task(inputs, curriculum=False, lora_dropout=0.0, gate="linear")
    variables = _init(task)
    params = dict(variables.trainable)
    params["adapters"] = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.key(1), x.shape),
                                      params["adapters"])
    batch, _ = _batch(task, n=4)
    halves = [jax.tree.map(lambda a: a[i::2], batch) for i in (0, 1)]
    loss = jax.jit(task.loss)
    losses = [float(loss(params, frozen, variables.state, h, jax.random.key(3), _clock())[0]) for h in halves]
    tx = optax.sgd(0.0)
    from jaxrec.train.state import TrainState
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), model_state=variables.state)
    step = jax.jit(make_train_step(task, tx, optax.constant_schedule(0.0), 1, microbatches=2))
    new_state, metrics = step(state, frozen, batch, jax.random.key(3))
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)   # a mean of token means


def test_curriculum_rises_from_text_to_hybrid_prompts(inputs):
    task, frozen = _task(inputs, train={"steps": 100}, experts=1, gate="linear")
    variables = _init(task)
    batch, _ = _batch(task, n=2)
    total = 100                       # train.steps; the trainer hands the loss its Clock
    loss = jax.jit(task.loss)
    hybrid = lambda step: np.mean([float(loss(variables.trainable, frozen, variables.state, batch,
                                              jax.random.key(k), _clock(step, total))[1][0]["hybrid"])
                                   for k in range(40)])
    assert hybrid(0) <= 0.1 and hybrid(total - 1) == 1.0 and 0.25 < hybrid(total // 2) < 0.75
    # micro-batches advance the clock within a step (official: per collated micro-batch)
    assert float(_clock(1, 2, micro=1, microbatches=2).progress()) == 1.0
    assert float(_clock(0, 2, micro=1, microbatches=2).progress()) == 0.5


def test_text_only_prompts_have_no_projector_and_always_use_the_placeholder_vector(inputs):
    task, frozen = _task(inputs, prompt="text", experts=1, report_baselines=[], guide="")
    variables = _init(task)
    assert set(variables.trainable) == {"adapters"} and task.guide is None
    batch, records = _batch(task, n=2)
    _, embeds, gates, _ = task.prompt_embeddings(variables.trainable, frozen, {}, batch, tuned=True, hybrid=True,
                                                 train=False)
    at = np.asarray(batch["slots"]) >= 0
    np.testing.assert_array_equal(np.asarray(embeds)[at], np.broadcast_to(np.asarray(frozen["ph"]), (at.sum(), 32)))
    assert gates is None


# --------------------------------------------------------------------------- MovieLens, the LLaRA way
def test_movielens_rows_follow_the_llara_construction(tmp_path):
    from jaxrec.data.llara import read_llara
    from jaxrec.methods.ilora.movielens import write_llara_dir
    rng = np.random.default_rng(0)
    sequences, times = [], []
    for u in range(20):
        n = int(rng.integers(3, 15))
        sequences.append(rng.choice(np.arange(1, 41), n, replace=False))
        times.append(np.sort(rng.integers(0, 1000, n)) + 1000 * u)        # user u's last rating is the u-th latest
    store = InteractionStore.from_sequences(sequences, timestamps=times, n_items=40)
    titles = np.array([""] + [f"Movie {i}, The" for i in range(1, 41)])
    store = dataclasses.replace(store, item_columns={"title": titles})
    counts = write_llara_dir(store, tmp_path / "ml", max_history=4)
    assert counts == {"train": sum(len(s) - 1 for s in sequences[:16]), "val": 2, "test": 2}
    splits = read_llara(tmp_path / "ml")
    rows = lambda s: [s.sequence(u).tolist() for u in range(s.n_users)]
    expected_train = [list(s[max(0, t - 4):t + 1]) for s in sequences[:16] for t in range(1, len(s))]
    assert rows(splits["train"]) == expected_train                  # LLaRA prefixes of the earliest 80% of users
    assert rows(splits["test"]) == [list(s[-5:]) for s in sequences[18:]]    # the latest 10%: last item + 4 before
    assert rows(splits["valid"]) == [list(s[-5:]) for s in sequences[16:18]]
    assert splits["train"].item_columns["title"][1] == "The Movie 1"   # cleaned once; id 0 on disk = item 1


def test_movielens_1m_files_build_a_llara_directory(tmp_path, capsys):
    """GroupLens ML-1M input (ratings.dat + movies.dat, Latin-1 titles) through the command."""
    from jaxrec.data.llara import read_llara
    from jaxrec.methods.ilora.movielens import main as build
    src = tmp_path / "ml-1m"
    src.mkdir()
    ratings = [(u, m, 1000 * u + t) for u in range(1, 11) for t, m in enumerate((u % 3 + 1, 4, 5, 6, 8 if u == 1 else 7))]
    (src / "ratings.dat").write_text("".join(f"{u}::{m}::4::{ts}\n" for u, m, ts in reversed(ratings)))
    movies = "".join(f"{m}::Movie {m}, The (1999)::Drama\n" for m in range(1, 8)) + "8::Caf\xe9 (2000)::Comedy\n"
    (src / "movies.dat").write_bytes(movies.encode("latin-1"))
    assert build([str(src), str(tmp_path / "out")]) == 0
    splits = read_llara(tmp_path / "out")
    assert splits["train"].n_users == 8 * 4             # users 1-8 rated last earliest: 4 prefixes each
    assert splits["test"].sequence(0).tolist()[-1] == splits["test"].item_columns["title"].tolist().index("The Movie 7")
    titles = set(splits["train"].item_columns["title"][1:])
    assert "The Movie 4" in titles and "Caf\xe9" in titles
    assert build([str(tmp_path / "out"), str(tmp_path / "again")]) == 2
    assert "no timestamped ratings" in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_auto_compute_dtype_is_float32_on_cpu_and_bfloat16_on_accelerators():
    assert resolve_compute_dtype("auto", "cpu") == "float32"
    assert resolve_compute_dtype("auto", "gpu") == "bfloat16" and resolve_compute_dtype("auto", "tpu") == "bfloat16"
    assert resolve_compute_dtype("bfloat16", "cpu") == "bfloat16"      # an explicit choice is kept
    assert resolve_compute_dtype("auto") == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
