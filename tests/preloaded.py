"""Command lines such as ``python -m monai.bundle run training ...``, run in a fresh process each, without paying
for the imports each time.

On this project's 2-core CI machine, importing torch, MONAI, sam2 and MLflow takes two to three minutes per
process, which made a fresh ``python`` per bundle run the bulk of the suite's time. A preloaded interpreter
(:class:`PreloadedPython`, one per test process) imports them once and forks a child per command. The child is
a process of its own, as ``subprocess`` gives: its own working directory, environment, arguments, stdout and
stderr files, exit status and signals; the module or code runs as ``__main__`` at the interpreter's top level,
so uncaught exceptions, ``sys.exit`` and ``atexit`` behave as in ``python -m``/``python -c``. What it does not
give is a fresh import: a test about what importing does, or about another copy of ``scripts`` (a downloaded
bundle's), must start a real interpreter.

Run as ``python -m tests.preloaded``, this file is the preloaded interpreter itself; it reads one JSON request
per line on stdin and answers one JSON line on stdout.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import pkgutil
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PRELOADED = ("torch", "monai.bundle", "fire", "ignite.engine", "mlflow", "sam2.build_sam", "PIL.Image")


class PreloadedProcess:
    """One command run by :class:`PreloadedPython`: ``subprocess.Popen``'s ``pid``, ``poll``, ``wait``,
    ``send_signal``, ``kill`` and ``returncode``, with the output in a file (:meth:`output`)."""

    def __init__(self, server: PreloadedPython, pid: int, output: Path, errors: Path) -> None:
        self._server = server
        self.pid = pid
        self.returncode: int | None = None
        self._output = output
        self._errors = errors

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server._request({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"preloaded process {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> str:
        """What the process wrote to stdout so far."""
        return self._output.read_text(errors="replace")

    def errors(self) -> str:
        """What the process wrote to stderr so far (empty where stderr goes to stdout)."""
        return "" if self._errors == self._output else self._errors.read_text(errors="replace")


class PreloadedPython:
    """A Python interpreter that has imported the heavy packages once, and forks a child per command."""

    def __init__(self) -> None:
        self._folder = Path(tempfile.mkdtemp(prefix="preloaded-python-"))
        self._log = self._folder / "server.log"
        self._lock = threading.Lock()
        self._count = 0
        with open(self._log, "w") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "tests.preloaded"],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        ready = self._process.stdout.readline()
        if not ready.startswith("{"):
            raise RuntimeError(f"the preloaded interpreter did not start:\n{self._log.read_text()[-3000:]}")
        self.import_report: dict[str, Any] = json.loads(ready)

    def _request(self, request: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._process.stdin.write(json.dumps(request) + "\n")
            self._process.stdin.flush()
            answer = self._process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the preloaded interpreter stopped:\n{self._log.read_text()[-3000:]}")
        return json.loads(answer)

    def start(
        self,
        arguments: Sequence[Any],
        cwd: str | Path,
        env: Mapping[str, str] | None = None,
        merge_stderr: bool = False,
    ) -> PreloadedProcess:
        """Start ``python <arguments>`` (``-m module ...`` or ``-c code ...``) in ``cwd``.

        Args:
            arguments: what follows ``python`` on the command line; the first must be ``-m`` or ``-c``.
            cwd: the working directory.
            env: the environment; this process's own by default, as in ``subprocess``.
            merge_stderr: write stderr into the stdout file (``stderr=subprocess.STDOUT``).
        """
        arguments = [str(argument) for argument in arguments]
        if arguments[0] not in ("-m", "-c") or len(arguments) < 2:
            raise ValueError(f"expected -m module or -c code, got {arguments[:2]}")
        self._count += 1
        output = self._folder / f"{self._count}.out"
        errors = output if merge_stderr else self._folder / f"{self._count}.err"
        for path in {output, errors}:  # readable from the start, before the child opens them
            path.touch()
        request = {
            "op": "start",
            "kind": arguments[0],
            "target": arguments[1],
            "argv": arguments[2:],
            "cwd": str(Path(cwd).resolve()),
            "env": dict(os.environ if env is None else env),
            "stdout": str(output),
            "stderr": str(errors),
        }
        return PreloadedProcess(self, self._request(request)["pid"], output, errors)

    def run(
        self, arguments: Sequence[Any], cwd: str | Path, env: Mapping[str, str] | None = None, timeout: float = 900
    ) -> subprocess.CompletedProcess:
        """``subprocess.run(..., capture_output=True, text=True, timeout=timeout)`` for ``python <arguments>``."""
        process = self.start(arguments, cwd, env)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
            raise
        command = ["python", *map(str, arguments)]
        return subprocess.CompletedProcess(command, process.returncode, process.output(), process.errors())

    def close(self) -> None:
        """Stop the interpreter, and with it what a failed test left running (a writer in an endless loop, say).

        Its folder of outputs goes too: tests read what they need while they run, and a suite run should not leave
        files behind in the system's temporary folder.
        """
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
        shutil.rmtree(self._folder, ignore_errors=True)


_shared: PreloadedPython | None = None


def preloaded_python() -> PreloadedPython:
    """This test process's preloaded interpreter, started on first use and stopped at exit."""
    global _shared
    if _shared is None:
        _shared = PreloadedPython()
        atexit.register(_shared.close)
    return _shared


