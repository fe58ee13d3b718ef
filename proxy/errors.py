"""Errors the proxy itself answers with: OpenAI-shaped JSON, `type` saying they are ours."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

PROXY_ERROR = "meterproxy_error"  # anything the proxy, not the provider, refused or failed
BUDGET_ERROR = "budget_exceeded"
# The budget database cannot be reached and the call cannot be checked (fail closed).
UNAVAILABLE_ERROR = "meter_unavailable"


class ProxyFault(Exception):
    """A request the proxy answers itself, with an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        type_: str = PROXY_ERROR,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.type = type_
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def response(self, extra_headers: Mapping[str, str] | None = None) -> web.Response:
        headers = {**self.headers, **(extra_headers or {})}
        return web.Response(
            status=self.status, body=self.body(), content_type="application/json", headers=headers
        )


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "code": code, "param": param}}
    )


def json_error(status: int, message: str, code: str, *, param: str | None = None) -> web.Response:
    return ProxyFault(status, code, message, param=param).response()
