"""Who is calling: agent and intent from a proxy key, a path prefix or headers."""

from __future__ import annotations

import hashlib
import hmac
import re
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


# -- the agent's own customers, and free-form tags -----------------------------------------

MAX_USER_CHARS = 256
MAX_TAGS = 16
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]+$")
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_TAG_VALUE = re.compile(r"^[^\x00-\x1f\x7f,=]{0,128}$")


def user_digest(user: str, salt: str | None = None) -> str:
    """What is stored for an end user under attribution.hash_users: a digest, keyed with
    the salt when one is set (unkeyed, a guessable id such as an email can be guessed
    back by hashing candidates)."""
    data = user.encode()
    if salt:
        return "u_" + hmac.new(salt.encode(), data, hashlib.sha256).hexdigest()[:32]
    return "u_" + hashlib.sha256(data).hexdigest()[:32]


def end_user(
    header: str | None,
    header_name: str,
    from_body: str | None,
    *,
    hash_users: bool,
    salt: str | None,
) -> str | None:
    """The end user a call is for: the header (set by the agent's developer, so a bad one
    is a 400), else the body's field (passed to the provider as is, so a value unfit for a
    report is stored as its digest rather than refused)."""
    if header is not None and header != "":
        if len(header) > MAX_USER_CHARS or not _PRINTABLE.match(header):
            raise ProxyFault(
                400, "invalid_user_id",
                f"header {header_name}: an end user id is 1-{MAX_USER_CHARS} printable"
                " characters",
                param=header_name,
            )  # fmt: skip
        user = header
    elif isinstance(from_body, str) and from_body:
        user = from_body
        if len(user) > MAX_USER_CHARS or not _PRINTABLE.match(user):
            return user_digest(user, salt)
    else:
        return None
    return user_digest(user, salt) if hash_users else user


def parse_tags(value: str | None, header_name: str) -> str | None:
    """`team=search, env=prod` -> `env=prod,team=search` (sorted: one spelling per set)."""
    if value is None or not value.strip():
        return None
    tags: dict[str, str] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not _TAG_KEY.match(key) or not _TAG_VALUE.match(val):
            raise ProxyFault(
                400, "invalid_tags",
                f"header {header_name}: bad tag {part[:80]!r}: tags are key=value pairs"
                " separated by commas (key: letters, digits, _ . -; value: up to 128"
                " characters without , or =), e.g. team=search,env=prod",
                param=header_name,
            )  # fmt: skip
        if key in tags and tags[key] != val:
            raise ProxyFault(400, "invalid_tags", f"header {header_name}: tag '{key}' is given"
                             " twice with different values", param=header_name)  # fmt: skip
        tags[key] = val
    if len(tags) > MAX_TAGS:
        raise ProxyFault(400, "invalid_tags", f"header {header_name}: at most {MAX_TAGS} tags",
                         param=header_name)  # fmt: skip
    return ",".join(f"{k}={tags[k]}" for k in sorted(tags)) or None
