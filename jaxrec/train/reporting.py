"""Where numbers go: a JSONL metrics file (tests read it), TensorBoard events, tables."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping

import jax


class MetricsWriter:
    """Appends one JSON object per event to `<run>/metrics.jsonl`; mirrors scalars to TensorBoard.

    Only process 0 writes. The file is opened in append mode so a resumed run keeps its
    history; each line is flushed, so a killed run loses at most the line being written.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, kind: str, step: int, values: Mapping[str, object]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), "time": round(time.time(), 3), **_jsonable(values)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    # TensorBoard tags allow only [-/\w.]: "ndcg@10" is filed as "ndcg_10".
                    self._tb.add_scalar(f"{kind}/{key}".replace("@", "_"), value, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _jsonable(values: Mapping[str, object]) -> dict:
    out = {}
    for key, value in values.items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        out[key] = value
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


METRIC_ORDER = ("hr", "ndcg", "mrr", "recall")


def column_order(names: list[str]) -> list[str]:
    """hr/ndcg/mrr/recall grouped by K ascending, then any other columns, `examples` last."""
    def key(name: str):
        metric, _, k = name.partition("@")
        if k.isdigit() and metric in METRIC_ORDER:
            return (0, int(k), METRIC_ORDER.index(metric), name)
        return (2, 0, 0, name) if name == "examples" else (1, 0, 0, name)
    return sorted(names, key=key)


def metrics_table(rows: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """Rows = {row label: {metric: value}}; columns are the union of scalar metric names."""
    columns: list[str] = []
    for values in rows.values():
        for key, value in values.items():
            if key not in columns and isinstance(value, (int, float)):
                columns.append(key)
    columns = column_order(columns)
    label_width = max([len(r) for r in rows] + [5])
    widths = [max(len(c), 7) for c in columns]
    lines = [title] if title else []
    lines.append(" ".join([" " * label_width] + [c.rjust(w) for c, w in zip(columns, widths)]))
    for label, values in rows.items():
        cells = []
        for c, w in zip(columns, widths):
            v = values.get(c)
            text = "-" if v is None else f"{int(v):,}" if c == "examples" else f"{v:.4f}"
            cells.append(text.rjust(w))
        lines.append(" ".join([label.ljust(label_width)] + cells))
    return "\n".join(lines)


def format_report(model_name: str, tests: dict, baselines: dict, protocols: dict, step: int) -> str:
    blocks = []
    for split, values in tests.items():
        rows = {f"{model_name} (step {step})": values}
        for name, per_split in baselines.items():
            if split in per_split:
                rows[name] = per_split[split]
        blocks.append(metrics_table(rows, title=f"[{split}] {protocols.get(split, '')}"))
    return "\n\n".join(blocks)
