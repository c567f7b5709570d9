"""Every reader on generated and mutated files: a one-line DataFormatError or exactly the reference's counts.

The generators, the mutations and the reference parser live in scripts/fuzz_readers.py
(run it for larger numbers); this runs a few hundred inputs per format with a fixed seed.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_readers.py"
_spec = importlib.util.spec_from_file_location("fuzz_readers", SCRIPT)
fuzz_readers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_readers)

PER_FORMAT = 250


@pytest.fixture(scope="module")
def outcomes():
    return fuzz_readers.fuzz(PER_FORMAT, seed=0, show=5)


@pytest.mark.parametrize("fmt", fuzz_readers.FORMATS)
@pytest.mark.parametrize("mode", ["named", "auto"])
def test_no_traceback_no_misread_no_over_refusal(outcomes, fmt, mode):
    counts = outcomes["tally"][fmt if mode == "named" else f"auto({fmt})"]
    assert sum(counts.values()) == PER_FORMAT
    bad = {k: counts.get(k, 0) for k in ("traceback", "misread", "over-refused")}
    assert bad == {"traceback": 0, "misread": 0, "over-refused": 0}, outcomes["examples"]
    # The fuzz must exercise both sides: files that read and files that are refused.
    assert counts.get("read", 0) > PER_FORMAT // 5 and counts.get("refused", 0) > PER_FORMAT // 5


@pytest.mark.parametrize("raw, fmt", [
    (b"1 2\n1 3\x00\n", "pairs"),            # numpy would drop the NUL: "3\x00" read as "3"
    (b"\x1c\n", "llara"),                    # blank to str.strip(), not to bytes: was an IndexError
    (b"a b\t\nc d\n", "auto"),               # a tab field with a space inside, even with 2 fields a line
])
def test_cases_the_fuzz_found(tmp_path, raw, fmt):
    path = tmp_path / ("train.tsv" if fmt == "llara" else "data.txt")
    path.write_bytes(raw)
    assert fuzz_readers.check(path, fmt)[0] == "refused"


def test_the_reference_counts_what_the_docs_say(tmp_path):
    """The reference parser itself on hand-counted files (a reference that cannot fail proves nothing)."""
    ref = fuzz_readers.reference_counts
    assert ref(b"user item\n1 2\n1 3\n2 2\n", "pairs") == (2, 2, 3)
    assert ref(b"1 5 9 3\n2 5\n", "sequences") == (2, 3, 4)
    assert ref(b"1\t2\t5\t100\n1\t3\t4\t101\n", "ratings") == (1, 2, 2)
    assert ref(b"seq\tnext\n0 1\t2\n\t1\n", "llara") == (2, 3, 4)
    with pytest.raises(fuzz_readers.Refuse):
        ref(b"1 2 100\n1 3\n", "pairs")
    assert fuzz_readers.reference_auto_format(b"1 2 5 100\n1 3 4 101\n", "u.txt") == "ratings"
    with pytest.raises(fuzz_readers.Refuse):
        fuzz_readers.reference_auto_format(b"1 2 3\n2 3 4\n", "s.txt")
    rng = np.random.default_rng(0)
    assert all(fuzz_readers.generate(rng, fmt) for fmt in fuzz_readers.FORMATS)
