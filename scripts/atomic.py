"""Writing files atomically: readers never see half a file, and a failed write leaves the previous file intact."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_json_atomic", "write_text_atomic"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` to write into; it replaces ``path`` when the block ends without error.

    The temporary name keeps ``path``'s suffixes (``.nii.gz``...), for writers that choose a format by name.
    On any error (a kill included, short of SIGKILL) the temporary file is removed and ``path`` is untouched.

    Args:
        path: the destination; its folder is created.

    Yields:
        The temporary file's path (the file exists, empty).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes), dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, newlines untranslated) to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8", newline="")


def write_json_atomic(path: str | os.PathLike, content: Mapping[str, object], indent: int = 2) -> None:
    """Write ``content`` as indented JSON, with a final newline, to ``path`` atomically."""
    write_text_atomic(path, json.dumps(content, indent=indent) + "\n")
