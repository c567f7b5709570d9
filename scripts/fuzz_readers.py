"""Fuzz every reader: each generated file is refused in one line or read exactly as a simple parser reads it.

    python scripts/fuzz_readers.py                  # 2,000 inputs per format, seed 0
    python scripts/fuzz_readers.py --per-format 300 --seed 7

For each format (pairs, sequences, ratings, movielens, recbole, llara) it writes valid files
of that format, then mutates most of them (truncated files and lines, random bytes, NUL
bytes, mixed separators, mixed column counts, headers, header-only files, CRLF, blank
lines, pure noise), and reads each one twice: with its format named and with
`format="auto"`. A read must either raise a `DataFormatError` whose message is one line,
or return a store whose users / items / events equal what `reference_counts` — a
line-by-line Python parser written from docs/data.md, sharing no code with the readers —
counts for the format the store says it is; with `auto` that format must also be the
one the documented detection rules choose. Anything else (another exception type, a
multi-line message, other counts, another format) is reported. Prints the number of
inputs per format and the tracebacks / misreads; writes nothing but temporary files.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxrec.data.readers import DataFormatError, read_interactions  # noqa: E402

FILE_NAMES = {"pairs": "data.txt", "sequences": "seq.txt", "ratings": "u.data", "movielens": "ratings.dat",
              "recbole": "d.inter", "llara": "train.tsv"}
FORMATS = tuple(FILE_NAMES)

# --- the reference: docs/data.md's rules as plain Python over lines ------------------------
COLUMN_NAMES = {"user": "user", "user_id": "user", "userid": "user", "item": "item", "item_id": "item",
                "itemid": "item", "rating": "rating", "timestamp": "timestamp", "time": "timestamp"}
HEADER_LAYOUTS = {("user", "item"): "pairs", ("user", "item", "timestamp"): "pairs",
                  ("user", "item", "rating", "timestamp"): "ratings"}
RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
CANONICAL_INTEGER = re.compile(rb"^(0|-?[1-9][0-9]*)$")


class Refuse(Exception):
    """The reference's verdict: a correct reader must refuse this input."""


def parses_as_float(token: bytes) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def finite_number(token: bytes) -> bool:
    return parses_as_float(token) and math.isfinite(float(token))


