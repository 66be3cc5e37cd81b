from __future__ import annotations

import logging

import pytest
from ignite.engine import Engine
from monai.data import DataLoader, Dataset

from scripts.errors import FundusError, SharedMemoryError, command_line, user_error
from scripts.fundus_io import FundusImageError
from scripts.handlers import ReportErrors
from scripts.inputs import InputError
from tests.helpers import REPO
from tests.preloaded import preloaded_python


def test_user_error_is_found_behind_monai_wrappers():
    try:
        try:
            raise InputError("Datalist x.json does not exist.")
        except InputError as error:
            raise RuntimeError("Failed to instantiate component") from error
    except RuntimeError as wrapped:
        assert str(user_error(wrapped)) == "Datalist x.json does not exist."
    assert user_error(ValueError("not ours")) is None


def _unreadable(item: dict) -> dict:
    raise FundusImageError(f"cannot read image {item['image']}: image file is truncated")


def _buggy(item: dict) -> dict:
    raise ZeroDivisionError("a bug")


def _bug_while_handling_ours(item: dict) -> dict:
    try:
        _unreadable(item)
    except FundusImageError:
        raise ZeroDivisionError("a bug in the handler")  # ours stays its context: "During handling ..."


def test_a_user_error_raised_in_a_data_loader_worker_is_still_ours(caplog):
    """torch passes a worker's error on as the text of its traceback, wrapped in MONAI's "applying transform"
    RuntimeError: until 0.3.17 an unreadable image in an evaluation gave 360 lines of traceback."""
    messages = {}
    for transform in (_unreadable, _buggy, _bug_while_handling_ours):
        loader = DataLoader(Dataset([{"image": "/data/a.png"}], transform=transform), num_workers=1)
        with pytest.raises(Exception) as caught:
            next(iter(loader))
        assert "DataLoader worker process" in str(caught.value)
        messages[transform.__name__] = caught.value
    assert "During handling of the above exception" in str(messages["_bug_while_handling_ours"])
    own = user_error(messages["_unreadable"])
    assert str(own) == "cannot read image /data/a.png: image file is truncated"
    assert user_error(messages["_buggy"]) is None, "a bug keeps its traceback"
    assert user_error(messages["_bug_while_handling_ours"]) is None, "even one raised while ours was handled"
    # ignite logs the error's text before any handler runs: shortened likewise.
    engine = Engine(lambda engine, batch: None)
    ReportErrors().attach(engine)
    with caplog.at_level(logging.ERROR):
        engine.logger.error(f"Current run is terminating due to exception: {messages['_unreadable']}")
        engine.logger.error(f"Current run is terminating due to exception: {messages['_buggy']}")
    shortened, kept = caplog.records
    assert shortened.getMessage() == (
        "Current run is terminating due to exception: cannot read image /data/a.png: image file is truncated"
    )
    assert "ZeroDivisionError: a bug" in kept.getMessage() and "Traceback" in kept.getMessage()


# torch's words when a worker cannot put a batch into /dev/shm (Docker's 64 MB against a 4000 x 3000 photograph).
SHM_FULL = "unable to allocate shared memory(shm) for file </torch_2657_3201941036_0>: No space left on device (28)"


def _shared_memory_full(item: dict) -> dict:
    raise RuntimeError(SHM_FULL)


