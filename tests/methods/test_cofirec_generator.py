"""`task: cofirec` (the semantic-ID generator) on the planted-hierarchy tiny set.

The code table is hand-made from the planted truth (topic / sub-topic / popularity rank
within the sub-topic), so these tests do not depend on the tokenizer. The data: a user's
next item stays in the sub-topic with probability 0.54 and in the topic with 0.9, so a
generator that reads the history beats popularity by a wide margin; the runs here are
~150 steps of a one-layer model.

Beam width 32 exceeds the 30 items (and every level's 2-3 valid codes), so the beam
search is exhaustive: its lists hold every item, dead beams come last, and its top-10
must equal the exact scorer's (teacher-forced log-likelihood of all 30 items).
"""
import json

import jax
import numpy as np
import optax
import pytest
import yaml

from jaxrec.cli import main
from jaxrec.config import ConfigError, build_config
from jaxrec.data.splits import EvalExamples
from jaxrec.data.synthetic_hierarchy import HierarchyConfig, hierarchy_world
from jaxrec.methods.cofirec.generator import GeneratorTask, beam_search_items
from jaxrec.methods.cofirec.generator_eval import run_search
from jaxrec.train import pipeline
from jaxrec.train.evaluation import Evaluator
from jaxrec.train.session import Session, make_train_step
from jaxrec.train.task import Clock
from tests.helpers import PLAIN_SAFETENSORS_READER, results

TINY_MODEL = {"d_model": 16, "d_kv": 8, "d_ff": 32, "heads": 2, "layers": 1, "decoder_layers": 1, "dropout": 0.0,
              "max_history": 6, "beam": 32, "exact_users": 24}


def planted_codes() -> np.ndarray:
    """[30, 3]: (topic, sub-topic within topic, popularity rank within sub-topic) per item index - 1."""
    world = hierarchy_world(HierarchyConfig.tiny())
    cfg = world.config
    codes = np.zeros((cfg.n_items, 3), np.int64)
    for g, items in enumerate(world.subtopic_items):
        codes[items - 1, 0] = g // cfg.subtopics_per_topic
        codes[items - 1, 1] = g % cfg.subtopics_per_topic
        codes[items - 1, 2] = np.arange(len(items))
    return codes


@pytest.fixture(scope="module")
def codes_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("codes") / "planted.npy"
    np.save(path, planted_codes())
    return path


def raw_config(codes_path, run_dir="unused", **model):
    return {"task": "cofirec", "run": {"dir": str(run_dir)},
            "data": {"source": "synthetic", "synthetic": "hierarchy_tiny", "train_windows": "chunks"},
            "model": {"semantic_ids": str(codes_path), **TINY_MODEL, **model},
            "train": {"batch_size": 64, "steps": 150, "lr": 0.01, "warmup_steps": 10, "eval_every": 0,
                      "log_every": 50, "progress": False},
            "eval": {"ks": [5, 10], "batch_size": 64},
            "checkpoint": {"every": 0, "keep": 1}}


def train_run(tmp, codes_path, **model):
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw_config(codes_path, tmp / "run", **model)))
    assert main(["train", str(path)]) == 0
    return results(tmp / "run")


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, codes_file):
    """T5 trained through the CLI on the default mesh (8 simulated devices, data-parallel).
    History exclusion is checked by the mesh test (one compiled search fewer here)."""
    return train_run(tmp_path_factory.mktemp("t5"), codes_file, both_exclusions=False)


def _check_run(report, exact: bool):
    test, popularity = report["tests"]["test"], report["baselines"]["popularity"]["test"]
    assert "trie-constrained beam search, beam 32" in report["protocols"]["test"]
    assert "history included" in report["protocols"]["test"]
    # Planted structure: the generator must clearly beat popularity (observed ~1.7x).
    assert test["ndcg@10"] > 1.3 * popularity["ndcg@10"]
    assert test["recall@10"] == test["hr@10"]
    assert test["valid_ratio"] == 1.0 and test["duplicate_rate"] == 0.0
    if exact:
        assert test["exact_users"] == 24
        assert test["beam_exact_disagreement@10"] == 0.0     # beam 32 >= 30 items: the search is exhaustive