def text_lines(raw: bytes) -> list[bytes]:
    """Lines of a valid text file (UTF-8, no NUL), CRLF normalised; refuses anything else."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refuse("not UTF-8") from None
    if b"\x00" in raw or not raw.strip():
        raise Refuse("NUL byte or empty")
    return raw.replace(b"\r\n", b"\n").split(b"\n")


def table_rows(raw: bytes) -> list[list[bytes]]:
    return [line.split() for line in text_lines(raw) if line.split()]


def header_of(rows) -> str | None:
    """The layout a header row names (refusing bad headers), or None when row 0 is data."""
    words = [w.decode("utf-8", "replace").lower() for w in rows[0]]
    if not all(w in COLUMN_NAMES for w in words):
        return None
    layout = HEADER_LAYOUTS.get(tuple(COLUMN_NAMES[w] for w in words))
    if layout is None or len(rows) == 1:
        raise Refuse("bad header or header only")
    return layout


def check_no_unnamed_header(rows) -> None:
    if len(rows) >= 2 and not all(map(parses_as_float, rows[0])) and \
            all(parses_as_float(t) for row in rows[1:] for t in row):
        raise Refuse("words above numbers: an unrecognised header")


def table_counts(raw: bytes, fmt: str) -> tuple[int, int, int]:
    rows = table_rows(raw)
    header = header_of(rows)
    if header is not None:
        if header != fmt:
            raise Refuse(f"{header} header on a {fmt} file")
        width, rows = len(rows[0]), rows[1:]
    else:
        check_no_unnamed_header(rows)
        width = len(rows[0])
    if fmt == "sequences":
        if any(len(r) < 2 for r in rows):
            raise Refuse("sequence line without items")
        items = {t for r in rows for t in r[1:]}
        return len({r[0] for r in rows}), len(items), sum(len(r) - 1 for r in rows)
    allowed = (4,) if fmt == "ratings" else (2, 3)
    if width not in allowed or any(len(r) != width for r in rows):
        raise Refuse("field count")
    numeric = [2, 3] if fmt == "ratings" else [2] if width == 3 else []
    if not all(finite_number(r[j]) for r in rows for j in numeric):
        raise Refuse("bad rating or timestamp")
    return len({r[0] for r in rows}), len({r[1] for r in rows}), len(rows)


def movielens_counts(raw: bytes) -> tuple[int, int, int]:
    if b"\x1f" in raw:
        raise Refuse("0x1f is reserved by the reader")
    rows = [[f.strip() for f in line.split(b"::")] for line in text_lines(raw) if line.strip()]
    if any(len(r) != 4 for r in rows):
        raise Refuse("field count")
    for r in rows:
        if not (CANONICAL_INTEGER.match(r[0]) and CANONICAL_INTEGER.match(r[1]) and finite_number(r[2])):
            raise Refuse("bad id or rating")
        try:
            if not -2 ** 63 <= int(r[3]) < 2 ** 63 or not -2 ** 63 <= int(r[0]) < 2 ** 63 \
                    or not -2 ** 63 <= int(r[1]) < 2 ** 63:
                raise Refuse("out of int64")
        except ValueError:
            raise Refuse("bad timestamp") from None
    return len({int(r[0]) for r in rows}), len({int(r[1]) for r in rows}), len(rows)


def recbole_counts(raw: bytes) -> tuple[int, int, int]:
    rows = [[f.strip() for f in line.split(b"\t")] for line in text_lines(raw) if line.strip()]
    names = []
    for field in rows[0]:
        name, _, kind = field.decode().partition(":")
        if kind not in RECBOLE_TYPES:
            raise Refuse("untyped header field")
        names.append(name)
    data = rows[1:]
    if "user_id" not in names or "item_id" not in names or not data or any(len(r) != len(names) for r in data):
        raise Refuse("header or field count")
    user, item = names.index("user_id"), names.index("item_id")
    if any(not r[user] or not r[item] for r in data):
        raise Refuse("empty id")
    if "timestamp" in names and not all(finite_number(r[names.index("timestamp")]) for r in data):
        raise Refuse("bad timestamp")
    return len({r[user] for r in data}), len({r[item] for r in data}), len(data)


def llara_counts(raw: bytes) -> tuple[int, int, int]:
    text_lines(raw)
    lines = [line for line in raw.decode().replace("\r\n", "\n").split("\n") if line.strip()]
    if not lines or lines[0].strip().split("\t") != ["seq", "next"] or len(lines) == 1:
        raise Refuse("header")
    sequences = []
    for line in lines[1:]:
        fields = line.strip("\r\n").split("\t")
        if len(fields) != 2 or len(fields[1].split()) != 1:
            raise Refuse("row shape")
        sequences.append(fields[0].split() + fields[1].split())
    return len(sequences), len({t for s in sequences for t in s}), sum(map(len, sequences))


def reference_counts(raw: bytes, fmt: str) -> tuple[int, int, int]:
    if fmt in ("pairs", "sequences", "ratings"):
        return table_counts(raw, fmt)
    return {"movielens": movielens_counts, "recbole": recbole_counts, "llara": llara_counts}[fmt](raw)


def reference_auto_format(raw: bytes, name: str) -> str:
    """The format docs/data.md's detection rules choose for a file `name` holding `raw`."""
    if name.endswith(".inter"):
        return "recbole"
    if name.endswith(".dat"):
        return "movielens"
    first = next((line for line in raw.split(b"\n") if line.strip()), b"")
    if first.strip().split(b"\t") == [b"seq", b"next"]:
        return "llara"
    if first.split() == [b"seq", b"next"]:
        raise Refuse("LLaRA header without its tab")
    fields = [f.strip() for f in first.strip().split(b"\t")]
    if fields != [b""] and all(re.match(rb"^[^:\s]+:(token|token_seq|float|float_seq)$", f) for f in fields):
        return "recbole"
    rows = table_rows(raw)
    header = header_of(rows)
    if header is not None:
        return header
    check_no_unnamed_header(rows)
    counts = [len(r) for r in rows]
    for line in text_lines(raw):
        if b"\t" in line and any(len(f.split()) > 1 for f in line.split(b"\t")):
            raise Refuse("a tab-separated field with spaces")
    if all(c == 2 for c in counts):
        return "pairs"
    fits = [fmt for fmt, ok in (("pairs", all(c in (2, 3) for c in counts)), ("ratings", all(c == 4 for c in counts)),
                                ("sequences", min(counts) >= 2 and len({r[0] for r in rows}) == len(rows))) if ok]
    if len(fits) != 1:
        raise Refuse(f"fits {fits}")
    return fits[0]


