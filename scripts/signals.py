"""How a bundle run started from the command line stops when it is asked to: SIGTERM ends it as Ctrl-C does.

SIGTERM is how a run is usually stopped from outside: a SLURM or Kubernetes time limit, ``docker stop``, ``kill``,
torchrun stopping its workers. Python's default action for it ends the process at once: no ``finally`` block,
context manager exit or ``atexit`` hook runs, so :func:`scripts.atomic.atomic_path` would leave its hidden
temporaries in the output folder, and an MLflow run would stay RUNNING forever (``scripts.tracking`` closes
unfinished runs as FAILED in an ``atexit`` hook). :func:`exit_on_sigterm`, in the workflows' ``initialize`` lists,
makes SIGTERM raise :class:`Terminated`, a ``SystemExit`` with status 143 (128 + 15, what shells and schedulers
expect of a process stopped by SIGTERM), in the main thread: the run unwinds as on Ctrl-C, every cleanup runs, and
the process exits with 143. SIGKILL cannot be caught: a run killed by it still leaves what it was writing.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType

from scripts.errors import is_bundle_command_line

__all__ = ["REPEAT_IGNORED_SECONDS", "SIGTERM_EXIT_STATUS", "Terminated", "exit_on_sigterm"]

SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM

# A SIGTERM this soon after the one that stopped the run is the same request again (SLURM signals every process of
# a job step and torchrun forwards its own): it must not cut the cleanups short. A later one is raised again, in case
# the first was swallowed (raised inside a __del__ or a callback, where Python only prints exceptions).
REPEAT_IGNORED_SECONDS = 5.0

# The process that installed the handler, and when the run was asked to stop (time.monotonic), if it was.
_owner: int | None = None
_stopped_at: float | None = None


class Terminated(SystemExit):
    """The run was stopped by SIGTERM: a ``SystemExit`` with status 143 that names its cause where it is logged
    (ignite logs the exception that ends an engine's run; a bare ``SystemExit(143)`` would read ``143``)."""

    def __init__(self) -> None:
        super().__init__(SIGTERM_EXIT_STATUS)

    def __str__(self) -> str:
        return f"stopped by SIGTERM (exit status {SIGTERM_EXIT_STATUS})"


def _terminate(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM handler (run by Python in the main thread, between two bytecodes)."""
    global _stopped_at
    if os.getpid() != _owner:
        # A forked child inherited the handler (torch's DataLoader workers set their own): it ends at once, as it
        # always did, without unwinding the copy of its parent's stack (the parent's cleanups are the parent's).
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    now = time.monotonic()
    if _stopped_at is not None and now - _stopped_at < REPEAT_IGNORED_SECONDS:
        return
    _stopped_at = now
    if callable(signal.getsignal(signal.SIGCHLD)):
        # The DataLoader's workers got the same SIGTERM where a whole process group or job step is signalled (SLURM
        # does that) and died of it; torch's SIGCHLD handler would raise "DataLoader worker is killed by signal"
        # into whatever cleanup runs when the news arrives. The run is stopping: their end is no news.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    raise Terminated


def exit_on_sigterm(argv: Sequence[str]) -> bool:
    """Make SIGTERM raise :class:`Terminated` (exit status 143) in this process, when it is a bundle run started from
    the command line, so that its ``finally`` blocks, context managers and ``atexit`` hooks run.

    Nothing is installed, and False returned, where the handler would not be this run's to set:

    - ``argv`` is not a ``python -m monai.bundle run`` command line (:func:`scripts.errors.is_bundle_command_line`):
      the configs are also run inside other programs (a pipeline calling MONAI's ``ConfigWorkflow``, the MONAI
      Label server and its training subprocesses), which stop their own way;
    - this is not the main thread (``signal.signal`` works only there, and a workflow run in a thread is part of
      some other program);
    - SIGTERM already has a handler other than Python's default action, or is ignored: whoever set it decides.

    Torchrun's workers are command-line runs of their own: each gets the handler, and stops with its cleanups when
    torchrun stops it. A SIGTERM within ``REPEAT_IGNORED_SECONDS`` of the first is ignored while the run unwinds; a
    later one is raised again. A forked child that inherits the handler keeps the default action, and once the run is stopping a SIGCHLD handler (torch's, which
    raises when a worker dies) is reset, so that workers dying of the same SIGTERM cannot interrupt the cleanups.

    Args:
        argv: the command line (``sys.argv``).

    Returns:
        Whether the handler is installed.
    """
    global _owner, _stopped_at
    if not is_bundle_command_line(argv) or threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, _terminate):
        return False
    _owner, _stopped_at = os.getpid(), None
    signal.signal(signal.SIGTERM, _terminate)
    return True
