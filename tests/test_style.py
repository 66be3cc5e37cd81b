"""The code passes ruff's checks with the rules pyproject.toml sets, so style findings surface in CI, not in review."""

import subprocess
import sys

from tests.helpers import REPO


def test_ruff_finds_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"ruff check reports:\n{result.stdout}{result.stderr}"
