"""``zonegate`` programs as subprocesses for the tests (a plugin: the ``programs`` fixture is
everyone's). Their stdout and stderr join the session's secrets scan."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from devkit.provider import DevOpenIDProvider
from tests.conftest import exchange_document
from tests.logchecks import scan_text

STARTUP_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Program:
    """A ``zonegate`` subprocess whose output is read continuously (a full pipe would stall it)."""

    args: tuple[str, ...]
    process: asyncio.subprocess.Process | None = None
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> dict[str, str]:
        """Start, and return {listener name: URL} once every listener said where it listens."""
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "zonegate.cli", *self.args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stdout is not None and self.process.stderr is not None
        self.readers = [
            asyncio.create_task(self._read(self.process.stdout, self.out)),
            asyncio.create_task(self._read(self.process.stderr, self.err)),
        ]
        expected = 2 if self.args[0] == "sidecar" else 1
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while len(listening := self.listening()) < expected:
                assert self.process.returncode is None, "exited early:\n" + self.stderr()
                await asyncio.sleep(0.05)
        return listening

    def listening(self) -> dict[str, str]:
        return {line.split()[1]: line.split()[-1] for line in self.out if " listening on " in line}

    @staticmethod
    async def _read(stream: asyncio.StreamReader, lines: list[str]) -> None:
        while line := await stream.readline():
            lines.append(line.decode(errors="replace"))

    def stderr(self) -> str:
        return "".join(self.err)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await asyncio.gather(*self.readers)
        scan_text(f"zonegate {self.args[0]} output", "".join(self.out) + self.stderr())
        self.out.clear()
        self.err.clear()
        return code

    async def stop(self) -> None:
        """Kill if still running; its output joins the secrets scan either way."""
        if self.process is None:
            return
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.wait()
        self.process = None

    async def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        async with asyncio.timeout(timeout):
            while not any(text in line for line in self.err):
                await asyncio.sleep(0.05)
        return next(line for line in self.err if text in line)


@pytest.fixture
async def programs() -> AsyncIterator[Callable[..., Program]]:
    """Make programs; every one still running at the end is killed and its output scanned."""
    made: list[Program] = []

    def make(*args: str) -> Program:
        program = Program(args)
        made.append(program)
        return program

    yield make
    for program in made:
        await program.stop()


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


@dataclass
class RunningExchange:
    """A started `zonegate exchange`: the program, its URL, its config document and file."""

    program: Program
    url: str
    document: dict[str, Any]
    config: Path


async def exchange_program(
    programs: Callable[..., Program], op: DevOpenIDProvider, config: Path
) -> RunningExchange:
    """`zonegate exchange` on a free port, the test OP's exchange document written to
    ``config``; returned once it listens."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    document = exchange_document(op, issuer=url, listen=f"127.0.0.1:{port}")
    program = programs("exchange", "--config", str(write_yaml(config, document)))
    await program.start()
    return RunningExchange(program, url, document, config)
