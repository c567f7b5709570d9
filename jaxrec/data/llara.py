"""LLaRA / iLoRA data: `seq<TAB>next` TSV files with `id2name.txt` (`id::name`) beside them.

Each row becomes a pseudo-user whose sequence is history + [next]; the user token is
the row's 0-based index in its file (so rows can be traced back). All splits of a
directory share one item vocabulary: the ids of id2name.txt when present (every named
item, interacted with or not), else every id seen in the split files.

LLaRA right-pads histories with the id one past the last item (4606 on LastFM); rows
whose history was entirely padding still carry that id. With `pad_token="auto"` that id
(max id + 1, when id2name.txt is present and does not name it) is dropped from
histories; `pad_token=None` keeps every token.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxrec.data.store import InteractionStore, make_item_vocab
from jaxrec.data.text import DataFormatError, as_integers, clean_title, index_tokens, read_text

SPLIT_FILES = {"train": "train.tsv", "valid": "val.tsv", "test": "test.tsv"}
NAMES_FILE = "id2name.txt"


def read_llara(directory: str | os.PathLike, min_history: int = 0,
               pad_token: str | None = "auto") -> dict[str, InteractionStore]:
    """{"train", "valid", "test"} → store of pseudo-users (history + [next]) with a title column.

    `min_history` drops rows with shorter histories (LLaRA and iLoRA train and evaluate on
    rows with at least 3 history items).
    """
    directory = Path(directory)
    files = {split: directory / name for split, name in SPLIT_FILES.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"LLaRA directory needs {', '.join(SPLIT_FILES.values())}; missing: "
                                f"{', '.join(missing)}")
    return _read(files, directory / NAMES_FILE, min_history, pad_token)


def read_llara_file(path: str | os.PathLike, split: str = "train", min_history: int = 0,
                    pad_token: str | None = "auto") -> InteractionStore:
    """One split: a TSV file, or the `split` of a LLaRA directory."""
    path = Path(path)
    if path.is_dir():
        if split not in SPLIT_FILES:
            raise ValueError(f"split must be one of {', '.join(SPLIT_FILES)}, got {split!r}")
        return read_llara(path, min_history, pad_token)[split]
    return _read({path.stem: path}, path.with_name(NAMES_FILE), min_history, pad_token)[path.stem]


def _read(files: dict[str, Path], names_path: Path, min_history: int, pad_token) -> dict[str, InteractionStore]:
    tables = {split: _read_table(path) for split, path in files.items()}
    if names_path.is_file():
        ids, titles = _read_names(names_path)
    else:
        ids, titles = _ids_in_order_of_appearance(tables.values(), pad_token), None
    position, vocab = index_tokens(ids)  # integer ids in numeric order: LastFM 0..4605 → items 1..4606
    if pad_token == "auto":
        integer_ids = titles is not None and as_integers(vocab) is not None
        pad_token = str(int(vocab[-1]) + 1) if integer_ids else None
    item_columns = {}
    if titles is not None:
        title = np.full(vocab.size + 1, "", dtype=titles.dtype)
        title[position + 1] = titles
        item_columns["title"] = title
    index_of = {token: i + 1 for i, token in enumerate(vocab)}
    return {split: _to_store(files[split], tables[split], index_of, vocab, item_columns, min_history, pad_token)
            for split in files}


def _ids_in_order_of_appearance(tables, pad_token) -> np.ndarray:
    tokens = [token for histories, nexts, _ in tables for history, target in zip(histories, nexts)
              for token in [*history, target] if token != pad_token]
    return np.array(tokens, dtype=str)


def _read_table(path: Path):
    """(history token lists, next tokens, line numbers) of one `seq<TAB>next` file."""
    lines = read_text(path).decode("utf-8").split("\n")
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:   # only characters that str.strip() counts as whitespace, such as 0x1c
        raise DataFormatError(path, 1, "no header line 'seq<TAB>next', only whitespace")
    header_line, header = numbered[0]
    if header.strip().split("\t") != ["seq", "next"]:
        raise DataFormatError(path, header_line, f"expected the header 'seq<TAB>next', found {header.strip()!r}")
    histories, nexts, line_numbers = [], [], []
    for n, line in numbered[1:]:
        fields = line.strip("\r\n").split("\t")
        if len(fields) != 2:
            raise DataFormatError(path, n, f"expected 2 tab-separated fields (seq, next), found {len(fields)}")
        target = fields[1].split()
        if len(target) != 1:
            raise DataFormatError(path, n, f"expected one next item, found {len(target)}")
        histories.append(np.array(fields[0].split(), dtype=str))
        nexts.append(target[0])
        line_numbers.append(n)
    if not nexts:
        raise DataFormatError(path, header_line + 1, "no data rows after the header")
    return histories, np.array(nexts, dtype=str), np.array(line_numbers)


def _read_names(path: Path):
    """(ids, cleaned titles) of an `id::name` file."""
    ids, titles, seen = [], [], set()
    for n, line in enumerate(read_text(path).decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        item, sep, name = line.partition("::")
        if not sep or not item.strip():
            raise DataFormatError(path, n, "expected 'id::name'")
        item = item.strip()
        if item in seen:
            raise DataFormatError(path, n, f"duplicate id {item!r}")
        seen.add(item)
        ids.append(item)
        titles.append(clean_title(name))
    return np.array(ids, dtype=str), np.array(titles, dtype=str)


def _to_store(path: Path, table, index_of: dict[str, int], vocab: np.ndarray, item_columns,
              min_history: int, pad_token) -> InteractionStore:
    histories, nexts, line_numbers = table
    rows, sequences = [], []
    for row, (history, target, n) in enumerate(zip(histories, nexts, line_numbers)):
        if pad_token is not None:
            if target == pad_token:
                raise DataFormatError(path, n, f"next item is the padding id {pad_token}")
            history = history[history != pad_token]
        if history.size < min_history:
            continue
        try:
            sequences.append([index_of[t] for t in history] + [index_of[target]])
        except KeyError as e:
            raise DataFormatError(path, n, f"unknown item id {str(e.args[0])!r} (not in {NAMES_FILE})") from None
        rows.append(row)
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    item_ids = np.concatenate(sequences) if sequences else np.zeros(0, np.int64)
    suffix = f",min_history={min_history}" if min_history else ""
    return InteractionStore(user_offsets=np.concatenate([[0], np.cumsum(lengths)]), item_ids=item_ids,
                            timestamps=None, item_vocab=make_item_vocab(vocab),
                            user_vocab=np.array([str(r) for r in rows], dtype=str),
                            item_columns=item_columns, source=f"llara:{path.parent.name}/{path.name}{suffix}")
