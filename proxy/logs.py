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

from proxy.money import usd_exact
from proxy.records import CallRecord


def _iso(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


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
            spent = getattr(record, "spent_today", None)
            out |= {
                "event": "call",
                "request_id": call.id,
                "agent": call.agent,
                "intent": call.intent,
                "upstream": call.upstream,
                "endpoint": call.endpoint,
                "model": call.model_requested,
                "model_served": call.model_served,
                "status": call.status,
                "stream": call.stream,
                "input_tokens": call.input_tokens,
                "cached_input_tokens": call.cached_input_tokens,
                "output_tokens": call.output_tokens,
                "reasoning_tokens": call.reasoning_tokens,
                "usage_source": call.usage_source,
                "cost_usd": usd_exact(call.cost_pico) if call.cost_pico is not None else None,
                "agent_spent_today_usd": usd_exact(spent) if spent is not None else None,
                "latency_ms": call.latency_ms,
                "ttfb_ms": call.ttfb_ms,
                "error": call.error,
            }
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


class LazyFlushHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Flushes WARNING and above at once, everything else from `flush_soon()` timers."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._dirty = False

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
    handler = LazyFlushHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for name in ("meterproxy", "aiohttp"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
    logging.getLogger("meterproxy").setLevel(level)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(ClientFaultFilter())
    logging.getLogger("aiohttp.access").disabled = True  # the call line says more
    return handler
