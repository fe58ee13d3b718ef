"""Agent and intent ids: what a valid one looks like, and why a bad one is bad."""

from __future__ import annotations

MAX_ID_LENGTH = 128


class IdError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def validate_id(value: str, what: str) -> str:
    if not value:
        raise IdError(f"the {what} id is empty")
    if len(value) > MAX_ID_LENGTH:
        raise IdError(f"the {what} id is {len(value)} characters long; at most {MAX_ID_LENGTH}")
    if not value.isprintable():
        raise IdError(f"the {what} id contains a control or non-printable character")
    if value != value.strip():
        raise IdError(f"the {what} id starts or ends with white space")
    return value
