"""Logging setup: text or one JSON object per line with the event's fields, third-party chatter held back.

JSON lines carry ``event_id``, ``source``, ``sink``, ``delivery_id`` and ``request_id`` as fields when a
log call names them (``extra={...}``) or when its message follows the code base's ``"sink %s: …"`` /
``"source %s: …"`` / ``"delivery %d"`` convention, so a log pipeline can filter by them without parsing
prose. Libraries' loggers (aiosqlite logs every query at debug) stay at warning unless
``daemon.log_levels`` names them."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Mapping

import orjson

# Loggers of libraries, held at warning whatever log_level says: debug means integrand's debug.
THIRD_PARTY = ("aiosqlite", "aiohttp", "asyncio", "urllib3", "croniter", "multipart")
_PREFIX = re.compile(r"^(?:ALERT )?(sink|source) %[sr]\b")
_DELIVERY = re.compile(r"\bdelivery %d\b")
# Lines about a single delivery; a sink's or source's state changes are never collapsed. Refused
# webhooks are the listener's to quieten (guard.QuietLog: a few per interval, then one line of counts).
_PER_EVENT = re.compile(r"\bdelivery %d\b")
_REQUEST_ID = re.compile(r"\(request id ([^)\s]+)\)")
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def setup_logging(level: str, fmt: str, levels: Mapping[str, str] | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Repeats())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in (*THIRD_PARTY, "aiohttp.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, lvl in (levels or {}).items():
        logging.getLogger(name).setLevel(lvl.upper())


def fields(record: logging.LogRecord) -> dict[str, object]:
    """The structured fields of a record: explicit extras first, then what its message template names."""
    out: dict[str, object] = {}
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    template = record.msg if isinstance(record.msg, str) else ""
    args = record.args if isinstance(record.args, tuple) else ()
    m = _PREFIX.match(template)
    if m and args:
        out.setdefault(m.group(1), args[0])
    d = _DELIVERY.search(template)
    if d and args:
        # The argument's position: how many %-placeholders precede "delivery %d" in the template.
        i = len(re.findall(r"%[sdrgf]", template[: d.start()]))
        if i < len(args):
            out.setdefault("delivery_id", args[i])
    return out


class Repeats(logging.Filter):
    """One line per kind of per-event happening per subject per ``window``, not one per event.

    Lines about one delivery (its failure, its dead-lettering: ``_PER_EVENT``) at info to
    error with the same logger, message template and subject (the first argument: a sink's or
    source's name) are collapsed: the first in a window is logged, the rest
    are counted, and the next one logged after the window says how many were left out
    (``repeats`` in JSON). A sink dead-lettering every delivery is a line a minute; each event's own story stays in the store (``integrand events show``).
    Debug lines (asked for) and critical ones (alerts) are never collapsed."""

    MAX_KEYS = 10_000

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.window = window
        self.clock = clock
        self._seen: dict[tuple[str, str, object], list[float]] = {}  # key -> [window start, left out]

    def filter(self, record: logging.LogRecord) -> bool:
        if not logging.INFO <= record.levelno < logging.CRITICAL or not isinstance(record.msg, str):
            return True
        if not _PER_EVENT.search(record.msg):
            return True  # a sink's or source's own state change (breaker open, closed): always said
        args = record.args if isinstance(record.args, tuple) else ()
        subject = args[0] if args and isinstance(args[0], str) else None
        key = (record.name, str(record.msg), subject)
        now = self.clock()
        slot = self._seen.get(key)
        if slot is not None and now - slot[0] < self.window:
            slot[1] += 1
            return False
        if slot is not None and slot[1]:
            n = int(slot[1])
            record.repeats = n
            record.msg = f"{record.msg} [and {n} more like this in the {self.window:.0f} s before, not logged]"
        if len(self._seen) >= self.MAX_KEYS:
            self._seen.clear()
        self._seen[key] = [now, 0]
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        data: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": msg,
        }
        data.update(fields(record))
        if "request_id" not in data and (rid := _REQUEST_ID.search(msg)):
            data["request_id"] = rid.group(1)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()
