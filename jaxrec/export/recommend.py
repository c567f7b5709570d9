"""Answering from an export directory alone: `load_recommender(EXPORT)`.

The one interface `jaxrec recommend` and `jaxrec serve` call, whatever the task:

    rec = load_recommender("out/")          # checks manifest.json (format, version, hashes)
    rec.items                               # item tokens; index 0 is padding
    rec.recommend(histories, k=10, exclude_history=None)
        -> [[(item token, score), ...] best first, one list per history]

`histories` are lists of raw item tokens (as in the data file). An unknown token raises
`UnknownItems` naming the token and the history's row; callers decide whether to skip it.
`exclude_history=None` takes the run's `eval.exclude_history` (the one default).
Which class answers is chosen by the manifest's `kind`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

from jaxrec.export.manifest import ExportError, read_manifest


class UnknownItems(ExportError):
    """History tokens that are not in the export's item vocabulary: [(row, token), ...]."""

    def __init__(self, unknown: list[tuple[int, str]]):
        self.unknown = unknown
        shown = ", ".join(f"row {row}: {token!r}" for row, token in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        super().__init__(f"unknown item token(s): {shown}{more}")


class Recommender(Protocol):
    items: list[str]
    manifest: dict

    def recommend(self, histories: Sequence[Sequence[str]], k: int = 10,
                  exclude_history: bool | None = None) -> list[list[tuple[str, float]]]: ...


def load_recommender(export_dir: str | Path) -> Recommender:
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    kind = manifest.get("kind")
    if kind == "scoring":
        from jaxrec.export.seqrec import SeqRecRecommender
        rec = SeqRecRecommender.load(export_dir)
    else:
        raise ExportError(f"{export_dir}: a {kind!r} export ({manifest.get('task')}) cannot answer recommendations")
    rec.manifest = manifest
    return rec
