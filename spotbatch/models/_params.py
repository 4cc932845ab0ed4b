"""Small validators shared by the handlers' check_params / check_row."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

__all__ = ["reject_unknown_params", "bool_param", "check_text", "texts_ok"]


def reject_unknown_params(model: str, params: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Raise ValueError naming the first key of ``params`` that ``model`` does not take."""
    if not isinstance(params, Mapping):
        raise ValueError(f"params for model {model!r} must be an object, got {type(params).__name__}")
    allowed = sorted(allowed)
    for key in params:
        if key not in allowed:
            choices = ", ".join(allowed) if allowed else "none"
            raise ValueError(f"unknown param {key!r} for model {model!r}; allowed: {choices}")


def bool_param(params: Mapping[str, Any], key: str, default: bool) -> bool:
    """Read a strict boolean: 1, "yes" and friends are rejected, not guessed at."""
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"param {key!r} must be true or false, got {value!r}")
    return value


def check_text(value: Any, max_chars: int | None = None) -> None:
    """A row for a text model: a non-empty str, optionally bounded in length."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if not value:
        raise ValueError("expected a non-empty string, got ''")
    if max_chars is not None and len(value) > max_chars:
        raise ValueError(f"text is {len(value)} characters; the limit is {max_chars}")


def texts_ok(values: Sequence[Any], max_chars: int | None = None) -> bool:
    """Whether every value passes check_text, in C-level passes over the list (no Python
    call per row); False means: look row by row for the first bad one and its reason."""
    if not values or set(map(type, values)) != {str}:
        return False
    lengths = list(map(len, values))
    return min(lengths) > 0 and (max_chars is None or max(lengths) <= max_chars)

