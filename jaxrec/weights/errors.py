"""Errors raised while reading checkpoints; each names the file or tensor at fault."""
from __future__ import annotations

from jaxrec.models.llama_config import UnsupportedModelError  # noqa: F401  (one error type for both layers)


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint directory, file, shard or tokenizer that is not where it should be."""


class CheckpointFormatError(ValueError):
    """A file that exists but cannot be read as the format it claims to be."""


class TensorMismatchError(ValueError):
    """A tensor that is missing from a checkpoint or has the wrong shape."""
