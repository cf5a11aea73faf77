"""Filesystem helpers: output directories that are refused before any work, and writes that
land whole or not at all (a temporary directory or file beside the target, renamed into place).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import GPConvError


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output path that exists and is not an empty directory, unless ``overwrite``."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise GPConvError(f"output path {out} exists and is not a directory")
    parent = next((p for p in out.parents if p.exists()), None)  # the nearest one that exists
    if parent is not None and not parent.is_dir():  # the directory could never be created, after all the work
        raise GPConvError(f"output path {out}: {parent} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise GPConvError(f"output directory {out} exists and is not empty; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that becomes ``out`` only if the block finishes."""
    out = check_output_dir(out, overwrite).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "x")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it: a reader sees the old file
    or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
