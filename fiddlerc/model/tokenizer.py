"""The model folder's own tokenizer."""

from __future__ import annotations

from pathlib import Path

from fiddlerc.errors import ModelFolderError


def load_tokenizer(folder: str | Path):
    """The model folder's own tokenizer (never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())  # transformers' reasons span lines; the CLI prints errors on one
        raise ModelFolderError(
            f"{folder} has no usable tokenizer ({reason}): add the model's tokenizer files, or use the Python API "
            "with token ids"
        ) from None
