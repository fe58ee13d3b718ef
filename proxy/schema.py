"""Typed reading of nested YAML/JSON mappings, with errors that name the key and the value.

Used by the config file, the price table and policies sent to the admin API, so every bad
value anywhere is reported the same way: `key: reason (got value)`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, NoReturn, TypeVar

from proxy.money import MoneyError, parse_usd

T = TypeVar("T")
MISSING: Any = object()  # "no value": errors then show no value
_MISSING = MISSING
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class FieldError(ValueError):
    """A bad value at a dotted key path."""

    def __init__(
        self, key: str, value: object, reason: str, parts: tuple[str | int, ...] = ()
    ) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.value = value
        self.reason = reason
        # The path as parts, so a YAML line can be found even for keys containing dots.
        self.parts = parts or (key,)

    def describe(self) -> str:
        shown = _show(self.value)
        if shown is None:
            return f"key '{self.key}': {self.reason}"
        return f"key '{self.key}': bad value {shown}: {self.reason}"


def _show(value: object) -> str | None:
    if value is _MISSING:
        return None
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def expand_env(text: str, key: str) -> str:
    """Expand `${NAME}` references; an unset variable is an error, never an empty secret."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise FieldError(key, _MISSING, f"environment variable {name} is not set")
        return os.environ[name]

    return _ENV_REF.sub(repl, text)


