"""What the bundle workflows read and write, checked before any work starts: datalists, image folders, files, folders."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path

from scripts.fundus_io import SUPPORTED_SUFFIXES

__all__ = ["InputError", "image_folder_datalist", "load_split", "require_file", "writable_folder"]

CHECKED_KEYS = ("image", "label", "fov")


class InputError(ValueError):
    """A datalist, image folder, file or output folder cannot serve a workflow; the message names it and why."""


def load_split(datalist: str | os.PathLike, split: str) -> list[dict]:
    """The entries of one split of a datalist, paths resolved against the datalist's folder.

    Checking every path before the first epoch turns a typo in entry 900 into an error at start-up rather than
    a crash hours into training.

    Args:
        datalist: a JSON datalist with ``training``, ``validation`` and ``test`` lists (``scripts.prepare``,
            ``scripts.synthetic``).
        split: the list to read.

    Returns:
        The entries, with ``image``, ``label`` (one path or a list of paths) and ``fov`` made absolute.

    Raises:
        InputError: the datalist is missing or unreadable, lacks the split, the split is empty, or an entry
            names a file that does not exist.
    """
    path = Path(datalist)
    if not path.is_file():
        raise InputError(f"Datalist {path} does not exist (prepare one with `python -m scripts.prepare`).")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"Datalist {path} cannot be read as JSON ({error}).") from None
    if not isinstance(content, dict) or not isinstance(content.get(split), list):
        raise InputError(f"Datalist {path} has no '{split}' list.")
    # Only the file keys are resolved: MONAI's load_decathlon_datalist would also turn a value such as
    # "dataset": "DRIVE" into a path whenever a folder of that name lies beside the datalist.
    entries = [
        {key: _resolve(value, path.parent) if key in CHECKED_KEYS else value for key, value in entry.items()}
        for entry in content[split]
    ]
    if not entries:
        raise InputError(f"Datalist {path}: the '{split}' list is empty.")
    missing = [
        f"entry {index} {key}: {file}"
        for index, entry in enumerate(entries)
        for key in CHECKED_KEYS
        for file in _as_list(entry.get(key))
        if not os.path.isfile(file)
    ]
    if missing:
        raise InputError(
            f"Datalist {path} names {len(missing)} missing files in '{split}', e.g. " + "; ".join(missing[:3])
        )
    return entries


def image_folder_datalist(folder: str | os.PathLike) -> list[dict]:
    """One ``{"image": path}`` entry per fundus image in ``folder`` (sorted), for inference on a plain folder.

    Raises:
        InputError: the folder does not exist or holds no image of a supported format.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"Image folder {folder} does not exist.")
    files = sorted(
        file
        for file in glob.glob(str(folder / "*"))
        if os.path.isfile(file) and file.lower().removesuffix(".gz").endswith(SUPPORTED_SUFFIXES)
    )
    if not files:
        raise InputError(f"Image folder {folder} holds no image ({', '.join(sorted(SUPPORTED_SUFFIXES))}).")
    return [{"image": file} for file in files]


def _resolve(value: str | list[str], base: Path) -> str | list[str]:
    if isinstance(value, str):
        return str(base / value)
    return [str(base / item) for item in value]


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def require_file(path: str | os.PathLike, what: str, hint: str = "") -> str:
    """``path`` unchanged if it is an existing file.

    Args:
        path: the file a workflow needs.
        what: what the file is, for the message (e.g. "Trained model").
        hint: how to get it, appended to the message.

    Raises:
        InputError: the file does not exist.
    """
    if not os.path.isfile(path):
        raise InputError(f"{what} {path} does not exist. {hint}".strip())
    return str(path)


def writable_folder(path: str | os.PathLike) -> str:
    """``path`` unchanged after making sure it exists (created if needed) and files can be written into it.

    Raises:
        InputError: the folder cannot be created or written.
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise InputError(f"Output folder {folder} cannot be written ({error.strerror or error}).") from None
    return str(path)