def _serve() -> dict[str, Any]:
    """Answer requests until stdin closes; in a forked child, return its request to run it."""
    for name in PRELOADED:
        importlib.import_module(name)
    hook = sys.excepthook
    import scripts

    modules = [module.name for module in pkgutil.walk_packages(scripts.__path__, "scripts.")]
    for name in modules:
        importlib.import_module(name)
    # What importing the whole package did to this fresh interpreter, for tests/test_errors.py.
    print(json.dumps({"modules": modules, "excepthook_kept": sys.excepthook is hook}), flush=True)
    # What the children inherit is never garbage: kept out of every collection (gc.freeze's purpose before fork), a
    # child's exit no longer traverses the imports (measured here: 10 s instead of 90 s, and over 3 minutes for an
    # evaluation run), and the traversal no longer copies the parent's pages into each child.
    gc.freeze()
    running: set[int] = set()
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            pid = os.fork()
            if pid == 0:
                _become(request)
                return request
            running.add(pid)
            answer: dict[str, Any] = {"pid": pid}
        else:
            done, status = os.waitpid(request["pid"], os.WNOHANG)
            answer = {"returncode": os.waitstatus_to_exitcode(status) if done else None}
            if done:
                running.discard(done)
        print(json.dumps(answer), flush=True)
    # The test process has gone (pytest-xdist's workers end without running atexit): stop what it left running, and
    # end at once, since tearing down an interpreter that holds torch and MLflow takes minutes of CPU here.
    for pid in running:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(0)


def _become(request: Mapping[str, Any]) -> None:
    """Turn the forked child into the process ``python <kind> <target> <argv>`` would start."""
    for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, mode, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    if request["stderr"] == request["stdout"]:
        os.dup2(1, 2)
    else:
        opened = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT, 0o644)
        os.dup2(opened, 2)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"] if request["kind"] == "-m" else ""
    sys.argv = ["-c" if request["kind"] == "-c" else request["target"], *request["argv"]]


def _run(job: Mapping[str, Any]) -> None:
    """Run the child's module or code as ``__main__``; what it raises reaches the interpreter's top level."""
    if job["kind"] == "-m":
        runpy.run_module(job["target"], run_name="__main__", alter_sys=True)
        return
    import __main__

    namespace = vars(__main__)
    for name in [name for name in namespace if name not in ("__builtins__", "__name__")]:
        del namespace[name]
    exec(compile(job["target"], "<string>", "exec"), namespace)  # noqa: S102 - what `python -c` does


if __name__ == "__main__":
    _run(_serve())
