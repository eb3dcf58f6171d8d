"""``datastore failed list|show|retry``: the objects the writer quarantined, and a way back.

The writer moves an object it cannot write to ``failed/`` once, with a short reason in
its metadata (``failure-reason``, ``failed-at``), and never retries it by itself: a poison
object must not loop.  After the cause is fixed (a writer bug, a station list entry, a
body replaced by a good one), ``retry`` moves it back to ``incoming/`` and runs the
writer's own :func:`writer.process_keys` on it right away, reporting what happened.

``show`` decodes the body only through :func:`payload.decode_batch` (the allowlist): a
summary of what the batch holds, or why it cannot be decoded.  Nothing else ever
unpickles it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hisparc_datastore.config import Settings, load_settings, require_s3_credentials
from hisparc_datastore.format.keys import FAILED, INCOMING, RETRYING
from hisparc_datastore.format.payload import PayloadError, decode_batch, event_datetime
from hisparc_datastore.logs import setup_logging
from hisparc_datastore.storage.store import Bucket, BucketError, ObjectMissing
from hisparc_datastore.writer.pipeline import WriteResult, process_keys, short_reason

#: Where a retried object waits between failed/ and incoming/ (see :func:`_send_back`).
#: Metadata the writer adds on quarantine; a retried object goes back without them.
FAILURE_METADATA = ("failure-reason", "failed-at")


def failed_key_of(text: str) -> str:
    """Accept ``failed/501/x.pickle``, ``501/x.pickle`` or ``incoming/501/x.pickle``."""
    text = text.strip().lstrip("/")
    if text.startswith(FAILED):
        return text
    return FAILED + text.removeprefix(INCOMING)


def incoming_key_of(failed: str) -> str:
    return INCOMING + failed.removeprefix(FAILED)


# ----------------------------------------------------------------------------- list


@dataclass(frozen=True)
class FailedEntry:
    key: str
    size: int
    last_modified: dt.datetime
    failed_at: str
    reason: str


def list_failed(bucket: Bucket) -> list[FailedEntry]:
    entries = []
    for info in bucket.list(FAILED):
        metadata = bucket.metadata(info.key) or {}
        entries.append(FailedEntry(info.key, info.size, info.last_modified,
                                   metadata.get("failed-at", ""),
                                   metadata.get("failure-reason", "(no reason recorded)")))
    return entries


def format_list(entries: Sequence[FailedEntry]) -> str:
    if not entries:
        return "failed/: empty"
    lines = [f"{'key':<52} {'bytes':>9}  {'failed at (UTC)':<20} reason"]
    for entry in entries:
        when = entry.failed_at or f"{entry.last_modified:%Y-%m-%dT%H:%M:%S}"
        lines.append(f"{entry.key:<52} {entry.size:>9}  {when[:19]:<20} {entry.reason}")
    lines.append(f"{len(entries)} objects, {sum(e.size for e in entries)} bytes")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- show


def summarize_body(body: bytes) -> dict[str, Any]:
    """A safe summary of a batch: decoded through the allowlist, or the decode error."""
    summary: dict[str, Any] = {"bytes": len(body),
                               "md5": hashlib.md5(body).hexdigest()}  # noqa: S324
    try:
        events = decode_batch(body)
    except PayloadError as exc:
        summary["decode_error"] = str(exc)
        return summary
    types: Counter[str] = Counter()
    moments = []
    for event in events:
        header = event.get("header")
        code = header.get("eventtype_uploadcode") if isinstance(header, dict) else None
        types[code if isinstance(code, str) else "(no type)"] += 1
        when = event_datetime(event)
        if when is not None:
            moments.append(when)
    summary["events"] = len(events)
    summary["types"] = dict(sorted(types.items()))
    summary["first_event"] = min(moments).isoformat() if moments else None
    summary["last_event"] = max(moments).isoformat() if moments else None
    summary["without_datetime"] = len(events) - len(moments)
    return summary


def format_show(key: str, metadata: dict[str, str], summary: dict[str, Any]) -> str:
    lines = [f"key: {key}"]
    lines.append(f"reason: {metadata.get('failure-reason', '(no reason recorded)')}")
    lines += [f"metadata {name}: {value}" for name, value in sorted(metadata.items())
              if name != "failure-reason"]
    lines.append(f"body: {summary['bytes']} bytes, md5 {summary['md5']}")
    if "decode_error" in summary:
        lines.append(f"decode: FAILS: {summary['decode_error']}")
    else:
        types = ", ".join(f"{code} {count}" for code, count in summary["types"].items())
        lines.append(f"decode: ok, {summary['events']} events ({types or 'none'})")
        lines.append(f"event dates: {summary['first_event']} .. {summary['last_event']}"
                     + (f" ({summary['without_datetime']} without datetime)"
                        if summary["without_datetime"] else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- retry


def _send_back(bucket: Bucket, key: str) -> str:
    """failed/X -> retrying/X -> incoming/X; returns the incoming key.

    Why the stop in ``retrying/``: the copy into ``incoming/`` notifies the live writer,
    which may quarantine the object again (a new ``failed/X``) before a plain move would
    delete ``failed/X``, and that delete would then remove the only copy.  ``retrying/``
    is not watched, so ``failed/X`` is deleted before anything can write it again, and at
    every moment the object exists under at least one key; a leftover ``retrying/X`` (a
    crash in between) is picked up by ``retry --all``.
    """
    holding = RETRYING + key.removeprefix(FAILED).removeprefix(RETRYING)
    if key.startswith(FAILED):
        metadata = bucket.metadata(key)
        if metadata is None:
            raise ObjectMissing(key)
        clean = {k: v for k, v in metadata.items() if k not in FAILURE_METADATA}
        if "failure-reason" in metadata:
            clean["retried-after"] = metadata["failure-reason"]
        bucket.copy(key, holding, clean)
        bucket.delete(key)
    target = INCOMING + holding.removeprefix(RETRYING)
    bucket.move(holding, target)
    return target


@dataclass
class RetryResult(WriteResult):
    """The writer's result, plus the keys a notified live writer handled first."""

    by_live_writer: set[str] = field(default_factory=set)


