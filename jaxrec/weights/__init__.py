"""Checkpoint loading: Hugging Face safetensors directories and GGUF files → jaxrec params.

    from jaxrec.weights import load_pretrained, load_tokenizer
    config, params = load_pretrained("path/to/hf_dir_or_file.gguf", dtype="bfloat16")
    tokenizer = load_tokenizer("path/to/hf_dir_or_file.gguf")
"""
from jaxrec.weights.errors import (CheckpointFormatError, CheckpointNotFoundError, TensorMismatchError,
                                   UnsupportedModelError)
from jaxrec.weights.loading import load_config, load_params, load_pretrained, open_checkpoint
from jaxrec.weights.tokenizer import load_tokenizer, token_ids_containing

__all__ = [
    "CheckpointFormatError", "CheckpointNotFoundError", "TensorMismatchError", "UnsupportedModelError",
    "load_config", "load_params", "load_pretrained", "open_checkpoint", "load_tokenizer", "token_ids_containing",
]
