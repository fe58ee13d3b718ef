"""Upstream failures, classified once: what went wrong, what the client gets, and whether
the provider may have billed for it (then usage is estimated, never taken as 0)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from proxy.errors import ProxyFault
from proxy.http1 import UpstreamError
from proxy.upstream_client import CannotConnect, ConnectTimeout


class Stage(enum.Enum):
    CONNECT = "connect"  # sending the request, waiting for the response head
    BODY = "body"  # reading a response body


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    status: int
    code: str
    what: str
    maybe_billed: bool  # the request reached the provider: it may bill for it

    def fault(self, upstream: str | None) -> ProxyFault:
        return ProxyFault(self.status, self.code, f"meterproxy: upstream '{upstream}' {self.what}")


def classify(exc: BaseException, stage: Stage) -> UpstreamFailure | None:
    """None: not an upstream failure (let it propagate)."""
    if stage is Stage.CONNECT:
        if isinstance(exc, ConnectTimeout):
            return UpstreamFailure(504, "upstream_timeout", "did not accept a connection in time",
                                   False)  # fmt: skip
        if isinstance(exc, TimeoutError):
            return UpstreamFailure(504, "upstream_timeout", "did not answer in time", True)
        if isinstance(exc, CannotConnect):
            return UpstreamFailure(502, "upstream_unreachable", f"is unreachable: {exc}", False)
        if isinstance(exc, UpstreamError):
            return UpstreamFailure(502, "upstream_error", f"failed: {exc}", False)
        return None
    if isinstance(exc, TimeoutError):
        return UpstreamFailure(504, "upstream_timeout", "stalled mid-body", True)
    if isinstance(exc, UpstreamError):
        return UpstreamFailure(502, "upstream_error", f"cut the body: {exc}", True)
    return None
