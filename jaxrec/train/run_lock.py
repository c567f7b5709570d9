"""One training per run directory: an advisory lock held while `train` runs.

`<run>/train.lock` is locked with `flock` (released by the kernel when the process dies,
so a crash or `kill -9` never leaves a stale lock) and holds the owner's host and PID for
the error message. Only process 0 of a multi-host run takes it.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


class RunDirectoryBusy(RuntimeError):
    """Another live process is training in this run directory."""


class RunLock:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / "train.lock"
        self.enabled = enabled
        self._file = None

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise RunDirectoryBusy(f"{self.path.parent}: already being trained by {owner} (lock {self.path}); "
                                   f"wait for it, stop it, or choose another run.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
