"""`manifest.json`: what an export directory is, where it came from, and its files' hashes.

Every `jaxrec export` writes one, last, after the task's files:

    {"format": "jaxrec-export", "version": 1, "task": "seqrec", "kind": "...",
     "run": {"dir": ..., "step": 200, "best": true}, "protocol": {split: label},
     "metrics": {split: {metric: value}} (the exported step's test metrics, when known),
     "inputs": {name: sha256} (the run's frozen inputs: data, base model, upstream runs),
     "external": {name: {"path": ..., "sha256": ...}} (files the export needs but does not copy),
     "versions": {"jaxrec": ..., "jax": ..., "python": ...},
     "files": {relative path: sha256}, "created": ISO time,
     "details": {...} (the task's own description: sizes, levels, templates)}

`read_manifest` is the one gate for readers: a missing or foreign manifest, a version from
the future, a file that is missing or whose hash differs (tampered or truncated) — each is
an `ExportError` naming the file, never a traceback further down.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import platform
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

FORMAT = "jaxrec-export"
VERSION = 1
MANIFEST = "manifest.json"


class ExportError(ValueError):
    """A bad export directory or request; the message is one line naming the file."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sha256_of(target: Path) -> str:
    """A file's SHA-256, or a checkpoint directory's (config + weights, as the run fingerprinted it)."""
    if target.is_dir():
        from jaxrec.weights.fingerprint import checkpoint_sha256
        return checkpoint_sha256(target)
    return file_sha256(target)


def _versions() -> dict[str, str]:
    import jax

    import jaxrec
    return {"jaxrec": jaxrec.__version__, "jax": jax.__version__, "python": platform.python_version()}


def prepare_out_dir(out_dir: str | Path, run_dir: str | Path, force: bool = False) -> Path:
    """The export directory, refusing one that holds another run's export (or any other
    files) unless `force`, in which case the old contents are removed first."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a directory")
    contents = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if contents and not force:
        owner = ""
        if (out_dir / MANIFEST).is_file():
            try:
                previous = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8")).get("run", {}).get("dir")
            except (ValueError, OSError):
                previous = None
            same = previous == str(Path(run_dir).absolute())
            owner = f" (an export of {'this run' if same else previous or 'another run'})"
        raise ExportError(f"{out_dir}: not empty{owner}: {', '.join(contents[:5])}"
                          f"{' …' if len(contents) > 5 else ''}; choose another directory or pass --force "
                          f"to replace its contents")
    if contents and force:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_manifest(out_dir: str | Path, *, task: str, kind: str, run_dir: str | Path, step: int, best: bool,
                   files: Iterable[str | Path], protocols: Mapping[str, str] | None = None,
                   metrics: Mapping[str, Mapping[str, Any]] | None = None,
                   inputs: Mapping[str, str] | None = None,
                   external: Mapping[str, Mapping[str, str]] | None = None,
                   extra: Mapping[str, Any] | None = None) -> Path:
    out_dir = Path(out_dir)
    hashes = {}
    for path in files:
        path = Path(path)
        rel = path.relative_to(out_dir).as_posix() if path.is_absolute() else path.as_posix()
        if rel == MANIFEST:
            continue
        hashes[rel] = file_sha256(out_dir / rel)
    manifest = {"format": FORMAT, "version": VERSION, "task": task, "kind": kind,
                "run": {"dir": str(Path(run_dir).absolute()), "step": int(step), "best": bool(best)},
                "protocol": dict(protocols or {}), "metrics": {k: dict(v) for k, v in (metrics or {}).items()},
                "inputs": dict(inputs or {}), "external": {k: dict(v) for k, v in (external or {}).items()},
                "versions": _versions(), "files": dict(sorted(hashes.items())),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "details": dict(extra or {})}
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, default=float) + "\n", encoding="utf-8")
    return path


def read_manifest(export_dir: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of an export, checked: format, version, and (with `verify`) every
    listed file's SHA-256 and every external file's."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path}: missing (not a jaxrec export directory; make one with `jaxrec export RUN OUT`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ExportError(f"{path}: format {got!r}, expected {FORMAT!r}")
    version = manifest.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ExportError(f"{path}: format version {version!r} is newer than this jaxrec reads ({VERSION}); "
                          f"upgrade jaxrec")
    if verify:
        for rel, digest in manifest.get("files", {}).items():
            target = export_dir / rel
            if not target.is_file():
                raise ExportError(f"{target}: listed in {MANIFEST} but missing")
            if file_sha256(target) != digest:
                raise ExportError(f"{target}: SHA-256 differs from {MANIFEST} (the file was changed or damaged "
                                  f"after export)")
        for name, ref in manifest.get("external", {}).items():
            target = Path(ref.get("path", ""))
            if not target.exists():
                raise ExportError(f"{path}: external {name} {target} not found (the export needs it beside it)")
            if ref.get("sha256") and _sha256_of(target) != ref["sha256"]:
                raise ExportError(f"{target}: SHA-256 differs from the {name} this export was made with")
    return manifest