def test_t5_generator_trains_beats_popularity_and_agrees_with_the_exact_scorer(t5_run):
    _check_run(t5_run, exact=True)


@pytest.mark.slow      # a second compiled model (~40 s on 2 cores)
def test_decoder_only_generator_trains_and_beats_popularity(tmp_path):
    _check_run(train_run(tmp_path, planted_codes_file(tmp_path), backbone="decoder", exact_users=0,
                         both_exclusions=False), exact=False)


def planted_codes_file(tmp):
    path = tmp / "planted.npy"
    np.save(path, planted_codes())
    return path


# --------------------------------------------------------------------------- records
def test_t5_records_are_every_training_prefix_and_streams_weight_only_targets(codes_file):
    task = GeneratorTask(build_config(raw_config(codes_file, max_history=3), "test"))
    store, train_end, K = task.store, task.split.train_end, 3
    records = task.train_records()
    n_targets = sum(max(int(e - s) - 1, 0) for s, e in zip(store.user_offsets[:-1], train_end))
    assert len(records) == n_targets
    first_user = store.item_ids[store.user_offsets[0]:train_end[0]]
    for t in range(1, len(first_user)):
        r = records[t - 1]
        assert np.array_equal(r["target"], task.tokens[first_user[t]])
        history = first_user[max(0, t - 3):t]
        want = np.concatenate([np.zeros((3 - len(history), K), np.int32), task.tokens[history]]).reshape(-1)
        assert np.array_equal(r["history"], want)
    assert np.all(task.tokens[1:] >= 2) and np.all(task.tokens[0] == 0)       # pad / bos never name a code

    stream = GeneratorTask(build_config(raw_config(codes_file, max_history=3, backbone="decoder"), "test"))
    s = stream.train_records()[0]
    items = np.asarray(s["stream"]).reshape(4, K)
    real = items[:, 0] != 0
    # Every real slot after the first real one is a target, all K of its codes.
    want = np.repeat(real & np.concatenate([[False], real[:-1]]), K).astype(np.float32)
    assert np.array_equal(s["weight"], want)


def test_level_ablations_and_letter_index(codes_file, tmp_path):
    base = GeneratorTask(build_config(raw_config(codes_file), "test"))
    rev = GeneratorTask(build_config(raw_config(codes_file, reverse_levels=True), "test"))
    assert np.array_equal(rev.ids.item_codes, base.ids.item_codes[:, ::-1])
    # Dropping the finest level makes rows collide: dedup "auto" appends TIGER's dedup level.
    dropped = GeneratorTask(build_config(raw_config(codes_file, drop_levels=["level3"]), "test"))
    assert dropped.ids.level_names == ("level1", "level2", "dedup") and dropped.ids.is_unique()
    letter = tmp_path / "tiny.index.json"
    codes = planted_codes()
    letter.write_text(json.dumps({str(i): [f"<{c}_{v}>" for c, v in zip("abc", row)]
                                  for i, row in enumerate(codes)}))     # key = item id - 1
    from_json = GeneratorTask(build_config(raw_config(letter), "test"))
    assert np.array_equal(from_json.ids.item_codes, base.ids.item_codes)
    assert from_json.ids.level_names == ("letter_a", "letter_b", "letter_c")


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("model,eval_,key", [
    ({"beam": 0}, {}, "model.beam"),
    ({"beam": 5}, {}, "model.beam"),                  # narrower than eval.ks' 10
    ({"max_history": 0}, {}, "model.max_history"),
    ({"beam": 40}, {"ks": [5, 40]}, "eval.ks"),        # K = 40 > 30 items
    ({"drop_levels": ["cf"]}, {}, "model.drop_levels"),
    ({"drop_levels": ["level3"], "dedup": False}, {}, "model.dedup"),
    ({"semantic_ids": ""}, {}, "model.semantic_ids"),
    ({"valid_users": -1}, {}, "valid_users"),
])
def test_bad_input_is_a_one_line_error_naming_the_key(codes_file, model, eval_, key):
    raw = raw_config(codes_file, **model)
    raw["eval"].update(eval_)
    with pytest.raises(ConfigError) as err:
        GeneratorTask(build_config(raw, "bad.yaml"))
    assert key in str(err.value) and "\n" not in str(err.value)


