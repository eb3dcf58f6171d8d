"""Logging set-up shared by the functions and the CLI, from ``[General] log/loglevel``."""

from __future__ import annotations

import logging
import sys

from hisparc_datastore.config import Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(settings: Settings) -> None:
    """Send the package's log lines to the configured file, or stderr when none is set.

    Only the package's logger is configured, so functions-framework, gunicorn and boto3
    keep their own handlers and levels.
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
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._datastore = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False
