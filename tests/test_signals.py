"""SIGTERM stops a command-line bundle run as Ctrl-C does: its cleanups run and it exits with status 143."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ignite.engine import Engine
from monai.bundle import ConfigParser
from PIL import Image

from scripts import signals
from scripts.atomic import atomic_path, folder_holder
from scripts.handlers import ReportErrors
from scripts.inputs import OUTPUT_LOCK
from scripts.signals import REPEAT_IGNORED_SECONDS, SIGTERM_EXIT_STATUS, Terminated, exit_on_sigterm
from scripts.synthetic import render_fundus, write_dataset
from tests.helpers import EVALUATE, INFER, MULTI_GPU, REPO, TRAIN, bundle_command, write_model_file
from tests.preloaded import preloaded_python

ENTRY = "$signals.exit_on_sigterm(sys.argv)"
# sys.argv of `python -m monai.bundle run ...` (also of each of torchrun's workers), and of the process in which
# MONAI Label's training task runs the bundle's workflow (its request, JSON, holds the config file's path).
BUNDLE_ARGV = [
    "/venv/lib/python3.11/site-packages/monai/bundle/__main__.py",
    "run",
    "inference",
    "--config_file",
    INFER,
]
MONAI_LABEL_ARGV = [
    "/venv/lib/python3.11/site-packages/monailabel/interfaces/utils/app.py",
    "-m",
    "train",
    "-r",
    json.dumps({"config_file": INFER, "model": "sam2lora_fundus"}),
]


@pytest.fixture
def default_sigterm() -> Iterator[None]:
    """SIGTERM and SIGCHLD at their default actions for the test (pytest's worker may have its own handlers), and
    their previous handlers restored after it."""
    previous = {number: signal.signal(number, signal.SIG_DFL) for number in (signal.SIGTERM, signal.SIGCHLD)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def test_sigterm_unwinds_the_run_and_exits_143(tmp_path, default_sigterm):
    assert exit_on_sigterm(BUNDLE_ARGV)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # torch's, while a DataLoader has workers
    cleanups = []
    with pytest.raises(SystemExit) as stopped:
        try:
            with atomic_path(tmp_path / "x.png") as temporary:
                temporary.write_bytes(b"half a picture")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # interrupted: the handler runs in this thread as soon as the signal arrives
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the same request again (SLURM's, then torchrun's): ignored
            time.sleep(0.1)
            cleanups.append("ran")
    assert stopped.value.code == SIGTERM_EXIT_STATUS == 143
    assert "SIGTERM" in str(stopped.value), "what ignite logs when the signal stops an engine"
    assert cleanups == ["ran"]
    assert signal.getsignal(signal.SIGCHLD) is signal.SIG_DFL, "workers dying of the same SIGTERM are no news"
    assert list(tmp_path.iterdir()) == [], "neither the file nor its hidden temporary"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed first SIGTERM
def test_a_later_sigterm_stops_a_run_whose_first_was_swallowed(default_sigterm, monkeypatch):
    """A SIGTERM raised inside a __del__ or a callback is only printed by Python, and the run goes on: a later one
    must still stop it."""
    assert exit_on_sigterm(BUNDLE_ARGV)

    class Swallowing:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)

    Swallowing()  # its __del__ runs at once: the signal's exception is printed and dropped
    later = time.monotonic() + REPEAT_IGNORED_SECONDS
    monkeypatch.setattr(signals.time, "monotonic", lambda: later)
    with pytest.raises(SystemExit) as stopped:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert stopped.value.code == SIGTERM_EXIT_STATUS


_STOPPED_DURING_AN_IMPORT = """
import atexit, pathlib, pydoc, sys
from scripts.errors import install_error_hook
from scripts.signals import Terminated
install_error_hook()
atexit.register(pathlib.Path(sys.argv[1]).write_text, "cleaned up")
try:
    raise Terminated  # as the SIGTERM handler raises it, here inside an import pydoc.locate makes
except BaseException:
    raise pydoc.ErrorDuringImport("monai/transforms/post/__init__.py", sys.exc_info())
"""


def test_a_sigterm_during_an_import_of_the_config_parser_still_stops_the_run_with_143(tmp_path):
    """pydoc.locate, through which MONAI's config parser imports a component's module, wraps what an import raises
    in its ErrorDuringImport: a SIGTERM arriving then ended the run with status 1 and a traceback (seen once in CI),
    though the cleanups ran. It now ends as a stop does: its atexit hooks, one line, status 143."""
    marker = tmp_path / "atexit"
    result = subprocess.run([sys.executable, "-c", _STOPPED_DURING_AN_IMPORT, str(marker)], check=False,
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == SIGTERM_EXIT_STATUS, result.stderr
    assert result.stderr.strip() == f"error: {Terminated()}"
    assert marker.read_text() == "cleaned up"

def test_a_forked_child_keeps_sigterms_default_action(default_sigterm):
    """A DataLoader worker forked from the run inherits the handler; it ends at once, as before, not unwinding the
    copy of its parent's stack."""
    assert exit_on_sigterm(BUNDLE_ARGV)
    child = os.fork()
    if child == 0:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            os._exit(3)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGTERM


@pytest.mark.parametrize(
    "argv",
    [
        MONAI_LABEL_ARGV,
        ["monailabel", "start_server", "--app", "app", "--studies", "images"],
        ["-c"],
        ["/srv/pipeline.py", "--config_file", "pipeline.yaml"],  # runs the workflow in its process (ConfigWorkflow)
    ],
    ids=["monailabel-task", "monailabel-server", "python-c", "pipeline-with-its-own-config-file"],
)
def test_no_handler_outside_a_bundle_command_line(argv, default_sigterm):
    assert not exit_on_sigterm(argv)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_no_handler_from_another_thread_or_over_another_one(default_sigterm):
    installed = []
    thread = threading.Thread(target=lambda: installed.append(exit_on_sigterm(BUNDLE_ARGV)))
    thread.start()
    thread.join()
    assert installed == [False], "signal.signal works only in the main thread: no ValueError, nothing installed"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def server_handler(signum, frame):  # a web server's own, MONAI Label's for one
        pass

    for handler in (server_handler, signal.SIG_IGN):
        signal.signal(signal.SIGTERM, handler)
        assert not exit_on_sigterm(BUNDLE_ARGV)
        assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.parametrize(
    "stop, line",
    [(KeyboardInterrupt, "Engine stopped: KeyboardInterrupt"), (Terminated, "Engine stopped: stopped by SIGTERM")],
    ids=["Ctrl-C", "SIGTERM"],
)
def test_a_run_asked_to_stop_is_logged_in_one_line_and_a_bug_once_with_its_traceback(caplog, stop, line):
    def raise_(error: BaseException) -> Callable[[Engine, Any], None]:
        def step(engine: Engine, batch: Any) -> None:
            raise error

        return step

    for error, expected, traceback in [(stop(), line, False), (RuntimeError("boom"), "unexpected error: boom", True)]:
        engine = Engine(raise_(error))
        ReportErrors().attach(engine)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="scripts.handlers.errors"), pytest.raises(type(error)):
            engine.run([0])
        (record,) = [r for r in caplog.records if r.name == "scripts.handlers.errors"]
        assert expected in record.getMessage()
        assert (record.exc_info is not None) is traceback


