"""``datastore sweep [--watch] [--limit N]``: write everything still under ``incoming/``.

The safety net for lost notifications, and the writer of deployments without any.  Once:
one sweep, exit status 0 when everything was written (or quarantined), 1 when something
is left in ``incoming/``: failed (an outage) or deferred (it waits for a day file or a
retry record; ``datastore status`` says why).
``--watch``: a sweep every ``[Writer] sleep`` seconds until SIGINT or SIGTERM, one log
line per round; an error in one round (the bucket down, or anything unexpected) is
logged and the next round tries again.  A signal lets the current chunk finish, so no
work is thrown away.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from hisparc_datastore.config import Settings, load_settings, require_s3_credentials
from hisparc_datastore.logs import setup_logging
from hisparc_datastore.storage.store import Bucket
from hisparc_datastore.writer.pipeline import TRANSIENT, WriteResult, short_reason, sweep

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--watch", action="store_true",
        help="sweep again every [Writer] sleep seconds until SIGINT/SIGTERM",
    )
    parser.add_argument(
        "--limit", type=_positive, default=None, metavar="N",
        help="process at most N objects per sweep (oldest first)",
    )


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _round(bucket: Bucket, settings: Settings, limit: int | None, stop: threading.Event,
           keep_going: bool = False) -> WriteResult:
    """One sweep; a transient error (and, when watching, any error) is a failed round."""
    try:
        return sweep(bucket, settings, limit=limit, should_stop=stop.is_set)
    except TRANSIENT as exc:
        failed = WriteResult()
        failed.errors.append(short_reason(exc))
        return failed
    except Exception as exc:
        if not keep_going:
            raise
        log.exception("sweep round failed unexpectedly")
        failed = WriteResult()
        failed.errors.append(short_reason(exc))
        return failed


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    require_s3_credentials(settings)  # before the first request, by name
    setup_logging(settings)
    bucket = Bucket.from_settings(settings)
    stop = threading.Event()

    if not args.watch:
        result = _round(bucket, settings, args.limit, stop)
        finished = result.ok and not result.deferred
        log.log(logging.INFO if finished else logging.WARNING, "sweep: %s", result.summary())
        for key, deferral in sorted(result.deferred.items())[:20]:
            log.info("waits: %s: %s", key, deferral.reason)
        return 0 if finished else 1

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("sweep: %s received, stopping after this round",
                 signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    log.info("sweep: watching incoming/ every %.1f s", settings.writer_sleep)
    rounds = 0
    try:
        while not stop.is_set():
            result = _round(bucket, settings, args.limit, stop, keep_going=True)
            rounds += 1
            level = logging.INFO if result.ok else logging.WARNING
            log.log(level, "sweep round %d: %s", rounds, result.summary())
            stop.wait(settings.writer_sleep)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("sweep: stopped after %d rounds", rounds)
    return 0
