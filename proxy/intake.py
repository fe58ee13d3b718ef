"""Reading a metered request: its body (bounded in size and time), JSON or a form, and its
model. Every refusal is a ProxyFault a client can act on."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from proxy import multipart
from proxy.config import Config
from proxy.errors import ProxyFault
from proxy.shapes.base import JSONObj

_JSON_TYPES = ("application/json",)
# What a web page may send anywhere without asking first: never a metered JSON body.
_BROWSER_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
_FORM_IN_THREAD_BYTES = 1 << 20


def content_type(request: web.Request) -> str:
    return request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def check_json_type(request: web.Request) -> None:
    kind = content_type(request)
    if kind and (kind in _BROWSER_TYPES or not (kind in _JSON_TYPES or kind.endswith("+json"))):
        raise ProxyFault(
            415, "unsupported_media_type",
            f"meterproxy: this endpoint takes a JSON body (Content-Type: application/json),"
            f" not {kind}",
        )  # fmt: skip


async def read_body(request: web.Request, config: Config) -> bytes:
    try:
        if request.content.is_eof():  # all here already: the usual case
            return await request.read()
        async with asyncio.timeout(config.body_timeout):
            return await request.read()
    except TimeoutError:
        raise ProxyFault(
            408, "request_timeout",
            f"meterproxy: the request body did not arrive within {config.body_timeout:g}s",
        ) from None  # fmt: skip
    except web.HTTPRequestEntityTooLarge:
        raise ProxyFault(
            413, "request_too_large",
            f"meterproxy: the request body is larger than max_body_bytes"
            f" ({config.max_body_bytes} bytes)",
        ) from None  # fmt: skip


def parse_json(raw: bytes) -> JSONObj:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ProxyFault(
            400, "invalid_json", f"meterproxy: the request body is not valid JSON ({e})"
        ) from None
    if not isinstance(body, dict):
        raise ProxyFault(400, "invalid_json", "meterproxy: the request body must be a JSON object")
    return body


async def parse_form(request: web.Request, raw: bytes) -> multipart.Form:
    header = request.headers.get("Content-Type", "")
    if content_type(request) != "multipart/form-data":
        raise ProxyFault(
            415, "unsupported_media_type",
            "meterproxy: this endpoint takes a multipart/form-data body",
        )  # fmt: skip
    form = (
        await asyncio.to_thread(multipart.parse, raw, header)
        if len(raw) > _FORM_IN_THREAD_BYTES
        else multipart.parse(raw, header)
    )
    if form is None:
        raise ProxyFault(400, "invalid_form",
                         "meterproxy: the multipart body has no boundary")  # fmt: skip
    return form


def model_of(value: Any, from_path: str | None) -> str:
    model = from_path if from_path is not None else value
    if model is None:
        raise ProxyFault(
            400, "missing_model", "meterproxy: the request has no 'model'", param="model"
        )
    if not isinstance(model, str):
        raise ProxyFault(
            400, "invalid_model",
            f"meterproxy: 'model' must be a non-empty string, got {type(model).__name__}",
            param="model",
        )  # fmt: skip
    if not model.strip() or len(model) > 256 or not model.isprintable():
        raise ProxyFault(
            400, "invalid_model",
            "meterproxy: 'model' must be a non-empty string of printable characters, at most"
            " 256 long",
            param="model",
        )  # fmt: skip
    return model
