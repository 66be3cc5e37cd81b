from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

DRIVE_ENV = "FUNDUS_DRIVE_DIR"

# pytest-xdist runs test files side by side (pyproject's addopts): each worker, and the processes its tests start,
# get their share of the cores, since torch's thread pools oversubscribe the machine otherwise (several times slower).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))


@pytest.fixture(scope="session")
def drive_dir() -> Path:
    """The real DRIVE dataset in its distributed layout, named by ``$FUNDUS_DRIVE_DIR`` (``.ci/run`` sets it)."""
    value = os.environ.get(DRIVE_ENV)
    if not value:
        pytest.skip(f"real DRIVE data not configured: set {DRIVE_ENV} to the DRIVE folder (training/ and test/)")
    path = Path(value)
    if not (path / "training").is_dir() or not (path / "test").is_dir():
        # Set but wrong (CI sets it) is a mistake to report, not a reason to skip the real-data tests quietly.
        pytest.fail(f"{DRIVE_ENV}={value} does not hold DRIVE's training/ and test/ folders")
    return path


@pytest.fixture(scope="module")
def module_folder(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Path]]:
    """Make folders, by name, for files that a module's tests share (a trained model, a server's app).

    They go when the module ends unless one of its tests failed, as pytest treats each test's own ``tmp_path``
    (``tmp_path_retention_policy`` in pyproject): the suite's models would otherwise fill the disk.
    """
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    failures = request.session.testsfailed
    yield make
    if request.session.testsfailed == failures:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start the slow tests first: pytest-xdist hands test files out in collection order (``--no-loadscope-reorder``
    in pyproject: by default it hands out the files with most tests first), and a slow file handed out last would
    run alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
