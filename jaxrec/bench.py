"""What every benchmark JSON records beside its figures: machine, versions, date, memory."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import resource
from pathlib import Path

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "transformers", "torch")


_REPO_ROOT = Path(__file__).resolve().parents[1]


CPU_VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def machine_info() -> dict:
    cpu, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
            if cpu != "unknown" and flags:
                break
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import jax
        devices = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    except Exception:  # jax missing or not initialisable: record that instead of failing the benchmark
        devices = []
    return {"date": datetime.date.today().isoformat(), "platform": platform.platform(), "cpu": cpu,
            # Virtual machines of one name differ in vector units, which decide dtype figures.
            "cpu_vector_flags": sorted(f for f in flags if f in CPU_VECTOR_FLAGS),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "devices": devices,
            "versions": versions}


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def update_json(path: str | Path, benchmark: str, key: str, value) -> Path:
    """Replace one stage's entry of a benchmark JSON (kept: the other stages), stamped with this machine."""
    path = Path(path)
    payload = json.loads(path.read_text()) if path.is_file() else {}
    payload.update({key: value, "benchmark": benchmark, "machine": machine_info()})
    return write_json(path, payload)


def repo_relative(path: str | os.PathLike | None, default: str) -> str:
    """`path` (None: `default`, already relative) relative to the checkout, for a script that
    records it in a committed JSON and runs from the checkout: `write_json` rewrites only paths
    inside the checkout, and data beside it (../shared/...) would otherwise name this machine."""
    return default if path is None else os.path.relpath(os.path.abspath(path), _REPO_ROOT)


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    text = json.dumps(payload, indent=2, default=str)
    # Results are committed: paths inside the checkout are written relative to it.
    text = text.replace(str(_REPO_ROOT) + os.sep, "")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)   # atomic: a killed benchmark never leaves half a file behind
    return path
