"""The access line's short cut writes what ``logging`` would, and steps aside for any other
handler (tests capturing logs, a program's own set-up)."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.logsetup import AccessLine, JsonFormatter, LineWriter, flat_members

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


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=8),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
        | st.lists(st.integers(), max_size=2) | st.lists(st.text(max_size=4), max_size=3),
        max_size=6,
    )
)  # fmt: skip
def test_flat_fields_are_written_as_the_json_encoder_writes_them(fields: dict[str, Any]) -> None:
    members = flat_members(fields)
    encoded = json.JSONEncoder(default=str).encode(fields)
    assert members is None or "{" + members + "}" == encoded
    if all(v is None or type(v) in (str, int) for v in fields.values()):
        assert members is not None  # the usual access line takes the short way
