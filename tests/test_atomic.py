from __future__ import annotations

import errno
import hashlib
import io
import json
import os

import pytest
import torch

from scripts import atomic
from scripts.atomic import (
    FileState,
    append_text,
    atomic_path,
    file_sha256,
    save_torch_atomic,
    write_json_atomic,
    write_text_atomic,
)
from scripts.signals import Terminated


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"dice": 0.8})
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text('{"dice": 0.')
        raise RuntimeError("killed half way")
    assert json.loads(target.read_text()) == {"dice": 0.8}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"], "no temporary file is left behind"



@pytest.mark.parametrize("then", ["the rest", "a full disk", "Ctrl-C"])
def test_appended_text_is_written_whole_or_not_at_all(tmp_path, monkeypatch, then):
    """``os.write`` takes half of the text; the next call writes the rest, or fails: the file is then cut back."""
    target = tmp_path / "measurements.csv"
    write_text_atomic(target, "image,flags\neye_0.png,\n")
    state, real_write, calls = FileState.of(target), os.write, []

    def half_then(handle: int, data: bytes) -> int:
        calls.append(bytes(data))
        if len(calls) == 2 and then == "a full disk":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if len(calls) == 2 and then == "Ctrl-C":
            raise KeyboardInterrupt
        return real_write(handle, data[: max(1, len(data) // 2)] if len(calls) == 1 else data)

    monkeypatch.setattr(atomic.os, "write", half_then)
    added = "eye_1.png,\neye_2.png,low predicted quality\n"
    if then == "the rest":
        new_state = append_text(target, added, state)
        monkeypatch.undo()
        assert target.read_text() == "image,flags\neye_0.png,\n" + added
        assert new_state == FileState.of(target) and len(calls) == 2
        return
    with pytest.raises(atomic.OutputError if then == "a full disk" else KeyboardInterrupt) as caught:
        append_text(target, added, state)
    monkeypatch.undo()
    assert target.read_text() == "image,flags\neye_0.png,\n", "half a line was left"
    assert len(calls) == 2
    if then == "a full disk":
        assert str(caught.value) == f"Cannot write {target} in folder {tmp_path} (No space left on device)."


def test_nothing_is_appended_to_a_file_its_writer_did_not_leave(tmp_path):
    target = tmp_path / "measurements.csv"
    write_text_atomic(target, "image,flags\neye_0.png,\n")
    state = FileState.of(target)
    target.write_text("image,flags\neye_0.png,?\n")  # edited since: one byte more
    assert append_text(target, "eye_1.png,\n", state) is None
    assert target.read_text() == "image,flags\neye_0.png,?\n"
    target.unlink()
    assert append_text(target, "eye_1.png,\n", state) is None
    assert not target.exists(), "not created headless"

def test_a_full_disk_under_nested_writes_names_the_destination_once(tmp_path):
    """An export written into another atomic write's temporary file: the outer error named the hidden temporary file
    and repeated the inner message ("Cannot write X (Cannot write .X.tmp (No space left on device).)")."""
    target = tmp_path / "model.onnxruntime.onnx"
    with pytest.raises(atomic.OutputError) as caught, atomic_path(target) as outer, atomic_path(outer):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(caught.value) == f"Cannot write {target} in folder {tmp_path} (No space left on device)."
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, Terminated])
def test_a_checkpoint_write_interrupted_stops_with_the_interruption_and_keeps_the_previous_file(
    tmp_path, monkeypatch, interruption
):
    """Ctrl-C or SIGTERM half way through a record: torch's zip writer then fails to close the archive and raises
    its own error ("unexpected pos"); the run must stop with the interruption (exit status 143 for SIGTERM, no
    traceback), the previous file whole."""
    target = tmp_path / "latest_checkpoint.pt"
    save_torch_atomic({"epoch": 1}, target)

    class InterruptedFile(io.FileIO):
        writes = 0

        def write(self, data: bytes) -> int:
            InterruptedFile.writes += 1
            if InterruptedFile.writes == 3:
                raise interruption()
            return super().write(data)

    monkeypatch.setattr(atomic, "open", InterruptedFile, raising=False)
    with pytest.raises(interruption):
        save_torch_atomic({f"weight_{i}": torch.ones(1000) for i in range(10)}, target)
    assert InterruptedFile.writes == 3
    assert torch.load(target) == {"epoch": 1}
    assert [path.name for path in tmp_path.iterdir()] == [target.name], "no temporary file is left behind"


def test_temporary_names_keep_the_suffixes(tmp_path):
    with atomic_path(tmp_path / "sub" / "mask.nii.gz") as temporary:
        assert temporary.name.endswith(".nii.gz") and temporary.parent == tmp_path / "sub"
    write_text_atomic(tmp_path / "a.csv", "x\r\ny\n")
    assert (tmp_path / "a.csv").read_bytes() == b"x\r\ny\n"


def test_file_sha256_reads_past_its_first_block(tmp_path):
    # 16 MiB blocks: a file one block and a bit long checks that the blocks join in order.
    content = os.urandom(1 << 24) + b"tail"
    (tmp_path / "model.pt").write_bytes(content)
    assert file_sha256(tmp_path / "model.pt") == hashlib.sha256(content).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()
