"""Secrets out of text: keys a provider error echoes, passwords in database URLs."""

from __future__ import annotations

import re

_SECRET = re.compile(r"(sk|pk|rk|key)-[A-Za-z0-9_\-*.]{6,}", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(://[^:/@]+):[^@/]*@")


def redact(text: str) -> str:
    """Provider errors may echo part of a key ('Incorrect API key provided: sk-ab***yz')."""
    return _SECRET.sub(lambda m: f"{m.group(1)}-***", text)


def redact_url(url: str) -> str:
    """A database URL without its password, for logs and errors."""
    return _URL_PASSWORD.sub(r"\1:***@", url)
