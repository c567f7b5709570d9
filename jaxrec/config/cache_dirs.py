"""Per-user cache directories (compiled programs, built tokenizers): one rule for all of them."""
from __future__ import annotations

import os
from pathlib import Path

OFF = ("off", "0", "false", "no")


def user_cache_dir(env_var: str, name: str) -> Path | None:
    """$`env_var` (a directory, or "off" → None), else $XDG_CACHE_HOME/jaxrec/`name`,
    else ~/.cache/jaxrec/`name`."""
    env = os.environ.get(env_var, "")
    if env.lower() in OFF:
        return None
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxrec" / name
