"""The project's errors, and how they reach a user: one line naming the file or setting, not a traceback.

Every error raised for a user's input or setting derives from :class:`FundusError`, whose message is written for
users (which file, which setting, what is wrong, and the fix where there is one). Command-line entry points report
them in one line on stderr and exit with status 1; any other exception is a bug and keeps its traceback:

- the bundle's workflows (``python -m monai.bundle run ...``) install :func:`install_error_hook` first thing in
  their ``initialize`` list (a program with an error hook of its own keeps it); a bundle command line installs it
  earlier still, when the config parser imports this module, which it does before MONAI writes the executed config
  of a run with ``--tracking`` into the output folder;
- the offline tools wrap their ``main`` in :func:`command_line`.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import pickle
import pydoc
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "ConfigError",
    "FundusError",
    "SharedMemoryError",
    "command_line",
    "first_line",
    "hash_sign_hint",
    "install_error_hook",
    "is_bundle_command_line",
    "is_real_number",
    "is_whole_number",
    "unreadable_torch_file",
    "user_error",
]


class FundusError(Exception):
    """Base of the errors this project raises for a user's input or setting; the message names it and what is wrong."""


class ConfigError(FundusError, ValueError):
    """A setting of a workflow or tool has a value it cannot work with; the message names the setting."""


class SharedMemoryError(FundusError, RuntimeError):
    """The data loader's workers ran out of shared memory (``/dev/shm``); the message says the fix."""


# What torch says when its data-loader workers cannot hand a batch over through /dev/shm: a tmpfs full (Docker's
# 64 MB default against a 4000 x 3000 photograph), or a worker killed by SIGBUS on touching a page it cannot have.
_SHARED_MEMORY_FULL = re.compile(
    r"unable to allocate shared memory|unable to write to file </torch_|out of shared memory|"
    r"insufficient shared memory",
    re.IGNORECASE,
)


def _shared_memory_full(error: BaseException) -> SharedMemoryError | None:
    """The one-line error for torch's own when its data-loader workers ran out of shared memory, else None.

    Args:
        error: an exception of the chain :func:`user_error` walks.

    Returns:
        A :class:`SharedMemoryError` saying what happened and the fix, or None for any other error.
    """
    text = str(error)
    found = _SHARED_MEMORY_FULL.search(text) if isinstance(error, RuntimeError) else None
    if found is None:
        return None
    # The line that says it: a worker's error arrives as the text of its whole traceback.
    said = text[text.rfind("\n", 0, found.start()) + 1 :].split("\n", 1)[0].strip()[:300]
    return SharedMemoryError(
        f"The data loader's workers ran out of shared memory (/dev/shm is full; Docker gives a container 64 MB "
        f"unless told otherwise): {said}. Run with --num_workers 0, or give the container more shared memory "
        "(docker run --shm-size 2g, or --ipc host)."
    )


