"""Short error reports for the command line: a user's mistake deserves one line naming the file, not a traceback."""

from __future__ import annotations

import sys
import traceback
from types import TracebackType

__all__ = ["install_error_hook", "user_error"]

# The exceptions of this package carry messages written for users (which file, which setting, what is wrong).
PACKAGE = __name__.split(".")[0]


def user_error(error: BaseException | None) -> BaseException | None:
    """The first exception raised by this package in ``error``'s chain of causes, if any.

    MONAI's config parser wraps the error of a component it fails to build in its own RuntimeError; the
    original, with its useful message, is the cause.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__module__.split(".")[0] == PACKAGE:
            return error
        error = error.__cause__ or error.__context__
    return None


def _report(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    own = user_error(error)
    if own is None:
        traceback.print_exception(kind, error, trace)
        return
    print(f"error: {own}", file=sys.stderr)


def install_error_hook() -> None:
    """Report uncaught errors of this package as one line on stderr (the exit status stays 1); others as usual."""
    sys.excepthook = _report
