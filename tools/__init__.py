"""Offline tools around the bundle: dataset preparation, the classical baseline, the benchmark, the bundle archive and
deployable exports. Run as ``python -m tools.<module>``; the bundle's configs never reference them, and the exported
archive does not ship them (it ships ``scripts/``, what the bundle runs)."""

import argparse

__all__ = ["path_argument"]


def path_argument(text: str) -> str:
    """An argparse ``type`` for a folder or file name.

    An empty one (``--output "$UNSET"``) names the folder the command runs in, where reports or archives would land
    unasked: it is refused in one line, exit 2, as the bundle refuses an empty path setting.

    Args:
        text: the value as typed.

    Returns:
        The name as typed.

    Raises:
        argparse.ArgumentTypeError: the name is empty or blank.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an empty name would be the folder the command runs in: give the folder or file (./ for that folder)"
        )
    return text