def test_table_rows_must_match_the_item_vocabulary_and_histories_must_not_be_empty(codes_file, tmp_path):
    short = tmp_path / "short.npy"
    np.save(short, planted_codes()[:-1])
    with pytest.raises(ConfigError, match="model.semantic_ids: .*29 rows, but the data has 30 items"):
        GeneratorTask(build_config(raw_config(short), "bad.yaml"))
    task = GeneratorTask(build_config(raw_config(codes_file), "bad.yaml"))
    start = task.store.user_offsets[:2]
    empty = EvalExamples(users=np.array([0, 1]), history_end=start + np.array([1, 0]), targets=np.array([1, 2]))
    with pytest.raises(ConfigError, match="data.min_length: 1 valid examples have an empty history"):
        task._eval_set("valid", empty)


def test_valid_users_is_a_fixed_subset_of_validation_and_test_keeps_everyone(codes_file):
    full = GeneratorTask(build_config(raw_config(codes_file), "c.yaml")).split
    subset = GeneratorTask(build_config(raw_config(codes_file, valid_users=7), "c.yaml"))
    chosen = subset.eval_sets("valid")[0].records.records.examples
    assert len(chosen) == 7 and len(subset.eval_sets("test")[0].records) == len(full.tests["test"])
    everyone = set(zip(full.valid.users.tolist(), full.valid.history_end.tolist(), full.valid.targets.tolist()))
    picked = list(zip(chosen.users.tolist(), chosen.history_end.tolist(), chosen.targets.tolist()))
    assert set(picked) <= everyone and len(set(picked)) == 7
    again = GeneratorTask(build_config(raw_config(codes_file, valid_users=7), "c.yaml"))
    assert again.eval_sets("valid")[0].records.records.examples.users.tolist() == chosen.users.tolist()


# --------------------------------------------------------------------------- length buckets
@pytest.mark.parametrize("backbone", ["t5", "decoder"])
def test_length_buckets_cut_only_padding_the_loss_and_the_beam_lists_are_unchanged(codes_file, backbone):
    import flax.linen as nn
    raw = raw_config(codes_file, backbone=backbone)
    raw["data"]["length_buckets"] = 3
    task = GeneratorTask(build_config(raw, "buckets"))
    plain = GeneratorTask(build_config(raw_config(codes_file, backbone=backbone), "plain"))
    assert plain.train_buckets() is None
    buckets = task.train_buckets()
    assert buckets.widths == ((2, 4, 6) if backbone == "t5" else (3, 5, 7))
    records = task.train_records()
    params = nn.unbox(task.init(jax.random.key(0)).trainable)
    loss = jax.jit(lambda p, b: task.loss(p, {}, {}, b, jax.random.key(1), Clock.at(0))[0])
    for bucket, width in enumerate(buckets.widths[:2]):
        rows = np.flatnonzero(buckets.bucket_of == bucket)[:16]
        full = {k: np.stack([records[int(i)][k] for i in rows]) for k in records[0]}
        cut = buckets.cut(full, width)
        assert next(iter(cut.values())).shape[1] < next(iter(full.values())).shape[1]
        want, got = float(loss(params, full)), float(loss(params, cut))
        # Same terms, masked keys dropped: float32 sums over ~100 terms regrouped (a few ulps each).
        assert got == pytest.approx(want, rel=1e-5)

    # Evaluation in bucket order, each batch cut: the same lists as in record order at full width.
    layout = Session(build_config(raw, "buckets")).layout
    test = task.eval_sets("test")[0]
    trie = jax.device_put(task.trie, layout.replicated())
    with layout.activate():
        got, _ = run_search(task, test.records, params, trie.tables, Evaluator(task, layout, 16), exclude=True)
        want, _ = run_search(plain, plain.eval_sets("test")[0].records, params, trie.tables,
                             Evaluator(plain, layout, 16), exclude=True)
    assert len(set(task.length_buckets(test.records).bucket_of.tolist())) > 1     # several widths were searched
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow      # three short training runs (~30 s on 2 cores)
def test_bucketed_training_resumes_into_the_same_batches_and_losses(codes_file, tmp_path):
    from jaxrec.train.reporting import read_metrics
    from jaxrec.train.trainer import train

    def run(name, stop=None):
        raw = raw_config(codes_file, tmp_path / name, exact_users=0, both_exclusions=False)
        raw["data"]["length_buckets"] = 3
        raw["train"].update(steps=12, log_every=1)
        raw["checkpoint"]["every"] = 6
        return train(build_config(raw, "resume"), stop_at_step=stop)

    def losses(name):
        return {r["step"]: r["loss"] for r in read_metrics(tmp_path / name) if r["kind"] == "train"}

    run("whole")
    assert run("split", stop=6).steps == 6
    run("split")
    whole, split = losses("whole"), losses("split")
    assert sorted(split) == list(range(1, 13))
    # Same program, same batches after the restored iterator: equal up to the order XLA sums in.
    assert [split[s] for s in range(1, 13)] == pytest.approx([whole[s] for s in range(1, 13)], rel=1e-6)


