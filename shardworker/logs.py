"""Structured JSON-lines logging, one logger per module.

Use ``log = get_logger(__name__)`` and ``log.info("event_name", provider_id=..., folder=...)``.
Every line about a provider carries ``provider_id`` and ``folder``.  Never pass a password,
token or message body: there is no filter that could catch every shape of secret, so the
rule is that secrets never reach a logger at all.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_context: dict[str, Any] = {}


def set_process_context(**fields: Any) -> None:
    """Fields added to every line of this process, e.g. ``worker=3``, ``pod=...``."""
    _context.update(fields)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update(_context)
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            exc = record.exc_info[1]
            line["error_type"] = type(exc).__name__
            line["error"] = str(exc)
        return orjson.dumps(line, default=str).decode()


class Logger:
    """A thin keyword-argument front to :mod:`logging`."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, exc: bool, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, *, exc: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, event, exc, fields)


def get_logger(name: str) -> Logger:
    return Logger(name)


def configure(level: str = "INFO", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