def test_workers_out_of_shared_memory_are_named_with_the_fix_not_reported_as_a_bug(caplog):
    """A sliding-window inference on a large photograph in a container with the default /dev/shm stopped with a
    traceback reported as an unexpected bug: it is the setup's, and --num_workers 0 or --shm-size is the fix."""
    loader = DataLoader(Dataset([{"image": "/data/a.png"}], transform=_shared_memory_full), num_workers=1)
    engine = Engine(lambda engine, batch: None)
    ReportErrors().attach(engine)
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError) as caught:
        engine.run(loader)
    own = user_error(caught.value)
    assert isinstance(own, SharedMemoryError) and isinstance(own, FundusError)
    assert str(own) == (
        "The data loader's workers ran out of shared memory (/dev/shm is full; Docker gives a container 64 MB unless "
        f"told otherwise): RuntimeError: {SHM_FULL}. Run with --num_workers 0, or give the container more shared "
        "memory (docker run --shm-size 2g, or --ipc host)."
    )
    stopped = [record for record in caplog.records if record.getMessage().startswith("Engine stopped")]
    assert [record.getMessage() for record in stopped] == [f"Engine stopped: {own}"]
    assert stopped[0].exc_info is None, "no traceback: not a bug"
    # The same, raised in the main process as it takes a batch over, and a worker killed by SIGBUS.
    assert str(user_error(RuntimeError(SHM_FULL))).endswith(f"otherwise): {SHM_FULL}. Run with --num_workers 0, or "
                                                            "give the container more shared memory (docker run "
                                                            "--shm-size 2g, or --ipc host).")
    bus = RuntimeError("DataLoader worker (pid 7) is killed by signal: Bus error. It is possible that dataloader's "
                       "workers are out of shared memory. Please try to raise your shared memory limit.")
    assert isinstance(user_error(bus), SharedMemoryError)
    assert user_error(RuntimeError("No space left on device (28)")) is None, "another disk full is not this"


def test_uncaught_user_errors_print_one_line_and_others_a_traceback():
    ours = (
        "from scripts.errors import ConfigError, install_error_hook; install_error_hook(); "
        "raise ConfigError('Output folder /x cannot be written.')"
    )
    result = preloaded_python().run(["-c", ours], cwd=REPO, timeout=600)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: Output folder /x cannot be written."
    theirs = preloaded_python().run(
        ["-c", "from scripts.errors import install_error_hook; install_error_hook(); raise KeyError('bug')"],
        cwd=REPO,
        timeout=600,
    )
    assert theirs.returncode == 1 and "Traceback" in theirs.stderr


def test_a_bug_raised_while_handling_a_user_error_is_a_bug_and_a_wrapped_user_error_is_the_user_s():

    ours = InputError("settings file x.json is missing")
    try:
        try:
            raise ours
        except InputError:
            {}["bug"]  # a programming error in the handler: its context is ours, its cause nothing
    except KeyError as bug:
        assert user_error(bug) is None
    try:
        try:
            raise ours
        except InputError as error:
            raise RuntimeError("Failed to instantiate component") from error  # how MONAI's config parser wraps
    except RuntimeError as wrapped:
        assert user_error(wrapped) is ours


def test_importing_the_package_leaves_the_interpreter_s_error_hook_alone():
    # The preloaded interpreter is a fresh one that has imported every module of the package (tests/preloaded.py).
    report = preloaded_python().import_report
    assert {"scripts.network", "scripts.handlers", "scripts.errors"} <= set(report["modules"])
    assert report["excepthook_kept"] is True


def test_command_line_entry_points_print_our_errors_in_one_line(capsys):
    @command_line
    def main() -> int:
        raise InputError("Datalist d.json does not exist.")

    assert main() == 1
    assert capsys.readouterr().err == "error: Datalist d.json does not exist.\n"

    @command_line
    def buggy() -> int:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        buggy()


def test_torch_files_that_cannot_be_read_are_said_in_words(tmp_path):
    """A text file read as a model said `KeyError: 101`; a cut-short archive quoted torch's message cut mid-word."""
    import torch

    from scripts.errors import unreadable_torch_file

    text, archive = tmp_path / "notes.pt", tmp_path / "cut.pt"
    text.write_text("hello, this is not a model\n")
    torch.save({"weight": torch.zeros(1000)}, archive)
    archive.write_bytes(archive.read_bytes()[:2000])
    reasons = []
    for path in (text, archive):
        with pytest.raises(Exception) as caught:
            torch.load(path, weights_only=True)
        reasons.append(unreadable_torch_file(caught.value))
    assert reasons == [
        "not a torch file: neither a zip archive nor a pickle",
        "a torch archive cut short (its zip directory is missing): damaged, or not fully copied",
    ]