def is_real_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float, not a bool. A setting's check asks this before it compares, so
    that ``--gradient_clip_norm abc`` (which arrives as a string) gets the setting's one-line error, not a
    TypeError from the comparison."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_whole_number(value: Any) -> bool:
    """Whether ``value`` is an int, not a bool (``True`` is an int to Python, not a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def first_line(error: BaseException) -> str:
    """The first line of another library's error message (at most 300 characters), to quote in one of ours: torch's
    unpickling errors, for one, run to several paragraphs."""
    return (str(error).strip().splitlines() or [""])[0][:300]


def hash_sign_hint(path: str | os.PathLike) -> str:
    """For a missing file or folder whose path holds ``::``: that MONAI's config parser writes a ``#`` so (its id
    separator), which a path given to the bundle from Python (a workflow's overrides) cannot hold; "" otherwise.
    (``python -m monai.bundle`` command lines are refused before, by :func:`scripts.inputs.check_command_line`.)"""
    if "::" not in os.fspath(path):
        return ""
    return (
        " (MONAI's config parser turns every '#' in a setting into '::': a path holding '#' cannot be given to the "
        "bundle; rename it, or give a link to it whose path has no '#')"
    )


def unreadable_torch_file(error: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` could not read a file, to quote in one of ours.

    Its refusal of anything but tensors and plain values, which also meets a file that is no torch archive at all,
    advises re-running with ``weights_only=False``: advice to run a stranger's code, which is left out.
    """
    if isinstance(error, pickle.UnpicklingError):
        return "not a file of tensors and plain values: damaged, written by another program, or holding code"
    if isinstance(error, KeyError):  # the legacy unpickler's reading of a file that is no torch archive (text)
        return "not a torch file: neither a zip archive nor a pickle"
    if "failed finding central directory" in str(error):  # torch's message runs on and is cut mid-word
        return "a torch archive cut short (its zip directory is missing): damaged, or not fully copied"
    return f"{type(error).__name__}: {first_line(error)}"


# How a data-loader worker's traceback, relayed as text, names one of ours: "scripts.fundus_io.FundusImageError: ...".
_RELAYED_ERROR = re.compile(r"^scripts\.[\w.]+\.(\w+): (.+)$", re.MULTILINE)


def _error_classes(base: type[FundusError] = FundusError) -> dict[str, type[FundusError]]:
    """:class:`FundusError` and its subclasses (those imported), by name."""
    classes = {base.__name__: base}
    for subclass in base.__subclasses__():
        classes.update(_error_classes(subclass))
    return classes


def _relayed_from_worker(error: BaseException) -> FundusError | None:
    """One of ours that a torch data-loader worker raised, rebuilt from the text the main process received.

    torch re-raises a worker's error as a new exception holding only the text of the worker's traceback (its type
    is the outermost error's: MONAI's ``RuntimeError("applying transform ...")``), so the chain of causes is lost.
    """
    text = str(error)
    if "DataLoader worker process" not in text:
        return None
    classes = _error_classes()
    ours = [match for match in _RELAYED_ERROR.finditer(text) if match.group(1) in classes]
    # An error raised while ours was being handled is a bug, which keeps its traceback (as in the main process).
    if not ours or "During handling of the above exception" in text[ours[-1].end() :]:
        return None
    return FundusError(ours[-1].group(2))


# MONAI's function that writes the executed config of a run with --tracking (monai/bundle/workflows.py).
_MONAI_TRACKING_PATCH = "patch_bundle_tracking"


def _executed_config_unwritable(error: BaseException) -> ConfigError | None:
    """The one-line error for MONAI's own when ``--tracking`` cannot write the executed config into the output
    folder, else None.

    MONAI writes it (``patch_bundle_tracking``) while it builds the workflow, before the bundle's own check of the
    output folder runs: an ``--output_dir`` that is a file, or lies under one, or cannot be written, was a
    traceback.

    Args:
        error: an exception of the chain :func:`user_error` walks.

    Returns:
        A :class:`ConfigError` naming the output folder and what is wrong, or None for any other error.
    """
    if not isinstance(error, OSError):
        return None
    trace = traceback.walk_tb(error.__traceback__)
    patching = [frame for frame, _ in trace if frame.f_code.co_name == _MONAI_TRACKING_PATCH]
    if not patching or "filepath" not in patching[-1].f_locals:
        return None
    folder = Path(patching[-1].f_locals["filepath"]).parent
    in_the_way = next((path for path in (folder, *folder.parents) if path.is_file()), None)
    if in_the_way is not None:
        why = f"{in_the_way} is a file, not a folder"
    else:
        why = f"{error.strerror or error}{'' if error.filename is None else f': {error.filename}'}"
    return ConfigError(
        f"Output folder {folder} cannot hold the executed config that --tracking records ({why}): name a folder "
        "that can be written with --output_dir."
    )


def user_error(error: BaseException | None) -> FundusError | None:
    """The first :class:`FundusError` in ``error``'s chain of causes, if any.

    MONAI's config parser wraps the error of a component it fails to build in its own RuntimeError; the original,
    with its useful message, is the cause (``raise ... from``). An error raised while one of ours was being handled
    (its ``__context__``) is not caused by it: that is a bug, and keeps its traceback. One raised in a data-loader
    worker reaches the main process as text, from which it is rebuilt (with its message, as a :class:`FundusError`).
    torch's own error for workers out of shared memory is one of the user's setup, not a bug: it is named, with the
    fix, as a :class:`SharedMemoryError`; MONAI's own for an output folder that ``--tracking`` cannot write the
    executed config into, naming the folder, as a :class:`ConfigError`.

    Args:
        error: an exception, typically uncaught.

    Returns:
        The project's error behind it, or None when there is none (a bug, reported with its traceback).
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, FundusError):
            return error
        relayed = _relayed_from_worker(error) or _shared_memory_full(error) or _executed_config_unwritable(error)
        if relayed is not None:
            return relayed
        error = error.__cause__
    return None


def _wrapped_exit(error: BaseException | None) -> SystemExit | None:
    """A ``SystemExit`` (a run stopped by SIGTERM) that an error of another library holds in place of it, if any.

    pydoc's ``locate``, through which MONAI's config parser imports a component's module, turns whatever an import
    raises into an ``ErrorDuringImport``: a SIGTERM that arrives during one became an ordinary error, exit status 1
    and a traceback, instead of the stop it is.

    Args:
        error: an exception, typically uncaught.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, SystemExit):
            return error
        error = error.value if isinstance(error, pydoc.ErrorDuringImport) else error.__cause__
    return None