@pytest.mark.parametrize("backbone", ["t5", "decoder"])
def test_beam_search_with_per_beam_caches_returns_the_lists_of_recomputing_every_prefix(codes_file, backbone):
    import flax.linen as nn

    from jaxrec.eval.beam_search import constrained_beam_search
    from jaxrec.methods.cofirec import generator_models as gm
    task = GeneratorTask(build_config(raw_config(codes_file, backbone=backbone), "cache"))
    params = nn.unbox(task.init(jax.random.key(3)).trainable)
    records = task.eval_sets("test")[0].records
    history = np.stack([records[i]["history_tokens"] for i in range(24)])
    beam = 8                                   # narrower than the 30 items: the search prunes

    def searched(incremental):
        fn, context, state = gm.beam_scorer(task.model, backbone, params, history, beam)
        if not incremental:
            fn, state = task.logprob_fn(params), None
        return constrained_beam_search(fn, context, task.trie.tables, beam, state)

    cached, recomputed = jax.jit(lambda: searched(True))(), jax.jit(lambda: searched(False))()
    np.testing.assert_array_equal(cached[0], recomputed[0])
    # Path log-probs of 3 levels: float32 round-off of the two decoder groupings.
    np.testing.assert_allclose(cached[1], recomputed[1], rtol=1e-5)


# --------------------------------------------------------------------------- 8 devices
def _mesh_parity(codes_file, backbone):
    """Loss of one train step and the beam's lists (history excluded) on a 2x2x2 mesh vs 1 device."""
    raw = raw_config(codes_file, backbone=backbone)
    raw["mesh"] = {"data": 2, "fsdp": 2, "tensor": 2}
    session = Session(build_config(raw, "mesh"))
    task, layout = session.task, session.layout
    tx = optax.sgd(0.1)
    make_state, _, shardings = session.state_layout(tx)
    state = session.init_state(make_state, shardings)
    records = task.train_records()
    batch = {k: np.stack([records[i][k] for i in range(16)]) for k in records[0]}
    step = make_train_step(task, tx, lambda s: 0.1, 1)
    with layout.activate():
        global_batch = pipeline.to_global(batch, layout)
        _, metrics = jax.jit(step)(state, session.frozen, global_batch, jax.random.key(0))
    host = jax.device_get(state.params)
    rng = jax.random.fold_in(jax.random.key(0), 0)
    want, _ = jax.jit(lambda p: task.loss(p, {}, {}, batch, rng, Clock.at(0)))(host)
    # float32 sums regrouped over 8 shards: a few ulps per term (as tests/test_sharding.py).
    assert float(metrics["loss"]) == pytest.approx(float(want), abs=1e-5 * max(1.0, abs(float(want))))

    eval_set = task.eval_sets("test")[0]
    trie = jax.device_put(task.trie, layout.replicated())
    with layout.activate():
        sharded, _ = run_search(task, eval_set.records, state.params, trie.tables, Evaluator(task, layout, 32),
                                exclude=True)
    rows = [eval_set.records[i] for i in range(len(eval_set.records))]
    history_tokens = np.stack([r["history_tokens"] for r in rows])
    history = np.stack([r["history"] for r in rows])
    single = beam_search_items(task, host, history_tokens, exclude=history)
    # One compiled program per task and shape: a per-user loop must not compile per call.
    np.testing.assert_array_equal(beam_search_items(task, host, history_tokens, exclude=history), single)
    assert task.__dict__["_items_search"]._cache_size() == 1
    # Item lists are discrete: ties aside (none at random init), they match exactly.
    np.testing.assert_array_equal(sharded, single)
    for items, seen in zip(single, history):
        live = items[items > 0]
        unseen = set(range(1, 31)) - set(seen.tolist())
        assert set(live.tolist()) == unseen and len(live) == len(unseen)   # beam 32 > 30: every unseen item
        assert np.all(items[len(live):] == 0)


