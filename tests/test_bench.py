"""jaxrec.bench: what a committed benchmark JSON says about paths."""
import json
import os

from jaxrec import bench


def test_repo_relative_names_data_beside_the_checkout_relatively(tmp_path):
    beside = bench._REPO_ROOT.parent / "shared" / "data" / "x.txt"
    assert bench.repo_relative(str(beside), "unused") == os.path.join("..", "shared", "data", "x.txt")
    assert bench.repo_relative(str(bench._REPO_ROOT / "runs" / "a"), "unused") == os.path.join("runs", "a")
    assert bench.repo_relative(None, "../shared/data/amazon/Beauty") == "../shared/data/amazon/Beauty"


def test_write_json_records_paths_inside_the_checkout_relatively(tmp_path):
    out = bench.write_json(tmp_path / "r.json", {"run": str(bench._REPO_ROOT / "runs" / "a")})
    assert json.loads(out.read_text()) == {"run": "runs/a"}
    assert not list(tmp_path.glob("*.tmp"))
