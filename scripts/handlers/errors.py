"""How an engine reports an exception: the project's user errors in one line, bugs with their traceback."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events

from scripts.errors import user_error

__all__ = ["ReportErrors"]

logger = logging.getLogger(__name__)

_REPORTED = "_reported_by_report_errors"


class _RelayedErrorsInOneLine(logging.Filter):
    """Shortens ignite's own log line of an engine's exception when it is one of ours raised in a data-loader worker.

    ignite logs the exception's text before any handler runs, and a worker's error reaches the main process as the
    text of the worker's whole traceback (:func:`scripts.errors.user_error` rebuilds ours from it).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        marker = message.find("Caught ")
        if marker < 0 or "DataLoader worker process" not in message:
            return True
        own = user_error(RuntimeError(message[marker:]))
        if own is not None:
            record.msg, record.args = f"{message[:marker]}{own}", ()
        return True


class ReportErrors:
    """Log an engine's exception before it propagates: one line for a :class:`scripts.errors.FundusError`.

    MONAI's ``StatsHandler`` logs every exception an engine raises with its full traceback, and ignite runs only the
    first ``EXCEPTION_RAISED`` handler that re-raises; listed before ``StatsHandler``, this handler keeps the
    traceback for bugs and drops it for the project's errors, whose message says all (the file, the setting, the fix),
    and for a run asked to stop (Ctrl-C, SIGTERM). ignite's own log line of the exception is shortened likewise when
    the error comes from a data-loader worker as the text of its traceback.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)
        # ignite's loggers are one per engine class: one filter each, however many engines attach.
        if not any(isinstance(each, _RelayedErrorsInOneLine) for each in engine.logger.filters):
            engine.logger.addFilter(_RelayedErrorsInOneLine())

    def __call__(self, engine: Engine, error: BaseException) -> None:
        # ignite raises an iteration's error twice (from the epoch, then from the run), and a validation's error
        # stops its trainer too: one report. The mark is on the error, which a handler must not keep (its traceback
        # holds the batch).
        if getattr(error, _REPORTED, False):
            raise error
        setattr(error, _REPORTED, True)
        if isinstance(error, (KeyboardInterrupt, SystemExit)):  # Ctrl-C, SIGTERM (scripts.signals): asked to stop
            logger.error(f"{type(engine).__name__} stopped: {str(error) or type(error).__name__}")
            raise error
        own = user_error(error)
        if own is None:
            logger.exception(f"{type(engine).__name__} stopped by an unexpected error: {error}")
        else:
            logger.error(f"{type(engine).__name__} stopped: {own}")
        raise error
