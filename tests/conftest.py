from __future__ import annotations

import os
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
        pytest.skip(f"{DRIVE_ENV}={value} does not hold DRIVE's training/ and test/ folders")
    return path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start the slow tests first: pytest-xdist hands test files out in collection order (``--no-loadscope-reorder``
    in pyproject: by default it hands out the files with most tests first), and a slow file handed out last would
    run alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