def _report(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    stop = _wrapped_exit(error)
    if stop is not None:
        # Ended as the stop would have: its cleanups (atexit hooks: an MLflow run closed as FAILED), then its status.
        print(f"error: {stop}", file=sys.stderr)
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.code if isinstance(stop.code, int) else 1)
    own = user_error(error)
    if own is None:
        traceback.print_exception(kind, error, trace)
        return
    print(f"error: {own}", file=sys.stderr)


def is_bundle_command_line(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is the command line of a process started as ``python -m monai.bundle run ... --config_file
    ...`` (each of torchrun's workers is one), whose options are then the run's own and whose SIGTERM handling is the
    run's to set (:mod:`scripts.signals`).

    A program that builds the workflows in its own process (a pipeline calling MONAI's ``ConfigWorkflow``, the MONAI
    Label server) has a command line of its own, whose ``--config_file`` may be its own option: Python sets
    ``sys.argv[0]`` to the path of ``monai/bundle/__main__.py`` only for the bundle's command line.

    Args:
        argv: the command line (``sys.argv``).
    """
    return (
        len(argv) > 0
        and Path(argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py")
        and any(argument == "--config_file" or argument.startswith("--config_file=") for argument in argv[1:])
    )


def install_error_hook() -> None:
    """Report uncaught :class:`FundusError`\\ s as one line on stderr (the exit status stays 1); others as usual,
    except a stop wrapped in another error (:func:`_wrapped_exit`), which ends the process with its own status.

    A program that set a hook of its own (a pipeline's crash reporter around a workflow it runs in its process)
    keeps it: the hook replaces only Python's default, as in a bundle command line or MONAI Label's training
    process, whose task details then end with the error's one line.
    """
    if sys.excepthook in (sys.__excepthook__, _report):
        sys.excepthook = _report


def command_line(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command-line ``main`` so that a :class:`FundusError` prints one line and returns exit status 1.

    Args:
        main: the entry point, returning its exit status.

    Returns:
        The wrapped entry point.
    """

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as error:
            own = user_error(error)
            if own is None:
                raise
            print(f"error: {own}", file=sys.stderr)
            return 1

    return run


if is_bundle_command_line(sys.argv):
    install_error_hook()
