"""Answering from an export directory alone: `load_recommender(EXPORT)`.

The one interface `jaxrec recommend` and `jaxrec serve` call, whatever the task:

    rec = load_recommender("out/")          # checks manifest.json (format, version, hashes)
    rec.items                               # item tokens; index 0 is padding
    rec.recommend(histories, k=10, exclude_history=None)
        -> [[(item token, score), ...] best first, one list per history]

`histories` are lists of raw item tokens (as in the data file). An unknown token raises
`UnknownItems` naming the token and the history's row; callers decide whether to skip it.
`exclude_history=None` takes the run's `eval.exclude_history` (the one default).
Which class answers is the task's business: the manifest names the task, the registry
finds it, and `Task.load_recommender` builds the recommender from the files alone
(scoring exports: `jaxrec.export.scoring`; CoFiRec/TIGER: the generator's export module).
Checking a request before answering it (unknown tokens by row, empty histories, k against
the catalogue) and answering in fixed-size batches is `jaxrec.export.histories`, shared by
every front end.
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


def item_indices(index: dict[str, int], histories: Sequence[Sequence[str]], needs: str) -> list[list[int]]:
    """Each history's item indices; every unknown token raises `UnknownItems` (named with its
    row), an empty history an ExportError naming its row and why the model `needs` an item."""
    unknown = [(row, t) for row, history in enumerate(histories) for t in history if t not in index]
    if unknown:
        raise UnknownItems(unknown)
    empty = [row for row, history in enumerate(histories) if not history]
    if empty:
        raise ExportError(f"row {empty[0]}: empty history; {needs}")
    return [[index[t] for t in history] for history in histories]


class Recommender(Protocol):
    items: list[str]
    manifest: dict

    def recommend(self, histories: Sequence[Sequence[str]], k: int = 10,
                  exclude_history: bool | None = None) -> list[list[tuple[str, float]]]: ...


def load_recommender(export_dir: str | Path) -> Recommender:
    """The recommender of an export: its manifest is checked, then the task named there
    (found by name, like every task) loads it (`Task.load_recommender`)."""
    from jaxrec import registry
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    try:
        task = registry.task_class(str(manifest.get("task")))
    except registry.UnknownTask as e:
        raise ExportError(f"{export_dir / 'manifest.json'}: {e}") from None
    rec = task.load_recommender(export_dir, manifest)
    rec.manifest = manifest
    return rec
