"""CaseQ: branching levels against the official slot-axis forward, the C = 1 reduction,
the KL and its prior, and the history-avoiding training negatives."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.config import ConfigError, build_config
from jaxrec.train.task import Clock
from jaxrec.methods.caseq.branching import BranchingLevel, ContextGate, branching_levels, level_gates, path_distribution
from jaxrec.methods.caseq.negatives import HistoryExcludingNegatives, draw_excluding
from jaxrec.methods.caseq.objective import context_kl, mixture_prior, pseudo_sequences
from jaxrec.methods.caseq.task import CaseQTask, without_embedding_dropout
from jaxrec.models.encoder import build_sequence_model
from jaxrec.models.gru4rec import GRULayer

H, L, N_ITEMS = 8, 10, 30
KEY = jax.random.key(0, impl="rbg")


def _inputs(seed=0, batch=4, n_pads=(0, 3, 6, 9)):
    x = np.random.RandomState(seed).randint(1, N_ITEMS + 1, (batch, L))
    for row, p in enumerate(n_pads[:batch]):
        x[row, :p] = 0
    return jnp.asarray(x)


def _caseq(kind, contexts, levels=2, dropout=0.0):
    return build_sequence_model(kind, N_ITEMS, L, hidden=H, n_layers=levels, inner=12, dropout=dropout,
                                make_level=branching_levels(contexts, H), use_positions=True)


def _random_params(model, seed=0, scale=0.3):
    """Random parameters of `model` (LayerNorm scales around 1), without running its init:
    the vmapped init of C branches costs seconds to compile, shapes are all a test needs."""
    shapes = nn.unbox(jax.eval_shape(model.init, KEY, _inputs()))["params"]
    rs = np.random.RandomState(seed)

    def fill(path, leaf):
        centre = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
        return jnp.asarray(centre + scale * rs.randn(*leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _params(kind, contexts, levels=2):
    return _random_params(_caseq(kind, contexts, levels))


def _apply(model, params, x, **kw):
    return model.apply({"params": params}, x, mutable=["intermediates"], **kw)


# ----------------------------------------------------------------------------- C = 1

@pytest.mark.parametrize("kind", ["sasrec", "gru4rec"])
def test_one_context_is_exactly_the_backbone(kind):
    backbone = build_sequence_model(kind, N_ITEMS, L, hidden=H, n_layers=2, inner=12, use_positions=True)
    params = _params(kind, 1)
    plain = {k: v for k, v in params.items() if not k.startswith("levels_")}
    for k in range(2):
        plain[f"levels_{k}"] = params[f"levels_{k}"]["branch_0"]
    assert "gating" not in params["levels_0"]       # a softmax over one branch is 1: no gate parameters
    x = _inputs()
    ours, state = _apply(_caseq(kind, 1), params, x)
    ref = backbone.apply({"params": plain}, x)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    table = np.asarray(params["item_embedding"])
    np.testing.assert_array_equal(np.asarray(ours) @ table.T, np.asarray(ref) @ table.T)
    q = path_distribution(level_gates(state["intermediates"], 2))
    np.testing.assert_array_equal(np.asarray(q[..., 0]), np.asarray(x > 0, np.float32))


# ----------------------------------------------------------------------------- official forward

def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _official_forward(x0, valid, unit, w1, w2, C, K):
    """The official `log2feats` + `weights_product`, slot axis included, in numpy.

    x0 [B, L, H] embedded input; unit(k, j, x) -> [B, L, H]; w1[k] [C, H, H]; w2[k] [C, H, 1].
    """
    B, Lx, Hx = x0.shape
    slots = np.repeat(x0[:, :, None, :], C, axis=2)                      # [B, L, C(slot), H]
    weights_list = []
    for k in range(K):
        logits = np.stack([(np.tanh(slots @ w1[k][i]) @ w2[k][i])[..., 0] for i in range(C)], axis=-1)
        w = _softmax(logits) * valid[:, :, None, None]                    # [B, L, C(slot), C(branch)]
        if k == K - 1:
            w = w.mean(axis=2, keepdims=True)
        weights_list.append(np.swapaxes(w, -1, -2))
        outs = np.stack([unit(k, i, slots[:, :, i, :]) for i in range(C)], axis=-1)   # [B, L, H, C]
        slots = (outs[:, :, None] * w[..., None, :]).sum(-1)
    q = weights_list[0]
    for i in range(K - 1):
        new = weights_list[i + 1]
        for _ in range(i):
            new = np.broadcast_to(new[:, :, None], new.shape[:2] + (C,) + new.shape[2:])
        letters = "abcdefg"[:i + 2]
        q = np.einsum(f"{letters}ij,{letters}jk->{letters}ijk", q, new)
    return slots[:, :, 0], q.reshape(B, Lx, -1)


@pytest.mark.parametrize("kind, levels", [("sasrec", 2), ("gru4rec", 3)])
def test_levels_equal_the_official_slot_axis_forward(kind, levels):
    C = 3
    model, params, x = _caseq(kind, C, levels), _params(kind, C, levels), _inputs(1)
    valid = np.asarray(x > 0)
    h, state = _apply(model, params, x)
    gates = level_gates(state["intermediates"], levels)
    q = np.asarray(path_distribution(gates))

    emb = np.asarray(params["item_embedding"])[np.asarray(x)] * math.sqrt(H) + np.asarray(params["position_embedding"])
    x0 = (emb * valid[..., None]).astype(np.float32)
    unit_module = model.make_unit()

    def unit(k, j, inp):
        p = params[f"levels_{k}"][f"branch_{j}"]
        return np.asarray(unit_module.apply({"params": p}, jnp.asarray(inp, jnp.float32), jnp.asarray(valid)))

    w1 = [np.asarray(params[f"levels_{k}"]["gating"]["hidden_kernel"]) for k in range(levels)]
    w2 = [np.asarray(params[f"levels_{k}"]["gating"]["out_kernel"])[..., None] for k in range(levels)]
    ref_mixed, ref_q = _official_forward(x0, valid, unit, w1, w2, C, levels)
    final = model.apply({"params": params}, x, method=lambda m, x: m.final_norm(jnp.asarray(ref_mixed)))
    np.testing.assert_allclose(np.asarray(h), np.asarray(final), atol=2e-5)
    np.testing.assert_allclose(q, ref_q, atol=1e-6)

    # Gates: distributions at valid positions, zero at pads; q is their outer product.
    for g in gates:
        np.testing.assert_allclose(np.asarray(g).sum(-1), valid.astype(np.float32), atol=1e-6)
    outer = functools.reduce(lambda a, b: (a[..., :, None] * b[..., None, :]).reshape(*a.shape[:-1], -1),
                             [np.asarray(g) for g in gates])
    np.testing.assert_allclose(q, outer, atol=1e-7)
    assert q.shape[-1] == C ** levels and np.all(q[~valid] == 0)
    # Perturbed gates are far from uniform, so the ordering of q is actually tested.
    assert np.abs(q[valid] * C ** levels - 1).max() > 0.5


def _official_rolled_gru(x, valid, p):
    """The official `GRUInferenceLayer.expert_forward` for one branch, in float64 numpy:
    roll each row so its valid items come first, run torch's GRU equations (gate order
    r, z, n) from h0 = 0 over all L steps, roll back, zero the pads. p: one branch's
    parameters (kernel [in, 3, H] = torch weight [3H, in] transposed per gate)."""
    w_ih, w_hh = (np.asarray(p[k], np.float64) for k in ("kernel_ih", "kernel_hh"))
    b_ih, b_hh = (np.asarray(p[k], np.float64) for k in ("bias_ih", "bias_hh"))
    sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v))
    out = np.zeros(x.shape)
    for b in range(x.shape[0]):
        n_valid = int(valid[b].sum())
        rolled, h = np.roll(x[b], n_valid, axis=0), np.zeros(w_hh.shape[-1])
        states = []
        for x_t in rolled:
            gi = np.einsum("i,igh->gh", x_t, w_ih) + b_ih
            gh = np.einsum("i,igh->gh", h, w_hh) + b_hh
            r, z = sigmoid(gi[0] + gh[0]), sigmoid(gi[1] + gh[1])
            h = (1 - z) * np.tanh(gi[2] + r * gh[2]) + z * h
            states.append(h)
        out[b] = np.roll(np.stack(states), x.shape[1] - n_valid, axis=0) * valid[b][:, None]
    return out


def test_gru_levels_equal_the_official_rolled_gru_branches():
    """CaseQ-GRU4Rec against the official formulas end to end: each level's C GRUs read the
    level input and each carries only its own hidden state across steps (rolled, from 0);
    the gate of position t is computed from the level input at t; the outputs are mixed per
    position and the next level reads the mix (0 at pads)."""
    C, levels = 3, 2
    model, params, x = _caseq("gru4rec", C, levels), _params("gru4rec", C, levels), _inputs(2)
    valid = np.asarray(x > 0)
    h, state = _apply(model, params, x)
    q = np.asarray(path_distribution(level_gates(state["intermediates"], levels)))
    emb = np.asarray(params["item_embedding"], np.float64)[np.asarray(x)] * math.sqrt(H)
    x0 = (emb + np.asarray(params["position_embedding"], np.float64)) * valid[..., None]
    w1 = [np.asarray(params[f"levels_{k}"]["gating"]["hidden_kernel"], np.float64) for k in range(levels)]
    w2 = [np.asarray(params[f"levels_{k}"]["gating"]["out_kernel"], np.float64)[..., None] for k in range(levels)]
    ref_mixed, ref_q = _official_forward(
        x0, valid, lambda k, j, inp: _official_rolled_gru(inp, valid, params[f"levels_{k}"][f"branch_{j}"]),
        w1, w2, C, levels)
    mean, var = ref_mixed.mean(-1, keepdims=True), ref_mixed.var(-1, keepdims=True)
    scale, bias = (np.asarray(params["final_norm"][k], np.float64) for k in ("scale", "bias"))
    ref_h = (ref_mixed - mean) / np.sqrt(var + 1e-8) * scale + bias
    # float32 against float64 through 2 x L recurrent steps of O(1) values, then a LayerNorm
    # that divides by the row's std: a few hundred float32 ulps of the O(1) outputs.
    np.testing.assert_allclose(np.asarray(h), ref_h, atol=1e-4 * max(1.0, np.abs(ref_h).max()))
    np.testing.assert_allclose(q, ref_q, atol=1e-5)
    assert np.abs(q[valid] * C ** levels - 1).max() > 0.5      # gates far from uniform: the order is tested


def test_last_only_gives_the_last_row_and_its_gates():
    model, params, x = _caseq("sasrec", 3), _params("sasrec", 3), _inputs(2)
    full, s_full = _apply(model, params, x)
    last, s_last = _apply(model, params, x, last_only=True)
    np.testing.assert_allclose(last, full[:, -1], atol=1e-5)
    q_full = path_distribution(level_gates(s_full["intermediates"], 2))
    q_last = path_distribution(level_gates(s_last["intermediates"], 2))
    np.testing.assert_allclose(q_last[:, 0], q_full[:, -1], atol=1e-6)


def test_gate_init_follows_torch_fans_and_branches_differ():
    Hb, C = 64, 3
    model = build_sequence_model("sasrec", N_ITEMS, L, hidden=Hb, n_layers=1, make_level=branching_levels(C, Hb))
    specs = nn.get_partition_spec(jax.eval_shape(model.init, KEY, _inputs()))["params"]["levels_0"]
    assert sorted(specs) == ["branch_0", "branch_1", "branch_2", "gating"]
    assert specs["gating"]["hidden_kernel"] == jax.sharding.PartitionSpec("expert", "embed", "mlp")
    x, valid = jnp.zeros((1, 2, Hb)), jnp.ones((1, 2), bool)
    p = ContextGate(C, Hb).init(KEY, x, valid)["params"]
    w1, w2 = np.asarray(nn.unbox(p["hidden_kernel"])), np.asarray(nn.unbox(p["out_kernel"]))
    assert w1.shape == (C, Hb, Hb) and w2.shape == (C, Hb)
    assert w1.std() == pytest.approx(math.sqrt(2 / (Hb * Hb + C * Hb)), rel=0.05)
    assert w2.std() == pytest.approx(math.sqrt(2 / (Hb + C)), rel=0.2)
    level = BranchingLevel(make_unit=functools.partial(GRULayer, hidden=4), n_contexts=C, hidden=4)
    p = nn.unbox(level.init(KEY, jnp.zeros((1, 2, 4)), jnp.ones((1, 2), bool))["params"])
    kernels = [np.asarray(p[f"branch_{j}"]["kernel_ih"]) for j in range(C)]
    assert kernels[0].shape == (4, 3, 4) and not np.allclose(kernels[0], kernels[1])   # own init per branch


# ----------------------------------------------------------------------------- KL and prior

def _kl_reference(q, prior, valid):
    rows = []
    for qb, vb in zip(q.reshape(-1, q.shape[-1]), valid.reshape(-1)):
        if vb:
            rows.append(sum(a * (math.log(a) - math.log(b)) for a, b in zip(qb, prior) if a > 0))
    return sum(rows) / len(rows)


def test_context_kl_matches_numpy_with_zero_probabilities_and_has_finite_gradients():
    rs = np.random.RandomState(0)
    q = rs.dirichlet(np.ones(9), size=(3, 5))
    q[0, 1, :4] = 0                                      # exact zeros inside a valid row
    q[0, 1] /= q[0, 1].sum()
    q[2, :2] = 0                                         # pad rows are all-zero
    valid = np.ones((3, 5), bool)
    valid[2, :2] = False
    prior = rs.dirichlet(np.ones(9))
    got = context_kl(jnp.asarray(q, jnp.float32), jnp.asarray(prior, jnp.float32), jnp.asarray(valid))
    assert float(got) == pytest.approx(_kl_reference(q, prior, valid), rel=1e-5)
    assert float(context_kl(jnp.asarray(q), jnp.asarray(q[0, 0]), jnp.ones((3, 5), bool))) >= 0

    g_q, g_p = jax.grad(context_kl, argnums=(0, 1))(jnp.asarray(q, jnp.float32), jnp.asarray(prior, jnp.float32),
                                                  jnp.asarray(valid))
    assert np.all(np.isfinite(g_q)) and np.all(np.isfinite(g_p))
    assert np.all(np.asarray(g_q)[~valid] == 0)
    np.testing.assert_allclose(g_p, -(q * valid[..., None]).sum((0, 1)) / valid.sum() / prior, rtol=1e-4)


def _task(**model):
    raw = {"task": "caseq", "data": {"source": "synthetic", "synthetic": "tiny", "split": "gap", "lapse": 5,
                                     "max_len": L},
           "model": {"hidden": H, "layers": 2, "inner": 12, **model}}
    return CaseQTask(build_config(raw, "test"))


def test_prior_is_the_mean_q_at_the_last_position_of_fresh_pseudo_sequences():
    task = _task(backbone="gru4rec", contexts=3, dropout=0.0, pseudo_sequences=4)
    params = _random_params(task.model)
    key = jax.random.key(5)
    prior_fn = jax.jit(task.prior)
    prior = prior_fn(params, key)
    seqs = pseudo_sequences(jax.random.split(key)[0], 4, L, task.store.n_items)
    assert seqs.shape == (4, L) and int(seqs.min()) >= 1 and int(seqs.max()) <= task.store.n_items
    _, state = _apply(task.model, params, seqs)
    q = np.asarray(path_distribution(level_gates(state["intermediates"], 2)))
    np.testing.assert_allclose(prior, q[:, -1].mean(0), atol=1e-6)
    np.testing.assert_allclose(mixture_prior(jnp.asarray(q)), q[:, -1].mean(0), atol=1e-6)
    assert not np.allclose(prior, prior_fn(params, jax.random.key(6)))   # redrawn per key
    # Gradients reach the prior's parameters through p_hat (it is not detached).
    grad = jax.jit(jax.grad(lambda p: jnp.sum(task.prior(p, key) ** 2)))(params)
    assert np.abs(np.asarray(grad["levels_0"]["gating"]["out_kernel"])).max() > 0


def test_pseudo_sequences_skip_only_the_embedding_dropout():
    # GRU units have no dropout, so in train mode only the embedding dropout is random.
    model = _caseq("gru4rec", 3, dropout=0.5)
    params, x = _params("gru4rec", 3), _inputs(3, n_pads=(0, 0, 0, 0))
    train = lambda: model.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    with without_embedding_dropout():
        skipped = train()
    np.testing.assert_array_equal(skipped, model.apply({"params": params}, x))
    assert not np.allclose(train(), skipped)


def test_loss_is_prediction_plus_weighted_kl_and_trains():
    task = _task(backbone="gru4rec", contexts=3, kl_weight=0.5)
    params = _random_params(task.model, scale=0.1)
    rng = np.random.default_rng(0)
    records, transform = task.train_records(), task.train_transform()
    rows = [transform(records[i], rng) for i in range(8)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(
        lambda p: task.loss(p, {}, {}, batch, jax.random.key(0), Clock.at(0)), has_aux=True))(params)
    assert float(loss) == pytest.approx(float(metrics["prediction_loss"] + 0.5 * metrics["kl"]), rel=1e-6)
    assert float(metrics["kl"]) >= 0 and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    no_kl = _task(backbone="gru4rec", contexts=3, kl_weight=0.0)
    _, (m0, _) = no_kl.loss(params, {}, {}, batch, jax.random.key(0), Clock.at(0))
    assert "kl" not in m0 and not no_kl.uses_prior


def test_cosine_similarity_trains_on_the_scores_it_ranks_with():
    task = _task(backbone="sasrec", contexts=3, kl_weight=0.0, loss="ce", dropout=0.0,
                 similarity="cosine", temperature=0.1)
    params = _random_params(task.model, scale=0.3)
    records = task.train_records()
    assert task.train_transform() is None            # CE needs no negatives from the pipeline
    rows = [records[i] for i in range(4)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in ("inputs", "targets")}
    loss, _ = task.loss(params, {}, {}, batch, jax.random.key(0), Clock.at(0))
    h, _ = task.forward(params, batch["inputs"], deterministic=True, last_only=False)
    h, table = np.asarray(h, np.float64), np.asarray(params["item_embedding"], np.float64)
    scores = (h / np.linalg.norm(h, axis=-1, keepdims=True)) @ (
        table / np.maximum(np.linalg.norm(table, axis=-1, keepdims=True), 1e-6)).T / 0.1
    targets = np.asarray(batch["targets"])
    valid = targets > 0
    expected, _ = task.loss_fn(jnp.asarray(scores, jnp.float32), jnp.eye(scores.shape[-1], dtype=jnp.float32),
                               batch["targets"], None, jax.random.key(1))
    assert valid.any() and float(loss) == pytest.approx(float(expected), rel=1e-4)


# ----------------------------------------------------------------------------- negatives and config

def test_negatives_are_uniform_over_items_outside_the_training_history():
    rng = np.random.default_rng(0)
    excluded = np.array([1, 2, 5, 9, 10])
    draws = draw_excluding(rng, 10, excluded, 20_000)
    allowed = [3, 4, 6, 7, 8]
    counts = np.bincount(draws, minlength=11)
    assert set(np.flatnonzero(counts)) == set(allowed)
    assert np.abs(counts[allowed] / draws.size - 0.2).max() < 0.015   # sd 0.003

    task = _task()
    transform = HistoryExcludingNegatives(task.store, task.split.train_end)
    records = task.train_records()
    for i in range(0, len(records), 7):
        record = transform(records[i], np.random.default_rng(i))
        user = int(record["user"])
        seen = set(task.store.item_ids[task.store.user_offsets[user]:task.split.train_end[user]].tolist())
        has_target = record["targets"] > 0
        assert np.all(record["negatives"][~has_target] == 0)
        assert not seen & set(record["negatives"][has_target].tolist())
        assert record["negatives"][has_target].min() >= 1


@pytest.mark.parametrize("override, key", [
    ({"model": {"contexts": 0}}, "model.contexts"),
    ({"model": {"kl_weight": -1}}, "model.kl_weight"),
    ({"model": {"eval_gaps": [0]}}, "model.eval_gaps"),
])
def test_bad_model_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        build_config({"task": "caseq", **override}, "cfg.yaml")


def test_eval_gaps_need_the_gap_split_and_a_smaller_gap():
    with pytest.raises(ConfigError, match="model.eval_gaps: every gap must be < data.lapse=5"):
        _task(eval_gaps=[5])
    task = _task(eval_gaps=[2])
    sets = {s.name: s for s in task.eval_sets("test")}
    assert list(sets) == ["test", "test_gap", "test_gap2"]
    no_gap, gap2 = task.split.tests["test"], sets["test_gap2"].records.examples
    np.testing.assert_array_equal(gap2.history_end, no_gap.history_end + 2)
    np.testing.assert_array_equal(gap2.targets, task.store.item_ids[no_gap.history_end + 2])
