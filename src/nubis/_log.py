"""Loggers that import :mod:`logging` only when a record is actually due.

Importing :mod:`logging` pulls in traceback, tokenize, string, weakref and more, several
milliseconds of a VMM whose whole start should take tens. A :class:`Logger` here stands for
``logging.getLogger(name)``: while nobody has imported :mod:`logging`, a record below
:data:`threshold` (WARNING unless :func:`defer_setup` says otherwise, as with an unconfigured
:mod:`logging`) is dropped on the spot; any other record imports :mod:`logging`, runs the deferred
setup once and goes to the real logger. Once :mod:`logging` is imported (by nubis or by anyone,
pytest's log capture say), every call goes straight to the real logger, so behaviour is that of
:mod:`logging` itself.
"""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from collections.abc import Callable
    from typing import Any

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40
CRITICAL = 50

#: Records below this level are dropped while :mod:`logging` is not imported.
threshold = WARNING
_setup: Callable[[], None] | None = None
# When the process started, as far as nubis can tell: ``relativeCreated`` counts from here even
# when :mod:`logging` is imported late.
_start_time = time.time()


def defer_setup(level: int, setup: Callable[[], None]) -> None:
    """Drop records below ``level`` cheaply, and run ``setup`` when :mod:`logging` is needed.

    When :mod:`logging` is already imported, ``setup`` runs at once.
    """
    global _setup, threshold
    threshold = level
    _setup = setup
    if "logging" in sys.modules:
        import_logging()


def import_logging() -> None:
    """Import :mod:`logging` (dating ``relativeCreated`` from process start) and run the setup."""
    global _setup
    if "logging" not in sys.modules:
        import logging

        logging._startTime = _start_time  # type: ignore[attr-defined]
    setup, _setup = _setup, None
    if setup is not None:
        setup()


class Logger:
    """Stands for ``logging.getLogger(name)`` and imports :mod:`logging` when a record is due."""

    __slots__ = ("_logger", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: logging.Logger | None = None

    def _real(self) -> logging.Logger:
        logger = self._logger
        if logger is None:
            import_logging()
            import logging

            logger = self._logger = logging.getLogger(self.name)
        return logger

    def isEnabledFor(self, level: int) -> bool:
        """Whether a record at ``level`` would be handled."""
        if self._logger is None and level < threshold and "logging" not in sys.modules:
            return False
        return self._real().isEnabledFor(level)

    def _emit(self, level: int, msg: object, args: tuple[object, ...], kwargs: Any) -> None:
        # Two frames (this one and the public method) lie between the caller and logging.
        if self.isEnabledFor(level):
            kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 2
            self._real().log(level, msg, *args, **kwargs)

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        """Log ``msg % args`` at ``level``."""
        self._emit(level, msg, args, kwargs)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        """Log at DEBUG."""
        self._emit(DEBUG, msg, args, kwargs)

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        """Log at INFO."""
        self._emit(INFO, msg, args, kwargs)

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        """Log at WARNING."""
        self._emit(WARNING, msg, args, kwargs)

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        """Log at ERROR."""
        self._emit(ERROR, msg, args, kwargs)

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        """Log at ERROR with the exception being handled."""
        kwargs.setdefault("exc_info", True)
        self._emit(ERROR, msg, args, kwargs)


def getLogger(name: str) -> Logger:
    """A :class:`Logger` for ``name``, as ``logging.getLogger`` names them."""
    return Logger(name)