def display_path(parts: tuple[str | int, ...]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


class Section:
    """A mapping being read; `parts` is its key path, shown dotted in error messages.

    With a `sink`, a bad value does not stop the reading: its error is added to the sink
    and the getter answers the default (or a placeholder), so one pass finds every bad
    value (`meterproxy check`). Without one, the first bad value raises.
    """

    def __init__(
        self,
        data: object,
        parts: tuple[str | int, ...] = (),
        sink: list[FieldError] | None = None,
    ) -> None:
        self.sink = sink
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            error = FieldError(display_path(parts) or "(top level)", data, "must be a mapping",
                               parts)  # fmt: skip
            if sink is None:
                raise error
            sink.append(error)
            data = {}
        self.data: Mapping[str, Any] = data
        self.parts = parts

    def report(self, error: FieldError, placeholder: Any = None) -> Any:
        """Raise the error, or with a sink, keep it and answer the placeholder."""
        if self.sink is None:
            raise error
        self.sink.append(error)
        return placeholder

    @property
    def path(self) -> str:
        return display_path(self.parts)

    def key(self, name: str | int) -> str:
        return display_path((*self.parts, name))

    def error(self, name: str | int, value: object, reason: str) -> FieldError:
        return FieldError(self.key(name), value, reason, (*self.parts, name))

    def fail(self, name: str, reason: str) -> NoReturn:
        raise self.error(name, self.data.get(name, _MISSING), reason)

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def check_unknown(self, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for name in self.data:
            if name not in allowed:
                known = ", ".join(sorted(allowed))
                self.report(self.error(str(name), _MISSING, f"unknown key (known: {known})"))

    def _get(self, name: str, default: Any) -> Any:
        value = self.data.get(name)
        if value is None:
            if default is _MISSING:
                raise self.error(name, _MISSING, "is required")
            return default
        return value

    def _string(self, name: str, default: Any = _MISSING, *, env: bool = False) -> Any:
        value = self._get(name, default)
        if value is default:
            return value
        if not isinstance(value, str) or not value.strip():
            self.fail(name, "must be a non-empty string")
        if not env:
            return value
        try:
            return expand_env(value, self.key(name))
        except FieldError as e:
            raise self.error(name, _MISSING, e.reason) from None

    def _integer(
        self, name: str, default: Any = _MISSING, *, min: int | None = None, max: int | None = None
    ) -> Any:
        value = self._get(name, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, "must be a whole number")
        if min is not None and value < min:
            self.fail(name, f"must be >= {min}")
        if max is not None and value > max:
            self.fail(name, f"must be <= {max}")
        return value

    def _number(
        self,
        name: str,
        default: Any = _MISSING,
        *,
        min: float | None = None,
        max: float | None = None,
    ) -> Any:
        value = self._get(name, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(name, "must be a number")
        if not math.isfinite(value):
            self.fail(name, "must be a finite number")
        if min is not None and value < min:
            self.fail(name, f"must be >= {min}")
        if max is not None and value > max:
            self.fail(name, f"must be <= {max}")
        return float(value)

    def _usd(self, name: str, default: Any = _MISSING, *, max: Decimal | None = None) -> Any:
        value = self._get(name, default)
        if value is default:
            return value
        try:
            amount = parse_usd(value)
        except MoneyError as e:
            self.fail(name, str(e))
        if amount < 0:
            self.fail(name, "must be >= 0")
        if max is not None and amount > max:
            self.fail(name, f"must be at most {max:,}")
        return amount

    def _boolean(self, name: str, default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        if not isinstance(value, bool):
            self.fail(name, "must be true or false")
        return value

    def _choice(self, name: str, choices: Iterable[str], default: Any = _MISSING) -> Any:
        value = self._get(name, default)
        options = list(choices)
        if value not in options:
            self.fail(name, f"must be one of {', '.join(options)}")
        return value

    def section(self, name: str | int) -> Section:
        data = self.data.get(name) if isinstance(name, str) else None
        return Section(data, (*self.parts, name), self.sink)

    def item(self, name: str, index: int, value: object) -> Section:
        return Section(value, (*self.parts, name, index), self.sink)

    def _sequence(self, name: str) -> list[Any]:
        value = self.data.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(name, "must be a list")
        return value

    def _strings(self, name: str) -> list[str]:
        items = self._sequence(name)
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item:
                raise FieldError(
                    display_path((*self.parts, name, i)),
                    item,
                    "must be a non-empty string",
                    (*self.parts, name, i),
                )
        return items

    # The getters: each answers the default, else a placeholder, when a sink keeps errors.

    def string(self, name: str, default: Any = _MISSING, *, env: bool = False) -> Any:
        try:
            return self._string(name, default, env=env)
        except FieldError as e:
            return self.report(e, "invalid" if default is _MISSING else default)

    def integer(
        self, name: str, default: Any = _MISSING, *, min: int | None = None, max: int | None = None
    ) -> Any:
        try:
            return self._integer(name, default, min=min, max=max)
        except FieldError as e:
            return self.report(e, (min or 0) if default is _MISSING else default)

    def number(
        self,
        name: str,
        default: Any = _MISSING,
        *,
        min: float | None = None,
        max: float | None = None,
    ) -> Any:
        try:
            return self._number(name, default, min=min, max=max)
        except FieldError as e:
            return self.report(e, float(min or 0) if default is _MISSING else default)

    def usd(self, name: str, default: Any = _MISSING, *, max: Decimal | None = None) -> Any:
        try:
            return self._usd(name, default, max=max)
        except FieldError as e:
            return self.report(e, Decimal(0) if default is _MISSING else default)

    def boolean(self, name: str, default: Any = _MISSING) -> Any:
        try:
            return self._boolean(name, default)
        except FieldError as e:
            return self.report(e, False if default is _MISSING else default)

    def choice(self, name: str, choices: Iterable[str], default: Any = _MISSING) -> Any:
        options = list(choices)
        try:
            return self._choice(name, options, default)
        except FieldError as e:
            return self.report(e, options[0] if default is _MISSING else default)

    def sequence(self, name: str) -> list[Any]:
        try:
            return self._sequence(name)
        except FieldError as e:
            return self.report(e, [])  # type: ignore[no-any-return]

    def strings(self, name: str) -> list[str]:
        try:
            return self._strings(name)
        except FieldError as e:
            return self.report(e, [])  # type: ignore[no-any-return]


def decimal_places(d: Decimal) -> int:
    exponent = d.normalize().as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def yaml_line(text: str, parts: tuple[str | int, ...]) -> int | None:
    """1-based line of the deepest node of `parts` found in the YAML text, for error messages."""
    import yaml

    try:
        node: Any = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    line = None
    for part in parts:
        if node is None:
            break
        line = node.start_mark.line + 1
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == part:
                    line = key_node.start_mark.line + 1
                    nxt = value_node
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            nxt = node.value[part]
        node = nxt
    if node is not None:
        line = node.start_mark.line + 1
    return line
