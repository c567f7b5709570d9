"""`jaxrec recommend`: histories of raw item tokens in, one JSON line of top-k items out per history.

Input, one history per line (or per command-line argument): item tokens as in the data file,
separated by spaces and/or commas (`12 7 431` or `12,7,431`), or a JSON list of tokens
(`["B00X 1", "B00Y"]`, for tokens that hold a space or a comma; numbers become their text).
Row i is the i-th history, counted from 0 (blank lines are empty histories, an error).

Output, in row order:

    {"row": 0, "items": ["431", "12"], "scores": [3.91, 3.55]}
    {"row": 1, "items": [...], "scores": [...], "skipped": ["nope"]}     (with --skip-unknown)

Everything is read and checked before the first line is written, so a bad row (an unknown
token, an empty history, k beyond what the export ranks) produces one error line and no
partial output. Histories are answered in batches of a fixed size (the last one padded),
so a long stream compiles one program, not one per batch shape.
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator, Sequence

from jaxrec.export.manifest import ExportError
from jaxrec.export.recommend import Recommender, UnknownItems


def parse_history(text: str, where: str) -> list[str]:
    """The tokens of one input line (see the module docstring); `where` names it in errors."""
    text = text.strip()
    if text.startswith("["):
        try:
            tokens = json.loads(text)
        except ValueError as e:
            raise ExportError(f"{where}: not a JSON list of item tokens ({e})") from None
        if not isinstance(tokens, list) or not all(isinstance(t, (str, int)) and not isinstance(t, bool)
                                                   for t in tokens):
            raise ExportError(f"{where}: a JSON history must be a list of strings or integers")
        return [str(t) for t in tokens]
    return [t for t in text.replace(",", " ").split() if t]


def read_histories(arguments: Sequence[str], lines: Iterable[str] | None, source: str) -> list[list[str]]:
    """Histories from command-line arguments, then from `lines` (a file or stdin named `source`)."""
    histories = [parse_history(a, f"argument {i + 1}") for i, a in enumerate(arguments)]
    if lines is not None:
        for number, line in enumerate(lines, 1):
            histories.append(parse_history(line, f"{source}:{number}"))
    return histories


def check_histories(rec: Recommender, histories: Sequence[Sequence[str]],
                    skip_unknown: bool) -> tuple[list[list[str]], dict[int, list[str]]]:
    """(histories with unknown tokens removed, {row: removed tokens}). Unknown tokens raise
    `UnknownItems` (every one named with its row) unless `skip_unknown`; an empty history,
    given or left after skipping, is an error naming its row."""
    known = set(rec.items[1:])
    unknown = [(row, t) for row, history in enumerate(histories) for t in history if t not in known]
    if unknown and not skip_unknown:
        raise UnknownItems(unknown)
    skipped: dict[int, list[str]] = {}
    for row, token in unknown:
        skipped.setdefault(row, []).append(token)
    cleaned = [[t for t in history if t in known] for history in histories] if unknown else \
        [list(h) for h in histories]
    for row, history in enumerate(cleaned):
        if not history:
            after = f" (after skipping unknown {', '.join(map(repr, skipped[row][:5]))})" if row in skipped else ""
            raise ExportError(f"row {row}: empty history{after}; a next item needs at least one item before it")
    return cleaned, skipped


def check_k(rec: Recommender, k: int) -> None:
    catalogue = len(rec.items) - 1
    if not 1 <= k <= catalogue:
        raise ExportError(f"-k: {k} must be in 1..{catalogue} (the catalogue has {catalogue} items)")


def answer(rec: Recommender, histories: Sequence[Sequence[str]], k: int, exclude_history: bool | None,
           batch_size: int, skipped: dict[int, list[str]] | None = None) -> Iterator[dict]:
    """One result dict per history, in order, computed `batch_size` histories at a time."""
    if batch_size < 1:
        raise ExportError(f"--batch-size: must be >= 1, got {batch_size}")
    skipped = skipped or {}
    for start in range(0, len(histories), batch_size):
        batch = list(histories[start:start + batch_size])
        real = len(batch)
        # The last batch is padded with copies of its first history: one batch shape, one program.
        batch += [batch[0]] * (min(batch_size, len(histories)) - real)
        for offset, top in enumerate(rec.recommend(batch, k=k, exclude_history=exclude_history)[:real]):
            row = start + offset
            line = {"row": row, "items": [token for token, _ in top], "scores": [score for _, score in top]}
            if row in skipped:
                line["skipped"] = skipped[row]
            yield line


def recommend_lines(rec: Recommender, histories: Sequence[Sequence[str]], k: int, exclude_history: bool | None,
                    batch_size: int, skip_unknown: bool) -> tuple[Iterator[str], dict[int, list[str]]]:
    """(JSON lines, {row: skipped tokens}): checks everything, and answers the first batch,
    before returning, so every error comes before any output."""
    check_k(rec, k)
    cleaned, skipped = check_histories(rec, histories, skip_unknown)
    results = answer(rec, cleaned, k, exclude_history, batch_size, skipped)
    first = next(results, None)   # k beyond the export's ranked list is refused here

    def lines():
        if first is None:
            return
        yield json.dumps(first)
        for result in results:
            yield json.dumps(result)
    return lines(), skipped
