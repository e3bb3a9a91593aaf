"""The access line's short cut writes what ``logging`` would, and steps aside for any other
handler (tests capturing logs, a program's own set-up)."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from runtime.logsetup import AccessLine, JsonFormatter, LineWriter

FIELDS = {"method": "GET", "route": "red", "status": 200, "duration": 0.000123, "subject": None}
TS = re.compile(r'^\{"ts": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ')


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A logger of its own, not propagating: a LineWriter on a StringIO as setup_logging sets
    one on the root."""
    logger = logging.getLogger("zonegate.test.access")
    writer = LineWriter(io.StringIO())
    writer.setFormatter(JsonFormatter())
    logger.handlers[:] = [writer]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger
    logger.handlers.clear()


def written(logger: logging.Logger) -> list[str]:
    writer = logger.handlers[0]
    assert isinstance(writer, LineWriter)
    writer.flush()
    stream = writer.stream
    assert isinstance(stream, io.StringIO)
    return stream.getvalue().splitlines()


def test_the_short_cut_writes_the_line_logging_writes(logger: logging.Logger) -> None:
    logger.info("request", extra=FIELDS)
    AccessLine(logger, "request").write(FIELDS)
    via_logging, short_cut = written(logger)
    assert TS.match(via_logging) and TS.match(short_cut)
    assert TS.sub("", via_logging) == TS.sub("", short_cut)
    assert json.loads(short_cut) | {"ts": None} == {
        "ts": None, "level": "info", "logger": "zonegate.test.access", "msg": "request", **FIELDS
    }  # fmt: skip


def test_another_handler_gets_the_record(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    """With a second handler (here pytest's) the line goes through logging: both see it."""
    logger.addHandler(caplog.handler)
    AccessLine(logger, "request").write(FIELDS)
    assert [r.__dict__["route"] for r in caplog.records] == ["red"]
    assert len(written(logger)) == 1


def test_below_info_nothing_is_written(logger: logging.Logger) -> None:
    logger.setLevel(logging.WARNING)
    AccessLine(logger, "request").write(FIELDS)
    assert written(logger) == []
