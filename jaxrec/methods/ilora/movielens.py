"""MovieLens in the LLaRA format: `python -m jaxrec.methods.ilora.movielens SRC OUT`.

LLaRA's MovieLens files are not public in a readable form, so this rebuilds the set the
LLaRA way from a RecBole ML-100K (`ml-100k.inter` with timestamps + `ml-100k.item`
titles) or a GroupLens ML-1M (`ratings.dat` + `movies.dat`) and writes a LLaRA
directory (train.tsv, val.tsv, test.tsv, id2name.txt) that `task: ilora` and the
`data.split: llara` SASRec guide both read:

- each user's ratings (all ratings, implicit) in time order, ties kept in file order;
- users are split 8:1:1 *chronologically*: ordered by the time of their last rating,
  the earliest 80% train, the next 10% validation, the latest 10% test (LLaRA describes
  its split as chronological 8:1:1; the exact rule is not published, so figures on this
  set are not comparable with LLaRA's table);
- a training user gives one row per position t >= 1: history = the up-to-10 items before
  t, next = item t (LLaRA's sliding prefixes); a validation/test user gives one row: its
  last item and the up-to-10 items before it;
- item ids are 0-based in order of the catalogue; titles are cleaned once (", The" moves
  to the front, as LLaRA's `get_mv_title` does), without the release year.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

from jaxrec.data.store import InteractionStore

# ML-1M's movies.dat puts the year inside the title; ML-100K's RecBole titles have none.
_RELEASE_YEAR = re.compile(r"\s*\(\d{4}\)$")


def llara_rows(store: InteractionStore, max_history: int = 10, fractions=(0.8, 0.1, 0.1)):
    """{"train", "val", "test"}: lists of (history items, next item) in store item indices."""
    if store.timestamps is None:
        raise ValueError(f"{store.source}: the LLaRA-style split needs timestamps")
    last_time = store.timestamps[store.user_offsets[1:] - 1]
    order = np.argsort(last_time, kind="stable")
    n = store.n_users
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    roles = {"train": order[:n_train], "val": order[n_train:n_train + n_valid], "test": order[n_train + n_valid:]}
    rows = {name: [] for name in roles}
    for name, users in roles.items():
        for u in sorted(users.tolist()):
            seq = store.sequence(u).tolist()
            positions = range(1, len(seq)) if name == "train" else [len(seq) - 1]
            for t in positions:
                if t >= 1:
                    rows[name].append((seq[max(0, t - max_history):t], seq[t]))
    return rows


def write_llara_dir(store: InteractionStore, out_dir: str | Path, max_history: int = 10) -> dict[str, int]:
    """Write the LLaRA files for `store` (needs timestamps and a `title` column); returns row counts."""
    titles = store.item_columns.get("title")
    if titles is None:
        raise ValueError(f"{store.source}: no item titles (a RecBole .item file beside the .inter file)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = llara_rows(store, max_history)
    for name, entries in rows.items():
        lines = ["seq\tnext"] + [" ".join(str(i - 1) for i in h) + f"\t{n - 1}" for h, n in entries]
        (out / f"{name}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    names = [f"{i - 1}::{_RELEASE_YEAR.sub('', str(titles[i]))}" for i in range(1, store.n_items + 1)]
    (out / "id2name.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return {name: len(entries) for name, entries in rows.items()}


def ratings_file(source: Path) -> Path:
    """The timestamped ratings in `source`: a RecBole `.inter` or GroupLens `ratings.dat` file,
    or a directory holding `<name>.inter` or `ratings.dat`."""
    if not source.is_dir():
        return source
    for candidate in (source / f"{source.name}.inter", source / "ratings.dat", *sorted(source.glob("*.inter"))):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{source}: no timestamped ratings (<name>.inter or ratings.dat); "
                            "SASRec-style pair files carry no timestamps and cannot be split by time")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a LLaRA-format MovieLens directory from ML-100K or ML-1M.")
    parser.add_argument("source", help="a RecBole directory or .inter file (ML-100K: ml-100k.inter + ml-100k.item), "
                                       "or a GroupLens directory or ratings.dat (ML-1M: ratings.dat + movies.dat)")
    parser.add_argument("out_dir")
    parser.add_argument("--max-history", type=int, default=10)
    args = parser.parse_args(argv)
    from jaxrec.data.readers import read_interactions
    try:
        counts = write_llara_dir(read_interactions(ratings_file(Path(args.source))), args.out_dir, args.max_history)
    except (OSError, ValueError) as e:   # DataFormatError is a ValueError: name the file, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out_dir}: " + ", ".join(f"{k} {v:,} rows" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
