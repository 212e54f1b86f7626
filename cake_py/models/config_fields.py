"""Reading one field of a model's JSON config as the type it must be: a value of another type is a ValueError that
names the field (ModelConfig.from_hf adds which file), where int() and float() took "64", 64.5 and true silently, or
refused them naming no field."""

from __future__ import annotations

from typing import Any

REQUIRED: Any = object()


def integer(raw: dict[str, Any], key: str, default: Any = REQUIRED, name: str | None = None) -> Any:
    """`raw[key]` as a whole number (64.0, as some tools write it, is 64); absent or null, `default` (a KeyError
    when there is none). A string, a fraction, true/false or infinity is a ValueError naming the field: int() took
    "64" and 64.5 (as 64) and true (as 1) without a word, and named no field for what it refused."""
    value = raw[key] if default is REQUIRED else raw.get(key)
    if value is None and default is not REQUIRED:
        return default
    return whole(value, name or key)


def whole(value: Any, name: str) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {shown(value)}")
    return value


def number(raw: dict[str, Any], key: str, default: float, name: str | None = None) -> float:
    """`raw[key]` as a float (`default` when absent or null); anything but a number is a ValueError naming the
    field. Its range is ModelConfig.from_hf's to judge."""
    value = raw.get(key)
    if value is None:
        return float(default)
    if not is_number(value):
        raise ValueError(f"{name or key} must be a number, got {shown(value)}")
    return float(value)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def json_object(raw: dict[str, Any], key: str) -> dict[str, Any]:
    """`raw[key]`, a JSON object ({} when absent or null); anything else a ValueError naming the field."""
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a JSON object, got {shown(value)}")
    return value


def shown(value: Any) -> str:
    """A bad value for a one-line message: cut short (a number of 400 digits, a list of thousands)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
