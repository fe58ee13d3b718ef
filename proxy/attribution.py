"""Who is calling: agent and intent from a proxy key, a path prefix or headers."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDictProxy

from proxy.errors import ProxyFault
from proxy.ids import IdError, validate_id

UNAUTHENTICATED = "(unauthenticated)"


@dataclass(frozen=True, slots=True)
class Caller:
    agent: str
    intent: str | None
    via: str  # key | path | header | default


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """Proxy keys, held only as SHA-256 digests.

    A lookup hashes the presented key first, so its timing depends on a digest the caller
    cannot steer, not on how much of a real key they guessed.
    """

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._agents = {key_digest(k): agent for k, agent in keys.items()}

    def __bool__(self) -> bool:
        return bool(self._agents)

    def agent_for(self, presented: str) -> str | None:
        return self._agents.get(key_digest(presented))


# Where each SDK carries its key: OpenAI (Authorization), Azure (api-key), Anthropic
# (x-api-key), Gemini (x-goog-api-key, or ?key= in the URL).
_KEY_HEADERS = ("x-api-key", "api-key", "x-goog-api-key")


def presented_key(
    headers: CIMultiDictProxy[str], query: Mapping[str, str] | None = None
) -> str | None:
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for name in _KEY_HEADERS:
        found = headers.get(name)
        if found and found.strip():
            return found.strip()
    if query is not None and query.get("key"):
        return query["key"].strip()
    return None


def _checked(value: str, what: str, source: str) -> str:
    try:
        return validate_id(value, what)
    except IdError as e:
        raise ProxyFault(400, f"invalid_{what}_id", f"{source}: {e.reason}", param=source) from None


def identify(
    headers: CIMultiDictProxy[str],
    path_agent: str | None,
    *,
    query: Mapping[str, str] | None = None,
    keys: KeyRing,
    agent_header: str,
    intent_header: str,
    default_agent: str,
) -> Caller:
    """Raise ProxyFault 400 on a malformed id, 401 on a missing or unknown proxy key."""
    intent_value = headers.get(intent_header)
    intent = _checked(intent_value, "intent", f"header {intent_header}") if intent_value else None
    if keys:
        key = presented_key(headers, query)
        if key is None:
            raise ProxyFault(
                401,
                "missing_api_key",
                "meterproxy: this proxy requires a proxy key; send it as your API key"
                " (Authorization: Bearer <key>)",
            )
        agent = keys.agent_for(key)
        if agent is None:
            raise ProxyFault(
                401,
                "invalid_api_key",
                "meterproxy: the API key is not a proxy key known to this proxy",
            )
        return Caller(agent, intent, "key")  # a key binds its agent: no header can override
    if path_agent is not None:
        return Caller(_checked(path_agent, "agent", "path /agents/{agent}/"), intent, "path")
    header_value = headers.get(agent_header)
    if header_value:
        return Caller(_checked(header_value, "agent", f"header {agent_header}"), intent, "header")
    return Caller(default_agent, intent, "default")
