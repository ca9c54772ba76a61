"""Log lines of a serving process, as text or as one JSON object per line (`log_format`), each
carrying the request id of the call it is about.

`setup` configures the root logger (the single-process server and `serve` in the CLI; under Ray
Serve each ingress and engine replica process, serve/app.py). The request id comes from
`calls.current()` through a filter on the handlers, so every existing `log.info(...)` made while a
call is served carries it without being edited; lines outside a call (start-up, the replicas'
follower) have none.

    text: 2026-12-08 10:00:00,123 INFO rollout_service.replica [5f2c...]: replica local applied version 3 ...
    json: {"time": "2026-12-08T10:00:00.123+00:00", "level": "INFO", "logger": "rollout_service.replica",
           "message": "...", "request_id": "5f2c...", "exception": "Traceback ..."}
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

from rollout_service.observe import calls

LogFormat = Literal["text", "json"]
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TEXT_IN_CALL = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class RequestIdFilter(logging.Filter):
    """Gives a record made during a call that call's `request_id`; lets every record through."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = calls.current()
        if call is not None and not hasattr(record, "request_id"):
            record.request_id = call.request_id
        return True


class TextFormatter(logging.Formatter):
    """The usual text line, with the request id after the logger's name in a call."""

    def __init__(self):
        super().__init__(TEXT)
        self._in_call = logging.PercentStyle(TEXT_IN_CALL)

    def formatMessage(self, record: logging.LogRecord) -> str:
        style = self._in_call if getattr(record, "request_id", None) else self._style
        return style.format(record)


def json_formatter() -> JsonFormatter:
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, the request id in a
    call, the exception's traceback if any, and whatever `extra=` a call gave."""
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"},
        timestamp="time",
    )


def setup(level: str, log_format: LogFormat = "text", file: Path | None = None) -> None:
    """Root logging at `level` to stderr (and `file`), in `log_format`, replacing what was set."""
    handlers: list[logging.Handler] = [logging.StreamHandler()] + ([logging.FileHandler(file)] if file else [])
    formatter = json_formatter() if log_format == "json" else TextFormatter()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