@pytest.mark.parametrize(
    "configs", [[TRAIN], [TRAIN, MULTI_GPU], [INFER], [TRAIN, EVALUATE]], ids=["train", "multi_gpu", "infer", "eval"]
)
def test_every_workflow_installs_it_right_after_checking_its_command_line(configs):
    """multi_gpu_train.json appends to train.json's list (``+initialize``): torchrun's workers get the handler."""
    parser = ConfigParser()
    parser.read_config(configs)
    initialize = parser["initialize"]
    assert initialize.count(ENTRY) == 1
    assert initialize[initialize.index(ENTRY) - 1] == "$inputs.check_command_line(sys.argv, @output_dir)"
    # The configs import the module; pytest's command line is not a bundle's, so nothing is installed here.
    assert parser.get_parsed_content(f"initialize#{initialize.index(ENTRY)}") is False


def _stop_when_working(runs: dict[str, tuple[Any, Callable[[], bool], Callable[[], None], Callable[[], str]]]) -> None:
    """Stop each run (a ``Popen`` or a preloaded process) as soon as it is working; wait for them to end.

    Args:
        runs: name to the process, whether it is working, how to stop it and what it wrote so far.
    """
    waiting = dict(runs)
    deadline = time.monotonic() + 300
    while waiting:
        for name, (process, working, stop, output) in list(waiting.items()):
            if working():
                stop()
                del waiting[name]
            else:
                assert process.poll() is None, f"{name} ended before it was stopped:\n{output()[-4000:]}"
        assert time.monotonic() < deadline, f"not working after 300 s: {sorted(waiting)}"
        time.sleep(0.01)
    for process, *_ in runs.values():
        process.wait(timeout=120)


