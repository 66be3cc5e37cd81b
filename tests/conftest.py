from __future__ import annotations

import os
from pathlib import Path

import pytest

DRIVE_ENV = "FUNDUS_DRIVE_DIR"


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