# --- generators ---------------------------------------------------------------------------
def token(rng, kind: str, n: int) -> str:
    value = int(rng.integers(1, n + 1))
    return {"int": str(value), "str": f"u{value}", "padded": f"0{value}", "unicode": f"ä{value}"}[kind]


def valid_text(rng, fmt: str) -> str:
    kind = rng.choice(["int", "int", "int", "str", "padded", "unicode"])
    sep = rng.choice([" ", "\t", "  ", " \t"]) if fmt not in ("movielens", "recbole") else ""
    n_users, n_items = int(rng.integers(1, 6)), int(rng.integers(1, 12))
    users = [token(rng, kind, 1000) for _ in range(n_users)]
    lines = []
    for u in users:
        length = int(rng.integers(1, 8))
        items = [token(rng, kind, n_items) for _ in range(length)]
        times = np.sort(rng.integers(0, 10 ** 9, length))
        if fmt == "sequences":
            lines.append(sep.join([u, *items]))
        for t, i in zip(times, items):
            if fmt == "pairs":
                lines.append(sep.join([u, i] + ([str(t)] if rng.random() < 0.5 else [])))
            elif fmt == "ratings":
                lines.append(sep.join([u, i, str(rng.integers(1, 6)), str(t)]))
            elif fmt == "movielens":
                lines.append("::".join([str(rng.integers(1, 99)), str(rng.integers(1, 30)), "4", str(t)]))
            elif fmt == "recbole":
                lines.append("\t".join([u, i, "3", str(t)]))
        if fmt == "llara":
            lines.append(" ".join(items[:-1]) + "\t" + items[-1])
    if fmt == "pairs" and len({len(line.split()) for line in lines}) > 1:
        lines = [" ".join(line.split()[:2]) for line in lines]   # one width per valid file
    if fmt == "recbole":
        lines.insert(0, "user_id:token\titem_id:token\trating:float\ttimestamp:float")
    if fmt == "llara":
        lines.insert(0, "seq\tnext")
    if fmt in ("pairs", "ratings") and rng.random() < 0.2:
        lines.insert(0, sep.join({"pairs": ["user", "item"], "ratings": ["user", "item", "rating", "time"]}[fmt]))
    order = rng.permutation(len(lines)) if fmt in ("pairs", "ratings", "movielens") and rng.random() < 0.3 \
        else np.arange(len(lines))
    if lines and lines[0] in ("seq\tnext",) or (fmt == "recbole"):
        order = np.arange(len(lines))
    return "\n".join(lines[i] for i in order) + rng.choice(["\n", "", "\n\n"])


HEADERS = [b"user item", b"user_id\titem_id\ttimestamp", b"user item rating timestamp", b"uid iid", b"seq\tnext",
           b"seq next", b"user_id:token\titem_id:token", b"item_id movie_id", b"user rating", b"USER ITEM TIME",
           b"seq\tlabel"]
SEPARATORS = [b" ", b"\t", b"  ", b"::", b",", b"\t ", b""]


