"""One JSON object per log line, for every zonegate program. Never pass a token to a logger."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from aiohttp.http_exceptions import HttpProcessingError

PARSE_ERROR_LOGGER = "aiohttp.server"
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
# json.dumps(entry, default=str) builds a new encoder per call; one shared encoder writes the same.
_ENCODE = json.JSONEncoder(default=str).encode
_STRING = json.encoder.encode_basestring_ascii  # what _ENCODE writes for a str (ensure_ascii)


class Timestamps:
    """``2026-12-04T21:00:00.123Z`` for a ``time.time()``; ``strftime`` once per second."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text

    def of(self, created: float) -> str:
        second = int(created)
        if self._second[0] != second:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{self._second[1]}.{int((created - second) * 1000):03d}Z"  # = LogRecord.msecs


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra}`` on one line."""

    def __init__(self) -> None:
        super().__init__()
        self._timestamps = Timestamps()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamps.of(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return _ENCODE(entry)


class LineWriter(logging.StreamHandler[TextIO]):
    """One line per record on a stream; the lines of one event-loop iteration go out in one
    write, flushed by a callback at the end of that iteration (a write per line otherwise).

    Without a running loop in the calling thread (start-up, other threads) a line is written
    and flushed at once; ``flush()`` (also called by ``logging.shutdown`` at exit) writes what
    is pending.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add(line)

    def add(self, line: str) -> None:
        """Queue one formatted line for this loop iteration's write."""
        self._pending.append(line)
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop in this thread: write now
                self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            lines, self._pending = self._pending, []
            if lines:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
        except (OSError, ValueError):  # stderr closed or broken: never fail a request for it
            pass
        finally:
            self.release()


class AccessLine:
    """One access line per request, the bytes ``log.info(msg, extra=fields)`` would write
    through ``setup_logging``'s handler, without building a ``LogRecord`` for it: a request's
    line costs a few microseconds instead of the ~10 the logging machinery takes.

    The short cut is taken only when the line would reach that handler alone (the logger and
    its ancestors have no other handler or filter); otherwise (tests capturing logs, a
    program's own set-up) the line goes through ``logging`` as any other.
    """

    def __init__(self, logger: logging.Logger, msg: str) -> None:
        self._logger, self._msg = logger, msg
        self._head = f', "level": "info", "logger": {_ENCODE(logger.name)}, "msg": {_ENCODE(msg)}'
        self._timestamps = Timestamps()

    def write(self, fields: dict[str, Any]) -> None:
        """Log ``fields`` (JSON-encodable values, never a token) as one INFO line."""
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        writer = _sole_line_writer(logger)
        if writer is None:
            logger.info(self._msg, extra=fields)
            return
        members = flat_members(fields)
        if members is None:  # a value _ENCODE must write itself
            members = _ENCODE(fields)[1:-1]
        rest = f", {members}}}" if fields else "}"
        writer.add(f'{{"ts": "{self._timestamps.of(time.time())}"{self._head}{rest}')


def flat_members(fields: dict[str, Any]) -> str | None:
    """``_ENCODE(fields)`` without its braces, for flat fields (str, int, finite float, None,
    a list of str), written directly (twice as fast); None for any other value."""
    members = []
    for key, value in fields.items():
        kind = type(value)
        if kind is str:
            text = _STRING(value)
        elif kind is int:
            text = int.__repr__(value)
        elif kind is float and math.isfinite(value):
            text = float.__repr__(value)
        elif value is None:
            text = "null"
        elif kind is list and all(type(item) is str for item in value):
            text = f"[{', '.join(map(_STRING, value))}]"
        else:
            return None
        members.append(f"{_STRING(key)}: {text}")
    return ", ".join(members)


def _sole_line_writer(logger: logging.Logger) -> LineWriter | None:
    """The ``LineWriter`` that alone handles ``logger``'s records, if there is one."""
    node: logging.Logger | None = logger
    found: LineWriter | None = None
    while node is not None:
        if node.filters:
            return None
        for handler in node.handlers:
            if found is not None or type(handler) is not LineWriter or handler.filters:
                return None
            if not isinstance(handler.formatter, JsonFormatter):
                return None
            found = handler
        if not node.propagate:
            break
        node = node.parent
    return found


class ParseErrorFilter(logging.Filter):
    """aiohttp logs a request it cannot parse at ERROR, with a traceback and the offending bytes,
    which may be an ``Authorization`` header: keep one INFO line with the reason only."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            # The class names the fault (LineTooLong, BadStatusLine, ...); aiohttp's message may
            # quote the offending bytes, which can be a header value, so it is never logged.
            record.msg, record.args = (
                "unparsable HTTP request refused (%s %s)",
                (error.code, type(error).__name__),
            )
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def quiet_parse_errors() -> None:
    """Install ``ParseErrorFilter`` on aiohttp's server logger (once per process)."""
    logger = logging.getLogger(PARSE_ERROR_LOGGER)
    if not any(isinstance(f, ParseErrorFilter) for f in logger.filters):
        logger.addFilter(ParseErrorFilter())


def setup_logging(level: str = "INFO") -> None:
    """Send every zonegate log line to stderr as JSON."""
    # What the lines never show need not be collected per record (the logging HOWTO's
    # "Optimization" section): caller frame, thread, process and multiprocessing names.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = LineWriter(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # we log requests ourselves
    quiet_parse_errors()


class Throttle:
    """At most one log line per key every ``every`` seconds; says how many were held back."""

    def __init__(self, every: float, clock: Callable[[], float]) -> None:
        self.every = every
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None: stay quiet; else the number of lines held back since the last one."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
