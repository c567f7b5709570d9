"""`jaxrec serve`: the real server in its own process, called over HTTP."""
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from jaxrec.cli import main  # noqa: E402
from jaxrec.export.recommend import load_recommender  # noqa: E402
from tests.helpers import REPO, cli_env, write_config  # noqa: E402

MAX_BATCH = 8
# Direct connections only: a proxy from the environment must not sit between the test and localhost.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    cfg = write_config(tmp / "tiny.yaml", tmp / "run", train={"steps": 10, "eval_every": 10},
                       checkpoint={"every": 10, "keep": 1})
    assert main(["train", str(cfg)]) == 0
    assert main(["export", str(tmp / "run"), str(tmp / "export")]) == 0
    return tmp / "export"


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    """`jaxrec serve EXPORT --port 0` (the OS picks a free port; the server prints its address)."""
    logs = tmp_path_factory.mktemp("serve-logs")
    stdout, stderr = open(logs / "stdout", "w+"), open(logs / "stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "jaxrec.cli", "serve", str(export), "--port", "0",
                             "--max-batch", str(MAX_BATCH)], env=cli_env(1), cwd=REPO, stdout=stdout, stderr=stderr)
    try:
        base = _wait_for_health(proc, logs)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        stdout.close(), stderr.close()
    # uvicorn shuts down cleanly, then re-raises the signal so the exit status says what stopped it.
    err = (logs / "stderr").read_text()
    assert code == -signal.SIGTERM and "Finished server process" in err and "Traceback" not in err, err


def _wait_for_health(proc, logs, timeout=180.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {(logs / 'stderr').read_text()}")
        first = (logs / "stdout").read_text().partition("\n")[0]
        if " on http://" in first:
            base = first.split(" on ", 1)[1].split()[0]
            try:
                if call(base, "/health")[0] == 200:
                    return base
            except urllib.error.URLError:
                pass          # printed just before uvicorn listens
        time.sleep(0.2)
    raise AssertionError(f"no /health within {timeout} s: {(logs / 'stderr').read_text()}")


def call(base: str, path: str, body=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def in_process(export):
    return load_recommender(export)


def _same_answers(served: list[dict], expected: list[list[tuple[str, float]]]) -> None:
    assert [r["items"] for r in served] == [[token for token, _ in row] for row in expected]
    for got, row in zip(served, expected):
        # The same float32 model, but the server pads the batch to a power of two and XLA may sum a
        # hidden-16 dot product in another order for another batch size: rounding of order
        # 16 x 1.2e-7 of the score scale; 1e-5 of it leaves room while catching any other row's answer.
        scale = max(abs(s) for _, s in row)
        assert got["scores"] == pytest.approx([s for _, s in row], abs=1e-5 * scale)


@pytest.mark.parametrize("exclude_history", [None, True, False])
def test_recommend_equals_the_in_process_recommender(server, in_process, exclude_history):
    items = in_process.items
    histories = [[items[1], items[2], items[3]], [items[5]], [items[7], items[7], items[2]]]   # 3 rows: padded to 4
    status, body = call(server, "/recommend", {"histories": histories, "k": 7, "exclude_history": exclude_history})
    assert status == 200, body
    _same_answers(body["results"], in_process.recommend(histories, k=7, exclude_history=exclude_history))
    assert not any("skipped" in result for result in body["results"])


def test_health_and_manifest(server, export, in_process):
    assert call(server, "/health") == (200, {"status": "ok", "task": "seqrec", "kind": "scoring",
                                             "items": len(in_process.items) - 1, "max_k": len(in_process.items) - 1,
                                             "max_batch": MAX_BATCH})
    assert call(server, "/manifest") == (200, json.loads((export / "manifest.json").read_text()))


def test_unknown_tokens_are_skipped_on_request(server, in_process):
    items = in_process.items
    status, body = call(server, "/recommend", {"histories": [[items[4]], ["nope", items[9], "gone"]], "k": 3,
                                               "unknown": "skip"})
    assert status == 200, body
    assert "skipped" not in body["results"][0] and body["results"][1]["skipped"] == ["nope", "gone"]
    _same_answers(body["results"], in_process.recommend([[items[4]], [items[9]]], k=3))


@pytest.mark.parametrize("body, status, message", [
    (b'{"histories": [["1"]', 422, "body: not valid JSON"),
    ({"histories": "1 2 3"}, 422, "histories: Input should be a valid list"),
    ({"histories": [["1", 2]]}, 422, "histories[0][1]: Input should be a valid string"),
    ({"histories": [["1"]], "k": "5"}, 422, "k: Input should be a valid integer"),
    ({"histories": [["1"]], "unknown": "drop"}, 422, "unknown: Input should be 'reject' or 'skip'"),
    ({"histories": [["1"]], "K": 5}, 422, "K: Extra inputs are not permitted"),
    ({}, 422, "histories: required field missing"),
    ({"histories": []}, 422, "histories: empty batch"),
    ({"histories": [["1"], []]}, 422, "histories: row 1: empty history"),
    ({"histories": [["1"]], "k": 0}, 422, "k: 0 is outside 1..60"),
    ({"histories": [["1"]], "k": 61}, 422, "k: 61 is outside 1..60 (the catalogue holds 60 items)"),
    ({"histories": [["1"]] * (MAX_BATCH + 1)}, 413, f"9 histories in one request, more than this server's "
                                                    f"--max-batch {MAX_BATCH}"),
    ({"histories": [["1"], ["2", "nope"]]}, 422, "row 1: 'nope'"),
    ({"histories": [["1"], ["nope"]], "unknown": "skip"}, 422,
     "histories: row 1: empty history (after skipping unknown 'nope')"),
])
def test_bad_requests_get_a_4xx_naming_the_problem(server, in_process, body, status, message):
    assert in_process.items[1:3] == ["1", "2"] and len(in_process.items) == 61   # the tokens used above
    got, answer = call(server, "/recommend", body)
    assert got == status and message in answer["error"], answer
    assert "\n" not in answer["error"]
    if message == "row 1: 'nope'":
        assert answer["unknown"] == [{"row": 1, "token": "nope"}]


def test_a_bad_export_fails_at_start_in_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("manifest.json: missing (not a jaxrec export directory; make one with "
                        "`jaxrec export RUN OUT`)") and len(err.splitlines()) == 1


def test_a_missing_extra_names_the_install_command(tmp_path, capsys, monkeypatch):
    import jaxrec
    monkeypatch.delitem(sys.modules, "jaxrec.serve", raising=False)
    monkeypatch.delattr(jaxrec, "serve", raising=False)        # else `from jaxrec import serve` finds it
    monkeypatch.setitem(sys.modules, "fastapi", None)      # `import fastapi` now raises ImportError
    assert main(["serve", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("jaxrec: error: jaxrec serve needs FastAPI and uvicorn (fastapi is "
                                               "not installed): pip install 'jaxrec[serve]'")
