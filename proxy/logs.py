"""Logging set-up: text lines for people tailing, JSON lines for machines.

Call lines are the hot path, so the record carries no caller lookup, no thread or process
names, and the stream is flushed by a timer rather than after every line (warnings and
errors flush at once).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from proxy.calllog import CallSink, call_fields, call_level, call_line
from proxy.records import CallRecord

_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _iso(created: float) -> str:
    whole = int(created)
    if _second[0] != whole:  # strftime once a second, not once a line
        _second[0] = whole
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((created - whole) * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_iso(record.created)} {record.levelname:<7} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
        }
        call: CallRecord | None = getattr(record, "call", None)
        if call is not None:
            out |= call_fields(call, getattr(record, "spent_today", None))
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


class LazyFlushHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Flushes WARNING and above at once, everything else from `flush_soon()` timers.

    With a log file, the terminal still sees what a person starting the proxy must:
    start-up lines (logged with `extra=CONSOLE`), warnings and errors (`console`)."""

    def __init__(self, stream: TextIO, console: logging.Handler | None = None) -> None:
        super().__init__(stream)
        self._dirty = False
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()
        else:
            self._dirty = True

    def flush(self) -> None:
        self._dirty = False
        super().flush()

    def call_sink(self) -> CallSink | None:
        """Call lines written straight to the stream, same text as through logging."""
        calls = logging.getLogger("meterproxy.calls")
        if not calls.isEnabledFor(logging.INFO):
            return lambda record, spent: None
        json_lines = isinstance(self.formatter, JsonFormatter)
        stream = self.stream

        console = self.console

        def sink(record: CallRecord, spent_today: int | None) -> None:
            now = time.time()
            level = call_level(record)
            name = "INFO" if level == logging.INFO else "WARNING"
            if json_lines:
                fields = {"ts": _iso(now), "level": name, "logger": "meterproxy.calls"}
                fields |= call_fields(record, spent_today)
                line = orjson.dumps(fields).decode() + "\n"
            else:
                line = f"{_iso(now)} {name:<7} {call_line(record, spent_today)}\n"
            stream.write(line)
            if level == logging.INFO:
                self._dirty = True
                return
            self.flush()
            if console is not None:
                console.stream.write(line)  # type: ignore[attr-defined]
                console.flush()

        return sink

    async def flush_periodically(self, interval: float = 0.2) -> None:
        while True:
            await asyncio.sleep(interval)
            if self._dirty:
                self.flush()


class ClientFaultFilter(logging.Filter):
    """aiohttp logs a malformed request (header flood, bad bytes) as an ERROR with a
    traceback; it is the client's fault, not ours: one WARNING line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            reason = (exc.message or type(exc).__name__).strip().splitlines()[0]
            record.msg = f"rejected a malformed request: {reason}"
            record.args = ()
            record.exc_info = None
        return True


CONSOLE = {"console": True}  # `extra=` of a log line the terminal must show


class _ForConsole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or getattr(record, "console", False)


def setup_logging(
    fmt: str = "text", file: Path | None = None, level: str = "INFO"
) -> LazyFlushHandler:
    logging._srcfile = None  # no caller lookup per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    stream: TextIO = (
        open(file, "a", encoding="utf-8", buffering=1 << 16) if file else sys.stderr  # noqa: SIM115
    )
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    console = None
    if file:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter)
        console.addFilter(_ForConsole())
    handler = LazyFlushHandler(stream, console)
    handler.setFormatter(formatter)
    for name in ("meterproxy", "aiohttp"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler] if console is None else [handler, console]
        logger.propagate = False
    logging.getLogger("meterproxy").setLevel(level)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(ClientFaultFilter())
    logging.getLogger("aiohttp.access").disabled = True  # the call line says more
    return handler
