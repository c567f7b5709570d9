"""The scoring export (SASRec / GRU4Rec / CaseQ) and `jaxrec recommend`, against the model.

The reference everywhere is the in-process model's query and a numpy brute force over the
whole item table (float64), never the exported top-k kernel itself.
"""
import contextlib
import io
import json
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxrec.cli import main
from jaxrec.config import build_config
from jaxrec.data.synthetic import SyntheticConfig, make_synthetic
from jaxrec.export.recommend import load_recommender
from tests.helpers import PLAIN_SAFETENSORS_READER, write_config

MAX_LEN, TOP_K, EPS32 = 20, 30, np.finfo(np.float32).eps


def write_pairs(path):
    """The tiny synthetic interactions as a `user item` file (so the test can delete its data)."""
    store = make_synthetic(SyntheticConfig.tiny())
    with open(path, "w") as f:
        for u in range(store.n_users):
            for item in store.item_ids[store.user_offsets[u]:store.user_offsets[u + 1]]:
                f.write(f"u{u} {store.item_vocab[item]}\n")


def brute_force(query, table, similarity, temperature, histories, exclude):
    """Scores [n, V] of every item in float64; the pad item, and the history when `exclude`, at -inf."""
    q, t = query.astype(np.float64), table.astype(np.float64)
    if similarity == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True) / temperature
        t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-6)
    scores = q @ t.T
    scores[:, 0] = -np.inf
    if exclude:
        for row, ids in enumerate(histories):
            scores[row, ids] = -np.inf
    return scores, np.abs(q) @ np.abs(t).T


def tolerance(magnitude, hidden):
    # The artifact computes each score as a float32 dot product of `hidden` terms; its rounding
    # error is at most ~hidden * eps32 * sum_i |q_i t_i| (the standard dot-product bound), and
    # the query itself may differ by a few ulps between two compilations: 4x that bound.
    return 4 * hidden * EPS32 * magnitude.max()


def assert_top_k(items, scores, brute, tol):
    """`items` are the brute force's best k, best first, up to ties closer than `tol`; ids must
    equal the brute force's order wherever the neighbouring scores are further apart than that."""
    k = items.shape[1]
    want = -np.sort(-brute, axis=1)[:, :k]
    true = np.take_along_axis(brute, items, axis=1)
    np.testing.assert_allclose(true, want, atol=tol, rtol=0)
    np.testing.assert_allclose(scores, true, atol=tol, rtol=0)
    assert all(len(set(row)) == k for row in items.tolist())
    order = np.argsort(-brute, axis=1, kind="stable")[:, :k]
    sorted_all = -np.sort(-brute, axis=1)[:, :k + 1]
    gaps = np.diff(-sorted_all, axis=1)        # gaps[:, j] = s_j - s_{j+1} >= 0
    clear = gaps[:, :k] > tol                  # apart from the next one ...
    clear[:, 1:] &= gaps[:, :k - 1] > tol      # ... and from the previous one
    assert (items == order)[clear].all()
    assert clear.mean() > 0.9                  # the comparison is not vacuous


