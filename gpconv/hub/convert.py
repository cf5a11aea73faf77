"""Conversions of saved checkpoints: ``gpconv densify`` (the exact dense equivalent)."""

from __future__ import annotations

import os
from pathlib import Path

from ..fsutil import check_output_dir
from ..surgery import densify
from .load import from_pretrained
from .models import load_tokenizer
from .save import save_pretrained


def densify_dir(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, dtype=None) -> Path:
    """``gpconv densify``: load a gpconv checkpoint, write its exact dense equivalent."""
    check_output_dir(out, overwrite)
    model = from_pretrained(src, dtype=dtype)
    densify(model)
    return save_pretrained(model, out, load_tokenizer(src), overwrite=overwrite)
