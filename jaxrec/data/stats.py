"""Summary statistics of a store (`jaxrec data stats PATH`)."""
from __future__ import annotations

import numpy as np

from jaxrec.data.store import InteractionStore

PERCENTILES = (5, 25, 50, 75, 95, 99)


def describe(store: InteractionStore) -> dict:
    """Plain-Python summary (JSON-serialisable): sizes, sequence lengths, item popularity."""
    lengths = store.lengths()
    counts = np.bincount(store.item_ids, minlength=store.n_items + 1)[1:]
    n_users, n_items, n = store.n_users, store.n_items, store.n_interactions
    top = np.sort(counts)[::-1]
    out = {
        "source": store.source,
        "users": n_users,
        "items": n_items,
        "interactions": n,
        "density": n / (n_users * n_items) if n_users and n_items else 0.0,
        "items_never_seen": int((counts == 0).sum()),
        "repeat_fraction": _repeat_fraction(store),
        "length": {"min": int(lengths.min()) if n_users else 0, "mean": float(lengths.mean()) if n_users else 0.0,
                   "max": int(lengths.max()) if n_users else 0,
                   **{f"p{q}": float(np.percentile(lengths, q)) if n_users else 0.0 for q in PERCENTILES}},
        "users_with_at_least": {str(k): int((lengths >= k).sum()) for k in (3, 5, 20, 33)},
        "top1pct_items_share": float(top[:max(1, n_items // 100)].sum() / n) if n else 0.0,
        "item_columns": sorted(store.item_columns),
        "timestamps": None,
    }
    if store.timestamps is not None and n:
        ts = store.timestamps
        out["timestamps"] = {"min": ts.min().item(), "max": ts.max().item(),
                             **{f"p{q}": float(np.percentile(ts, q)) for q in (10, 50, 90)}}
    return out


def _repeat_fraction(store: InteractionStore) -> float:
    """Share of events whose item the same user already had earlier."""
    if not store.n_interactions:
        return 0.0
    pairs = store.user_of_interaction() * (store.n_items + 1) + store.item_ids
    return 1.0 - np.unique(pairs).size / store.n_interactions


def format_stats(stats: dict) -> str:
    length = stats["length"]
    lines = [
        f"source        {stats['source']}",
        f"users         {stats['users']:,}",
        f"items         {stats['items']:,}" + (f" ({stats['items_never_seen']:,} never interacted with)"
                                              if stats["items_never_seen"] else ""),
        f"interactions  {stats['interactions']:,}",
        f"density       {stats['density']:.4%}",
        f"repeats       {stats['repeat_fraction']:.2%} of events re-visit an item of the same user",
        f"top 1% items  {stats['top1pct_items_share']:.2%} of events",
        "length        min {min}  mean {mean:.1f}  max {max}".format(**length),
        "              " + "  ".join(f"p{q} {length[f'p{q}']:g}" for q in PERCENTILES),
        "users with >= " + "  ".join(f"{k}: {v:,}" for k, v in stats["users_with_at_least"].items()),
    ]
    if stats["timestamps"]:
        ts = stats["timestamps"]
        lines.append(f"timestamps    {ts['min']:.10g} .. {ts['max']:.10g} (p10 {ts['p10']:.10g}, "
                     f"p50 {ts['p50']:.10g}, p90 {ts['p90']:.10g})")
    else:
        lines.append("timestamps    none")
    if stats["item_columns"]:
        lines.append(f"item columns  {', '.join(stats['item_columns'])}")
    return "\n".join(lines)
