from __future__ import annotations

import subprocess
import sys

from scripts.errors import user_error
from scripts.inputs import InputError


def test_user_error_is_found_behind_monai_wrappers():
    try:
        try:
            raise InputError("Datalist x.json does not exist.")
        except InputError as error:
            raise RuntimeError("Failed to instantiate component") from error
    except RuntimeError as wrapped:
        assert str(user_error(wrapped)) == "Datalist x.json does not exist."
    assert user_error(ValueError("not ours")) is None


def test_uncaught_user_errors_print_one_line_and_others_a_traceback():
    ours = "import scripts; from scripts.inputs import InputError; raise InputError('Output folder /x cannot be written.')"
    result = subprocess.run([sys.executable, "-c", ours], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: Output folder /x cannot be written."
    theirs = subprocess.run(
        [sys.executable, "-c", "import scripts; raise KeyError('bug')"], capture_output=True, text=True, timeout=120
    )
    assert theirs.returncode == 1 and "Traceback" in theirs.stderr