def mutate(rng, raw: bytes) -> bytes:
    lines = raw.split(b"\n")
    r = int(rng.integers(0, 12))
    k = int(rng.integers(0, len(lines)))
    if r == 0:                                            # truncated file
        return raw[:int(rng.integers(0, len(raw) + 1))]
    if r == 1:                                            # truncated line
        lines[k] = lines[k][:int(rng.integers(0, len(lines[k]) + 1))]
    elif r == 2:                                          # random bytes
        at = int(rng.integers(0, len(raw) + 1))
        return raw[:at] + rng.integers(0, 256, int(rng.integers(1, 4))).astype(np.uint8).tobytes() + raw[at:]
    elif r == 3:                                          # mixed separators
        old = [s for s in SEPARATORS if s and s in lines[k]]
        if old:
            lines[k] = lines[k].replace(old[int(rng.integers(0, len(old)))], SEPARATORS[int(rng.integers(0, 7))], 1)
    elif r == 4:                                          # one field fewer
        fields = lines[k].split()
        if fields:
            del fields[int(rng.integers(0, len(fields)))]
            lines[k] = b" ".join(fields)
    elif r == 5:                                          # one field more
        lines[k] += rng.choice([b" 7", b"\t7", b" x", b"::7"])
    elif r == 6:                                          # a header
        lines.insert(0, HEADERS[int(rng.integers(0, len(HEADERS)))])
    elif r == 7:                                          # header only
        return lines[0] + b"\n"
    elif r == 8:                                          # CRLF, blank and whitespace-only lines
        return raw.replace(b"\n", rng.choice([b"\r\n", b"\n\n", b"\n \n"]))
    elif r == 9:                                          # noise
        return rng.integers(0, 256 if rng.random() < 0.5 else 128, int(rng.integers(0, 40))).astype(np.uint8).tobytes()
    elif r == 10:                                         # control bytes
        at = int(rng.integers(0, len(raw) + 1))
        return raw[:at] + rng.choice([b"\x00", b"\x1f", b"\x1c", b"\r", b"\x0b", b"\xc2\xa0"]) + raw[at:]
    else:                                                 # a line duplicated elsewhere
        lines.insert(int(rng.integers(0, len(lines) + 1)), lines[k])
    return b"\n".join(lines)


def generate(rng, fmt: str) -> bytes:
    raw = valid_text(rng, fmt).encode()
    for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):
        raw = mutate(rng, raw)
    return raw


# --- the check ----------------------------------------------------------------------------
def check(path: Path, fmt: str) -> tuple[str, str]:
    """("read" | "refused" | "over-refused", "") or ("traceback" | "misread", what happened) for one read."""
    raw = path.read_bytes()
    try:
        expected_format = reference_auto_format(raw, path.name) if fmt == "auto" else fmt
        expected = reference_counts(raw, expected_format)
    except Refuse:
        expected_format = expected = None
    try:
        store = read_interactions(path, format=fmt)
    except DataFormatError as e:
        if "\n" in str(e):
            return "traceback", f"multi-line DataFormatError: {e!r}"
        return ("over-refused", str(e)) if expected is not None else ("refused", "")
    except Exception:   # noqa: BLE001 - any other exception is what the fuzz looks for
        return "traceback", traceback.format_exc(limit=-3)
    got_format = store.source.split(":")[0]
    got = (store.n_users, store.n_items, store.n_interactions)
    if expected is None or (got_format, got) != (expected_format, expected):
        return "misread", f"read as {got_format} {got}, reference {expected_format} {expected}"
    return "read", ""


def fuzz(per_format: int, seed: int, show: int = 3) -> dict:
    """{format: {outcome: count}} over `per_format` inputs of each format, each read named and as auto."""
    rng = np.random.default_rng(seed)
    tally: dict = {}
    examples: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            for i in range(per_format):
                directory = Path(tmp) / f"{fmt}{i}"
                directory.mkdir()
                path = directory / FILE_NAMES[fmt]
                path.write_bytes(generate(rng, fmt))
                for mode in (fmt, "auto"):
                    outcome, detail = check(path, mode)
                    counts = tally.setdefault(mode if mode == fmt else f"auto({fmt})", {})
                    counts[outcome] = counts.get(outcome, 0) + 1
                    if outcome in ("traceback", "misread", "over-refused") and len(examples) < show:
                        examples.append(f"{mode} on {path.read_bytes()[:200]!r}: {outcome}: {detail}")
    return {"tally": tally, "examples": examples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-format", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = fuzz(args.per_format, args.seed, show=10)
    bad = 0
    print(f"{'reader':<18}{'inputs':>8}{'read':>8}{'refused':>9}{'over-refused':>14}{'tracebacks':>12}{'misreads':>10}")
    for mode, counts in result["tally"].items():
        bad += counts.get("traceback", 0) + counts.get("misread", 0)
        print(f"{mode:<18}{sum(counts.values()):>8}{counts.get('read', 0):>8}{counts.get('refused', 0):>9}"
              f"{counts.get('over-refused', 0):>14}{counts.get('traceback', 0):>12}{counts.get('misread', 0):>10}")
    for example in result["examples"]:
        print(example)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