def encode(index, histories, max_len=MAX_LEN):
    inputs = np.zeros((len(histories), max_len), np.int32)
    exclude = np.zeros((len(histories), max(len(h) for h in histories)), np.int32)
    for row, h in enumerate(histories):
        ids = [index[t] for t in h]
        inputs[row, max_len - len(ids[-max_len:]):] = ids[-max_len:]
        exclude[row, :len(ids)] = ids
    return inputs, exclude


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A SASRec run trained a few steps on a data file, exported (all platforms, and CUDA only),
    its reference scores taken in this process — then its run directory and data deleted."""
    from jaxrec.train.runs import open_run
    tmp = tmp_path_factory.mktemp("scoring")
    data = tmp / "interactions.txt"
    write_pairs(data)
    cfg = write_config(tmp / "tiny.yaml", tmp / "run", data={"source": str(data), "format": "pairs",
                                                             "max_len": MAX_LEN},
                       train={"steps": 12, "eval_every": 12, "log_every": 6, "warmup_steps": 2},
                       checkpoint={"every": 12, "keep": 1}, eval={"exclude_history": True, "item_chunk": 16})
    assert main(["train", str(cfg)]) == 0
    out, cuda_only = tmp / "export", tmp / "export-cuda"
    assert main(["export", str(tmp / "run"), str(out), "--top-k", str(TOP_K)]) == 0
    assert main(["export", str(tmp / "run"), str(cuda_only), "--platforms", "cuda"]) == 0
    err = io.StringIO()
    with contextlib.redirect_stderr(err):          # another export is never overwritten silently
        refused = main(["export", str(tmp / "run"), str(cuda_only)])

    run = open_run(tmp / "run")
    task, params = run.task, run.host_params()
    vocab = task.store.item_vocab.tolist()
    rng = np.random.default_rng(0)
    # 256 histories of 1..30 items (longer than max_len too), repeats allowed.
    histories = [[vocab[i] for i in rng.integers(1, len(vocab), rng.integers(1, 31))] for _ in range(256)]
    index = {t: i for i, t in enumerate(vocab) if i}
    inputs, exclude = encode(index, histories)
    query = np.asarray(jax.jit(task.query)(params, inputs))
    ids = [[index[t] for t in h] for h in histories]
    m = task.config.model
    brute, magnitude = brute_force(query, np.asarray(params["item_embedding"]), m.similarity, m.temperature, ids,
                                   exclude=True)
    # What `jaxrec evaluate` reports with the history included (with it excluded, evaluation still
    # ranks a target that repeats a history item, which a recommender cannot know to keep), and
    # the examples it is measured on.
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", str(tmp / "run"), "eval.exclude_history=false"]) == 0
    report = json.loads(next((tmp / "run").glob("evaluate-step*.json")).read_text())
    store, test = task.store, task.split.tests["test"]
    evaluated = {"metrics": report["results"]["test"], "targets": [vocab[t] for t in test.targets],
                 "histories": [store.item_vocab[store.item_ids[store.user_offsets[u]:end]].tolist()
                               for u, end in zip(test.users, test.history_end)]}
    shutil.rmtree(tmp / "run")
    data.unlink()
    return {"out": out, "cuda_only": cuda_only, "histories": histories, "vocab": vocab, "inputs": inputs,
            "exclude": exclude, "brute": brute, "tol": tolerance(magnitude, m.hidden), "tmp": tmp,
            "refused": (refused, err.getvalue()), "evaluated": evaluated}


def test_artifact_answers_like_the_model_at_batch_sizes_1_7_256(exported):
    rec = load_recommender(exported["out"])
    manifest = rec.manifest
    assert manifest["kind"] == "scoring" and manifest["details"]["top_k"] == TOP_K
    assert manifest["details"]["artifact"]["platforms"] == ["cpu", "cuda"]
    assert set(manifest["files"]) == {"items.json", "model.json", "model.safetensors", "scoring.jaxexport"}
    for b in (1, 7, 256):
        items, scores = rec.score(exported["inputs"][:b], exported["exclude"][:b])
        assert items.shape == (b, TOP_K)
        assert_top_k(items, scores, exported["brute"][:b], exported["tol"])


_PLAIN_JAX = PLAIN_SAFETENSORS_READER + r'''
import sys
from jax import export

out, arrays = sys.argv[1], np.load(sys.argv[2])
spec = json.load(open(out + "/model.json"))
params = read_safetensors(out + "/model.safetensors")
score = export.deserialize(bytearray(open(out + "/" + spec["artifact"]["file"], "rb").read()))
items, scores = score.call(*[params[k] for k in spec["param_order"]], arrays["inputs"], arrays["exclude"])
print(json.dumps({"imported": sorted(m for m in ("jaxrec", "flax", "safetensors") if m in sys.modules),
                  "items": np.asarray(items).tolist(), "scores": np.asarray(scores).tolist()}))
'''


def test_a_process_with_only_jax_and_numpy_gets_the_same_top_k(exported, tmp_path):
    np.savez(tmp_path / "arrays.npz", inputs=exported["inputs"][:7], exclude=exported["exclude"][:7])
    proc = subprocess.run([sys.executable, "-c", _PLAIN_JAX, str(exported["out"]), str(tmp_path / "arrays.npz")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["imported"] == []
    assert_top_k(np.asarray(answer["items"]), np.asarray(answer["scores"]), exported["brute"][:7], exported["tol"])


def test_recommend_answers_from_the_export_alone(exported, tmp_path, capsys, monkeypatch):
    """Run directory and data are gone; the run's eval.exclude_history=true is the default."""
    vocab, histories = exported["vocab"], exported["histories"]
    lines = [" ".join(h) if row % 3 == 0 else ",".join(h) if row % 3 == 1 else json.dumps(h)
             for row, h in enumerate(histories[:40])]
    (tmp_path / "histories.txt").write_text("\n".join(lines) + "\n")
    assert main(["recommend", str(exported["out"]), "--file", str(tmp_path / "histories.txt"), "-k", "10",
                 "--batch-size", "16"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["row"] for a in answers] == list(range(40))
    index = {t: i for i, t in enumerate(vocab) if i}
    items = np.asarray([[index[t] for t in a["items"]] for a in answers])
    assert_top_k(items, np.asarray([a["scores"] for a in answers]), exported["brute"][:40], exported["tol"])

    # Arguments and stdin give the same answers; --include-history ranks the history too.
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines[1] + "\n"))
    assert main(["recommend", str(exported["out"]), "-k", "10"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == answers[1]["items"]
    assert main(["recommend", str(exported["out"]), "-k", str(TOP_K), "--include-history", lines[0]]) == 0
    included = json.loads(capsys.readouterr().out)["items"]
    assert set(included) & set(histories[0]) and included[:10] != answers[0]["items"]


def test_recommend_reproduces_the_evaluated_metrics(exported, tmp_path, capsys):
    """HR@10 and NDCG@10 computed from `jaxrec recommend`'s lists for the test users equal what
    `jaxrec evaluate` measured on the same model (full ranking, history included), although the
    run directory and the data are gone."""
    evaluated = exported["evaluated"]
    (tmp_path / "test.txt").write_text("\n".join(json.dumps(h) for h in evaluated["histories"]) + "\n")
    assert main(["recommend", str(exported["out"]), "--file", str(tmp_path / "test.txt"), "-k", "10",
                 "--include-history"]) == 0
    lists = [json.loads(line)["items"] for line in capsys.readouterr().out.splitlines()]
    ranks = [items.index(t) + 1 if t in items else None for items, t in zip(lists, evaluated["targets"])]
    hr = np.mean([r is not None for r in ranks])
    ndcg = np.mean([1 / np.log2(r + 1) if r else 0.0 for r in ranks])
    # float32 means over 100 users in evaluation: a few ulps of difference at most.
    assert hr == pytest.approx(evaluated["metrics"]["hr@10"], abs=1e-6)
    assert ndcg == pytest.approx(evaluated["metrics"]["ndcg@10"], abs=1e-6)


def test_unknown_items_are_refused_or_skipped_by_row(exported, capsys):
    out, known = str(exported["out"]), exported["vocab"][1]
    assert main(["recommend", out, f"{known} nope", known, "zzz"]) == 2
    err = capsys.readouterr()
    assert err.out == "" and err.err.count("\n") == 1
    assert "row 0: 'nope'" in err.err and "row 2: 'zzz'" in err.err
    assert main(["recommend", out, f"{known} nope", known, "--skip-unknown"]) == 0
    captured = capsys.readouterr()
    answers = [json.loads(line) for line in captured.out.splitlines()]
    assert answers[0]["skipped"] == ["nope"] and "skipped" not in answers[1]
    assert answers[0]["items"] == answers[1]["items"]
    assert "row 0: 'nope'" in captured.err


def _copy(exported, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(exported["out"], target)
    return target


@pytest.mark.parametrize("case, message", [
    ("empty", "row 1: empty history"),
    ("k_catalogue", "-k: 61 must be in 1..60 (the catalogue has 60 items)"),
    ("k_export", f"k: 31 is more than the {TOP_K} items this export ranks; export again with --top-k 31"),
    ("tampered", "scoring.jaxexport: SHA-256 differs from manifest.json"),
    ("future", "format version 99 is newer than this jaxrec reads"),
    ("platform", "exported for cuda, not for this machine's cpu"),
    ("skipped_empty", "row 0: empty history (after skipping unknown 'nope')"),
])
def test_bad_input_is_one_line_and_exit_2(exported, tmp_path, capsys, case, message):
    out, known = str(exported["out"]), exported["vocab"][1]
    args = {"empty": [out, "--file", str(tmp_path / "h.txt")],
            "k_catalogue": [out, known, "-k", "61"], "k_export": [out, known, "-k", "31"],
            "tampered": [str(tmp_path / "copy"), known], "future": [str(tmp_path / "copy"), known],
            "platform": [str(exported["cuda_only"]), known],
            "skipped_empty": [out, "nope", "--skip-unknown"]}[case]
    (tmp_path / "h.txt").write_text(f"{known}\n\n")
    if case == "tampered":
        artifact = _copy(exported, tmp_path) / "scoring.jaxexport"
        data = bytearray(artifact.read_bytes())
        data[len(data) // 2] ^= 1
        artifact.write_bytes(bytes(data))
    if case == "future":
        manifest = _copy(exported, tmp_path) / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 99}))
    assert main(["recommend", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err and len(captured.err.strip().splitlines()) == 1


def test_export_into_another_export_is_refused(exported):
    code, err = exported["refused"]
    assert code == 2 and "not empty (an export of this run)" in err and "--force" in err


@pytest.mark.parametrize("task, model", [
    ("seqrec", {"backbone": "gru4rec", "hidden": 16, "layers": 1}),
    ("caseq", {"hidden": 16, "layers": 1, "contexts": 2, "similarity": "cosine", "temperature": 0.1}),
])
def test_every_scoring_model_exports_its_test_time_scores(tmp_path, task, model):
    """GRU4Rec and CaseQ (branching levels, cosine scores) beside the fixture's SASRec (dot).
    Untrained parameters suffice: the artifact must reproduce the model's scores whatever they are."""
    from jaxrec import registry
    from jaxrec.export.scoring import ScoringRecommender, export_scoring
    config = build_config({"task": task, "data": {"source": "synthetic", "synthetic": "tiny", "max_len": 12},
                           "model": model, "eval": {"item_chunk": 7}}, "test")
    t = registry.task_class(task)(config)
    params = nn.unbox(jax.jit(lambda rng: t.init(rng).trainable)(jax.random.key(1)))
    export_scoring(t, params, tmp_path, top_k=8, platforms=("cpu",))
    rec = ScoringRecommender.load(tmp_path)
    vocab = t.store.item_vocab.tolist()
    rng = np.random.default_rng(1)
    histories = [[vocab[i] for i in rng.integers(1, len(vocab), rng.integers(1, 20))] for _ in range(9)]
    index = {tok: i for i, tok in enumerate(vocab) if i}
    inputs, exclude = encode(index, histories, 12)
    items, scores = rec.score(*rec.encode(histories, exclude_history=True))
    query = np.asarray(jax.jit(t.query)(params, inputs))
    table = np.asarray(params["item_embedding"])
    brute, magnitude = brute_force(query, table, config.model.similarity, config.model.temperature,
                                   [[index[tok] for tok in h] for h in histories], exclude=True)
    assert_top_k(items, scores, brute, tolerance(magnitude, 16))