@pytest.mark.slow      # ~55 s on 2 cores: four compiled programs
def test_t5_loss_and_beam_search_on_8_devices_match_one_device(codes_file):
    assert jax.device_count() == 8
    _mesh_parity(codes_file, "t5")


@pytest.mark.slow
def test_decoder_loss_and_beam_search_on_8_devices_match_one_device(codes_file):
    _mesh_parity(codes_file, "decoder")


# A program with only jax and numpy: read safetensors by its format, deserialize the search and call it.
_PLAIN_JAX = PLAIN_SAFETENSORS_READER + r'''
import sys
from jax import export

out, tokens_file = sys.argv[1], sys.argv[2]
spec = json.load(open(out + "/model.json"))
params = read_safetensors(out + "/model.safetensors")
trie = read_safetensors(out + "/trie.safetensors")
search = export.deserialize(bytearray(open(out + "/" + spec["artifact"]["file"], "rb").read()))
tokens = np.load(tokens_file)
seen = np.zeros((tokens.shape[0], spec["n_items"] + 1), bool)
answers = {}
for b in (1, 7):
    items, _ = search.call(*[params[k] for k in spec["param_order"]],
                           *[trie[f"transitions_{k}"] for k in range(len(spec["codebook_sizes"]))],
                           tokens[:b], seen[:b])
    answers[b] = np.asarray(items).tolist()
print(json.dumps({"jaxrec_imported": "jaxrec" in sys.modules, "answers": answers}))
'''


def test_export_answers_like_evaluation_from_the_files_alone(t5_run, tmp_path):
    import subprocess
    import sys

    from jaxrec.export.manifest import read_manifest
    from jaxrec.export.recommend import load_recommender
    from jaxrec.train.runs import open_run
    run_dir = t5_run["run_dir"]
    out = tmp_path / "export"
    assert main(["export", str(run_dir), str(out)]) == 0
    manifest = read_manifest(out)
    assert manifest["kind"] == "generative" and {"beam_search.jaxexport", "trie.safetensors"} <= set(manifest["files"])

    # What evaluation returns for the first test users (history included) ...
    run = open_run(run_dir)
    task, params = run.task, run.state.params
    test = task.eval_sets("test")[0]
    n = 16
    with run.session.layout.activate():
        want, _ = run_search(task, test.records, params, task.trie.tables,
                             Evaluator(task, run.session.layout, 64), exclude=False)
    examples = task.split.tests["test"]
    store = task.store
    histories = [store.item_vocab[store.item_ids[store.user_offsets[u]:end]].tolist()
                 for u, end in zip(examples.users[:n], examples.history_end[:n])]

    # ... equals what the export answers from its files, through jaxrec ...
    rec = load_recommender(out)
    got = rec.recommend(histories, k=32, exclude_history=False)
    assert [[token for token, _ in row] for row in got] == \
        [[store.item_vocab[i] for i in row if i > 0] for row in want[:n]]

    # ... and through the serialized search in a process that never imports jaxrec.
    tokens, _ = rec.encode(histories)
    np.save(tmp_path / "tokens.npy", tokens[:7])
    proc = subprocess.run([sys.executable, "-c", _PLAIN_JAX, str(out), str(tmp_path / "tokens.npy")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["jaxrec_imported"] is False
    assert answer["answers"]["7"] == want[:7].tolist() and answer["answers"]["1"] == want[:1].tolist()

    with pytest.raises(Exception, match="k: 33 must be in 1..32"):
        rec.recommend(histories[:1], k=33)
    with pytest.raises(Exception, match="row 0: empty history"):
        rec.recommend([[]])
    with pytest.raises(Exception, match="row 0: 'nope'"):
        rec.recommend([["nope"]])