def retry(bucket: Bucket, settings: Settings, keys: Sequence[str]) -> RetryResult:
    """Send each failed object back to incoming/ and write it with the live writer.

    A live writer notified of the object may take it first: then this run sees it
    "already done", and the outcome is read from where the object went.
    """
    moved = []
    result = RetryResult()
    for key in keys:
        try:
            moved.append(_send_back(bucket, key))
        except ObjectMissing:
            result.failed[key] = "not in failed/"
    if not moved:
        return result
    written = process_keys(moved, bucket, settings, respect_schedule=False)
    for key in list(written.already_done):
        again = FAILED + key.removeprefix(INCOMING)
        metadata = bucket.metadata(again)
        if metadata is not None:
            written.already_done.remove(key)
            written.quarantined[key] = metadata.get("failure-reason", "")
            result.by_live_writer.add(key)
        elif bucket.head(key) is None:
            written.already_done.remove(key)
            written.archived.append(key)
            result.by_live_writer.add(key)
    result.merge(written)
    return result


def format_retry(result: RetryResult) -> str:
    def who(key: str) -> str:
        return " (by the notified live writer)" if key in result.by_live_writer else ""

    lines = [f"written and archived{who(key)}: {key}" for key in result.archived]
    lines += [f"already done: {key}" for key in result.already_done]
    lines += [f"quarantined again{who(key)}: {key}: {why}"
              for key, why in result.quarantined.items()]
    lines += [f"not written (left in incoming/ or failed/): {key}: {why}"
              for key, why in result.failed.items()]
    lines.append(result.summary())
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every object in failed/ with its reason")
    show = actions.add_parser("show", help="metadata, reason and a safe summary of one object")
    show.add_argument("key", metavar="KEY", help="failed/<station>/<md5>.pickle")
    again = actions.add_parser("retry", help="move back to incoming/ and write now")
    again.add_argument("key", metavar="KEY", nargs="?", help="failed/<station>/<md5>.pickle")
    again.add_argument("--all", action="store_true", help="retry every object in failed/")


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    require_s3_credentials(settings)
    setup_logging(settings)
    bucket = Bucket.from_settings(settings)
    try:
        if args.action == "list":
            print(format_list(list_failed(bucket)))
            return 0
        if args.action == "show":
            key = failed_key_of(args.key)
            try:
                stored = bucket.get(key)
            except ObjectMissing:
                print(f"datastore failed: {key} is not in failed/", file=sys.stderr)
                return 1
            print(format_show(key, stored.metadata, summarize_body(stored.body)))
            return 0
        if args.all == bool(args.key):
            print("datastore failed retry: give one KEY or --all", file=sys.stderr)
            return 2
        keys = ([info.key for prefix in (RETRYING, FAILED) for info in bucket.list(prefix)]
                if args.all else [failed_key_of(args.key)])
        result = retry(bucket, settings, keys)
    except BucketError as exc:
        print(f"datastore failed: bucket error: {short_reason(exc)}", file=sys.stderr)
        return 1
    print(format_retry(result))
    return 0 if len(result.archived) == len(keys) else 1