@pytest.fixture(scope="module")
def stopped_runs(module_folder) -> dict[str, Any]:
    """An inference segmenting photographs and an evaluation tracked with ``--tracking mlflow``, each stopped with
    SIGTERM once it is working, side by side.

    The inference is started as a user starts it, in a fresh interpreter, and its whole process group is signalled,
    DataLoader workers included, as SLURM signals a job step at its time limit. The evaluation is started as
    tests/test_tracking.py starts its runs, in a child of the preloaded interpreter (a process of its own, signals
    included, without another 15 s of imports), and only it is signalled, as by ``kill`` or ``docker stop``.
    """
    root = module_folder("stopped_runs")
    model = write_model_file(root / "model.pt", image_size=64)
    images = root / "photographs"
    images.mkdir()
    for index in range(10):  # a second or two each to measure and write at 300 px: the run is stopped amid them
        Image.fromarray(render_fundus(300, index=index).image).save(images / f"photo_{index:02d}.png")
    datalist = write_dataset(root / "data", count=5, size=300)["vessels"]
    found: dict[str, Any] = {name: root / name for name in ("inference", "evaluation")}
    log = root / "inference.log"
    preloaded = preloaded_python()  # started (once per test process) before the inference, which must not wait
    processes: dict[str, Any] = {}
    try:
        with open(log, "w") as output:
            processes["inference"] = subprocess.Popen(
                bundle_command(
                    "inference", [INFER], dataset_dir=images, ckpt_path=model, output_dir=found["inference"]
                ),
                cwd=root,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        overrides = {"datalist": datalist, "ckpt_path": model, "output_dir": found["evaluation"], "tracking": "mlflow"}
        arguments = bundle_command("evaluating", [TRAIN, EVALUATE], launcher=(), **overrides)
        processes["evaluation"] = preloaded.start(arguments, root, merge_stderr=True)
        outputs = {"inference": log.read_text, "evaluation": processes["evaluation"].output}
        working = {
            "inference": lambda: any(found["inference"].glob("[!.]*.png")),  # its first mask is written
            "evaluation": lambda: "MLflow: recording evaluation run" in outputs["evaluation"](),
        }
        stop = {
            "inference": lambda: os.killpg(processes["inference"].pid, signal.SIGTERM),
            "evaluation": lambda: processes["evaluation"].send_signal(signal.SIGTERM),
        }
        _stop_when_working({name: (processes[name], working[name], stop[name], outputs[name]) for name in processes})
    finally:
        for name, process in processes.items():
            if process.poll() is not None:
                continue
            if name == "inference":  # a failed test: end what it started, the inference's workers included
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait(timeout=30)
    for name, process in processes.items():
        found[f"{name}_status"] = process.returncode
        found[f"{name}_log"] = outputs[name]()
    return found


def _stopped_with_cleanups(runs: dict[str, Any], name: str) -> None:
    assert runs[f"{name}_status"] == 143, runs[f"{name}_log"][-4000:]
    # The output folder's lock file stays, as training's does: deleted, a run that opened it before would hold a
    # lock on a file no later run sees. It holds no lock once the process has ended.
    hidden = sorted(path.name for path in runs[name].rglob(".*") if path.name != OUTPUT_LOCK)
    assert hidden == [], "hidden temporaries left behind"
    assert folder_holder(runs[name], OUTPUT_LOCK) is None, "the stopped run's hold ended with its process"


def test_a_stopped_inference_leaves_only_whole_files(stopped_runs):
    _stopped_with_cleanups(stopped_runs, "inference")
    assert "stopped by SIGTERM (exit status 143)" in stopped_runs["inference_log"], "what ignite logs"
    files = [path for path in stopped_runs["inference"].rglob("*") if path.is_file()]
    masks = [path for path in files if path.name.endswith("_mask.png")]
    assert 1 <= len(masks) < 10, "stopped amid the photographs"
    for path in files:
        if path.suffix == ".png":
            with Image.open(path) as picture:
                picture.load()
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            rows = list(csv.reader(path.open(newline="")))
            assert {len(row) for row in rows} == {len(rows[0])}, path.name


def test_a_stopped_tracked_evaluation_closes_its_mlflow_run_as_failed(stopped_runs):
    import mlflow

    _stopped_with_cleanups(stopped_runs, "evaluation")
    client = mlflow.MlflowClient(f"sqlite:///{stopped_runs['evaluation'] / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("sam2lora_fundus").experiment_id])
    assert run.info.status == "FAILED", "closed by the exit, not left RUNNING"
