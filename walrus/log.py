"""Logging to stderr in WAL-G's style (`INFO: 2026/01/02 03:04:05.123456 message`)."""
from __future__ import annotations

import logging
import sys
import time

LOGGER_NAME = "walrus"
log = logging.getLogger(LOGGER_NAME)

_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING",
                logging.ERROR: "ERROR", logging.CRITICAL: "ERROR"}
_LEVELS = {"devel": logging.DEBUG, "normal": logging.INFO, "error": logging.ERROR}


class _WalgFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(record.created))
        micros = int(record.created % 1 * 1_000_000)
        return f"{_LEVEL_NAMES.get(record.levelno, 'INFO')}: {stamp}.{micros:06d} {record.getMessage()}"


class _StderrHandler(logging.StreamHandler):
    """Standard error, stepping around a progress status line (walrus.progress) while one is drawn."""

    def emit(self, record: logging.LogRecord) -> None:
        progress = sys.modules.get("walrus.progress")  # loaded only by the commands that may draw one
        line = progress.active() if progress is not None else None
        if line is None:
            super().emit(record)
        else:
            line.around(lambda: super(_StderrHandler, self).emit(record))


def setup_logging(level: str = "normal", destination: str | None = None) -> None:
    """destination (WALG_LOG_DESTINATION): a file appended to instead of stderr. The final error
    of a failed command is still written to stderr too, where PostgreSQL's log receives it."""
    if destination and destination != "stderr":
        handler: logging.Handler = logging.FileHandler(destination, encoding="utf-8")
    else:
        handler = _StderrHandler(sys.stderr)
    handler.setFormatter(_WalgFormatter())
    log.handlers[:] = [handler]
    log.setLevel(_LEVELS.get(level, logging.INFO))
    log.propagate = False
