"""Logging set-up shared by the functions and the CLI, from ``[General] log``, ``loglevel``
and ``log_format``.

``log_format = text`` (the default) writes the lines people read locally; ``json`` writes one
JSON object per line for log pipelines (Loki, Elasticsearch, Cloud Logging): ``time``,
``level``, ``logger``, ``message``, and the facts a call passes as ``extra={"fields":
{...}}`` as fields of their own (the upload: station, code, bytes, events, ms; the writer:
key, rows, outcome), so a pipeline filters on them without parsing the message.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time

from hisparc_datastore.config import Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """:data:`FORMAT`'s lines, with each second's date and time formatted once.

    ``logging.Formatter`` converts and formats the time of every record; a busy upload
    function logs a line per request, many within one second.  The text is the same.
    """

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        whole = int(record.created)
        second, text = self._second
        if second != whole:
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (whole, text)
        return self.default_msec_format % (text, record.msecs)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for name, value in fields.items():
                document.setdefault(str(name), value)
        if record.exc_info:
            document["traceback"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str, ensure_ascii=False)


def setup_logging(settings: Settings) -> None:
    """Send the package's log lines to the configured file, or stderr when none is set.

    Only the package's logger is configured, so functions-framework and gunicorn keep
    their own handlers and levels.
    """
    logger = logging.getLogger("hisparc_datastore")
    logger.setLevel(settings.loglevel.upper())
    if any(getattr(handler, "_datastore", False) for handler in logger.handlers):
        return
    handler: logging.Handler
    if settings.log:
        handler = logging.FileHandler(settings.log, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    json_lines = settings.log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter(FORMAT))
    handler._datastore = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False
