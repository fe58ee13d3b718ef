"""One canonical spelling of every path: what metering sees is what the upstream serves.

`chat/completions/`, `chat//completions`, `/v1//chat/completions` and
`chat/completions%2F` are all `chat/completions` to an upstream that normalises paths.
Were they forwarded as they came, the proxy would see an unmetered path while the
upstream served (and billed) a metered one. So every path is decoded once, its empty
segments dropped, and forwarded in that canonical form; what cannot be made canonical
safely (`.`/`..` segments, a scheme, percent-encoding twice over) is refused.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import quote, unquote

from proxy.errors import ProxyFault

_STILL_ENCODED = re.compile(r"%[0-9A-Fa-f]{2}")
# What may stay unencoded in a path segment (RFC 3986 pchar), plus `/` between them.
_SAFE = "/:@!$&'()*+,;=-._~"


def _refuse(why: str) -> ProxyFault:
    return ProxyFault(
        400, "invalid_path",
        f"meterproxy: the request path {why}; only plain paths under the API prefix are"
        " forwarded",
    )  # fmt: skip


@lru_cache(maxsize=4096)  # agents call a handful of paths: work each out once
def canonical(raw_tail: str) -> tuple[str, str]:
    """(canonical decoded path, the same percent-encoded for the upstream) of the
    still-encoded path after the API prefix. Raises ProxyFault 400."""
    decoded = unquote(raw_tail)
    if _STILL_ENCODED.search(decoded):
        raise _refuse("is percent-encoded twice")
    if "\\" in decoded:
        raise _refuse("contains a backslash")
    if "://" in decoded:
        raise _refuse("contains a URL scheme")
    if any(ord(c) < 32 or ord(c) == 127 for c in decoded):
        raise _refuse("contains control characters")
    segments = [s for s in decoded.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise _refuse("contains '.' or '..' segments")
    path = "/".join(segments)
    return path, quote(path, safe=_SAFE)


def raw_tail(raw_path: str, prefix: str) -> str:
    """The still-encoded path after `/{prefix}/` (`v1`, `v1beta`, `openai`...), as sent."""
    path = raw_path.split("?", 1)[0]
    if path.startswith("/agents/"):  # /agents/{agent}/v1/...: skip the agent's segment
        rest = path[len("/agents/") :]
        slash = rest.find("/")
        path = rest[slash:] if slash >= 0 else ""
    marker = f"/{prefix}/"
    return path[len(marker) :] if path.startswith(marker) else ""
