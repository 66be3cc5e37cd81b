"""Writing files atomically: readers never see half a file, and a failed write leaves the previous file intact;
adding whole lines to a file (:func:`append_text`); recognising a written file later by its content
(:func:`file_sha256`); and a folder of its own for an earlier run's files that a new run moves aside
(:func:`new_stamped_folder`, :func:`move_aside`, :func:`keep_earlier_outputs`); holding a folder for one run at a
time (:func:`hold_folder`).

Every file the bundle writes goes through :func:`atomic_path`: PNG and NIfTI outputs, reports, logs, checkpoints
and models; a file that grows by rows during a run (``measurements.csv``) is written whole through it and then
grows through :func:`append_text`, which adds all of a text or none of it. A write that fails (a full disk, a
folder that cannot be written) raises :class:`OutputError` naming the file and its folder, and leaves nothing
behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from scripts.errors import FundusError

try:
    import fcntl
except ImportError:  # Windows: folders are not held (hold_folder)
    fcntl = None

logger = logging.getLogger(__name__)
__all__ = [
    "FileState",
    "OutputError",
    "append_text",
    "atomic_path",
    "file_sha256",
    "folder_holder",
    "hold_folder",
    "keep_earlier_outputs",
    "move_aside",
    "name_while_written",
    "new_stamped_folder",
    "release_folder",
    "save_torch_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


_TEMPORARY_PREFIX = ".{}."
"""How :func:`atomic_path` begins a temporary file's name; ``tempfile.mkstemp`` adds 8 random characters, then the
suffixes."""


def name_while_written(name: str) -> str:
    """The name, random part aside, under which :func:`atomic_path` writes a file named ``name``: the longest name
    the file system must hold for it (``.<name>.xxxxxxxx<suffixes>``)."""
    return _TEMPORARY_PREFIX.format(name) + "x" * 8 + "".join(Path(name).suffixes)


class OutputError(FundusError, OSError):
    """An output file cannot be written (full disk, no permission...); the message names the file and its folder."""


def _cannot_write(path: Path, error: OSError) -> OutputError:
    """The error for ``path`` that ``error`` keeps from being written, with its reason as its ``strerror``: an
    enclosing :func:`atomic_path` (an export written into another's temporary file) names its own file with the same
    reason, not the temporary file and the reason twice."""
    reason = str(error.strerror or error)
    failure = OutputError(f"Cannot write {path} in folder {path.parent} ({reason}).")
    failure.strerror = reason
    return failure


def _umask() -> int:
    # Linux states it; setting and restoring it would, for a moment, apply umask 0 to files other threads create.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` to write into; it replaces ``path`` when the block ends without error.

    The temporary name keeps ``path``'s suffixes (``.nii.gz``...), for writers that choose a format by name. The
    file gets the permissions a plain ``open`` would give it (``0666`` less the umask): ``mkstemp``'s private
    ``0600`` would hide the outputs from pipelines running as another user. On an exception (Ctrl-C included) the
    temporary file is removed, as it is on SIGTERM in a bundle run started from the command line, which turns the
    signal into an exit (:func:`scripts.signals.exit_on_sigterm`). A process killed by a signal it does not handle
    (SIGKILL; SIGTERM outside such a run) leaves it, hidden (``.<name>.<random><suffixes>``; ``TrainingCheckpoint``
    removes its own when the next run starts). Either way ``path`` is untouched: the old file or the new one, whole.

    Args:
        path: the destination; its folder is created.

    Yields:
        The temporary file's path (the file exists, empty).

    Raises:
        OutputError: the folder or the file cannot be written (the block's own ``OSError``, e.g. a full disk,
            included).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX.format(path.name), suffix="".join(path.suffixes),
                                             dir=path.parent)
        os.close(handle)
    except OSError as error:
        raise _cannot_write(path, error) from None
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except OSError as error:
        raise _cannot_write(path, error) from None
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, newlines untranslated) to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8", newline="")


class FileState(NamedTuple):
    """What tells a file as its writer left it from one changed since: a file put in its place has another inode, an
    edited one another size or modification time."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> FileState:
        """The state of ``path`` now (``OSError`` where it cannot be read, e.g. gone)."""
        return cls._from_stat(os.stat(path))

    @classmethod
    def _from_stat(cls, status: os.stat_result) -> FileState:
        return cls(status.st_ino, status.st_size, status.st_mtime_ns)


def append_text(path: str | os.PathLike, text: str, state: FileState) -> FileState | None:
    """Add ``text`` (UTF-8) at the end of ``path`` if the file is still as its writer left it (``state``).

    Rewriting a file that grows by a few lines per step costs the square of its length over a run (a
    ``measurements.csv`` of 10,000 rows rewritten after each image: 15 minutes); this adds the lines alone. The file
    holds all of ``text`` or none of it: a failed or interrupted write (a full disk, Ctrl-C, SIGTERM) cuts the file
    back to its size before the error goes on. Only a process killed by SIGKILL in the middle of the write, or a
    power cut, can leave part of it; and a reader may see the end of the file in the moment it is being written.

    Args:
        path: the file, written before by this writer (:func:`write_text_atomic`, then this).
        text: what to add, whole lines.
        state: the file's state when its writer last wrote it (:meth:`FileState.of`, or this function's return).

    Returns:
        The file's new state; None, with nothing written, when the file is gone or no longer in ``state``
        (replaced, edited or cut since): the caller writes it whole again rather than add to what it did not write.

    Raises:
        OutputError: the file cannot be opened or written.
    """
    path = Path(path)
    data = memoryview(text.encode("utf-8"))
    try:
        try:
            handle = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            return None
        try:
            if FileState._from_stat(os.fstat(handle)) != state:
                return None
            try:
                while data:  # a write may take part of the bytes (a signal, a nearly full disk)
                    data = data[os.write(handle, data) :]
            except BaseException:
                os.ftruncate(handle, state.size)  # all of the text or none of it: never half a line
                raise
            return FileState._from_stat(os.fstat(handle))
        finally:
            os.close(handle)
    except OSError as error:
        raise _cannot_write(path, error) from None


def write_json_atomic(path: str | os.PathLike, content: Mapping[str, object], indent: int = 2) -> None:
    """Write ``content`` as indented JSON, with a final newline, to ``path`` atomically."""
    write_text_atomic(path, json.dumps(content, indent=indent) + "\n")


def save_torch_atomic(content: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over ``path``.

    Args:
        content: what to save.
        path: the destination; the previous file stays whole until the new one is complete.
    """
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        try:
            torch.save(content, handle)
        except Exception as error:
            # Interrupted between two records (Ctrl-C, SIGTERM), torch's zip writer fails to close the archive on
            # the way out and raises its own error ("unexpected pos ...") in place of the interruption, which is
            # what happened and what the run must stop with.
            if isinstance(error.__context__, BaseException) and not isinstance(error.__context__, Exception):
                raise error.__context__ from None
            raise
        handle.flush()
        os.fsync(handle.fileno())


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in blocks (a Hiera-large checkpoint or ONNX export is about 1 GB).

    Args:
        path: the file.

    Returns:
        The digest as 64 hexadecimal digits.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def new_stamped_folder(parent: str | os.PathLike) -> Path:
    """Create a new folder in ``parent`` named by the time (``20261202-031500``), which no other run shares.

    Args:
        parent: where the folder goes (created if needed).

    Returns:
        The new, empty folder; ``<time>-2``, ``-3``... when runs started within the same second.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, number = Path(parent) / stamp, 1
    while True:
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            number += 1
            folder = Path(parent) / f"{stamp}-{number}"


def move_aside(paths: Iterable[Path], parent: str | os.PathLike) -> Path:
    """Move files into a new folder of ``parent`` named by the time (:func:`new_stamped_folder`), keeping their names.

    Args:
        paths: the files, each in ``parent``'s file system (a move is a rename).
        parent: where the new folder goes (created if needed).

    Returns:
        The folder they went to.
    """
    target = new_stamped_folder(parent)
    for path in paths:
        path.replace(target / path.name)
    return target


def keep_earlier_outputs(
    output_dir: str | os.PathLike, patterns: Iterable[str], kind: str, reason: str | None = None
) -> Path | None:
    """Move an earlier run's files out of ``output_dir`` before a new run of the same ``kind`` writes its own.

    The one rule of the tools that write reports into a folder they are given (evaluation, scoring, the baseline,
    the benchmark): a rerun never replaces what the last run measured without a word. A file the new run does not
    write would otherwise sit beside its files and pass for one of them; moving, not deleting, keeps the earlier
    figures should the new run fail.

    Args:
        output_dir: the run's output folder.
        patterns: the names (or ``glob`` patterns) of the files the run writes there.
        kind: what the run is (``"evaluation"``), for the folder ``earlier_<kind>s`` and the warning.
        reason: the end of the warning, saying why they were moved; by default, before this run writes its own.

    Returns:
        The folder the earlier files went to, ``<output_dir>/earlier_<kind>s/<time>``, or None when there were none.
    """
    output_dir = Path(output_dir)
    found = sorted({path for pattern in patterns for path in output_dir.glob(pattern) if path.is_file()})
    if not found:
        return None
    target = move_aside(found, output_dir / f"earlier_{kind}s")
    logger.warning(
        f"{output_dir} held an earlier {kind}'s reports ({', '.join(path.name for path in found)}): moved to "
        f"{target} {reason or f'before this {kind} writes its own'}."
    )
    return target


# The open lock files of this process's runs, by lock path: the kernel releases a lock when its process ends, killed
# or not, so none is ever left stale.
_held_locks: dict[Path, Any] = {}


def _read_holder(lock: Any) -> str:
    """The text the holding process wrote into its lock file (who and since when)."""
    lock.seek(0)
    return lock.read().strip() or "another process"


def _lock_to_take(folder: str | os.PathLike, lock_name: str) -> Path | None:
    """The lock file of ``folder``, or None where there is nothing to take: this process holds it already, or
    ``fcntl`` is missing (Windows)."""
    if fcntl is None:
        return None
    path = Path(folder).absolute() / lock_name
    return None if path in _held_locks else path


def hold_folder(folder: str | os.PathLike, lock_name: str) -> str | None:
    """Hold ``folder`` for this process's run, unless another process holds it.

    The hold is an advisory lock (``flock``) on ``<folder>/<lock_name>``, a hidden file naming the holder: two runs
    writing into one folder (the same command started twice, a scheduler resubmitting a job that still runs) would
    otherwise mix or move each other's files. The kernel releases it whenever the process ends, killed included, so
    no stale lock is left to clear. Holding it again in the same process holds it still. Where ``fcntl`` is missing
    (Windows), nothing is held.

    Args:
        folder: the run's folder, existing.
        lock_name: the lock file's name in it (hidden, so that no folder check takes it for an output).

    Returns:
        None when this process holds the folder; else the other holder's text (process, host, start time).
    """
    path = _lock_to_take(folder, lock_name)
    if path is None:
        return None
    lock = open(path, "a+")  # noqa: SIM115 - held open for the life of the process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(lock)
        lock.close()
        return holder
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {os.uname().nodename}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    lock.flush()
    _held_locks[path] = lock
    return None


def folder_holder(folder: str | os.PathLike, lock_name: str) -> str | None:
    """Who holds ``folder`` (:func:`hold_folder`), if another process does, without holding it or writing anything.

    A run checks this before judging what the folder holds: files another run is writing are no earlier run's.

    Args:
        folder: the folder, existing or not.
        lock_name: the lock file's name in it.

    Returns:
        The other holder's text, or None when no other process holds the folder (or ``fcntl`` is missing).
    """
    path = _lock_to_take(folder, lock_name)
    if path is None:
        return None
    try:
        lock = open(path)  # noqa: SIM115 - closed below; flock needs no write access
    except OSError:  # no lock file (nor folder): nobody holds it
        return None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(lock)
    return None


def release_folder(folder: str | os.PathLike, lock_name: str) -> None:
    """Let go of a folder :func:`hold_folder` held, at the end of a run whose process goes on (a run started from
    Python); a process that ends lets go by itself.

    Args:
        folder: the run's folder.
        lock_name: the lock file's name in it.
    """
    lock = _held_locks.pop(Path(folder).absolute() / lock_name, None)
    if lock is not None:
        lock.close()  # closing the file releases its flock
