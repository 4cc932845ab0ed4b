"""Durations as people write them: ``250ms``, ``90s``, ``30m``, ``2h``, ``1.5d``, ``1w``.

One parser for the simulator's duration flags (``--cold-start 2m``), the cost report's
relative times (``--since -24h``) and the checkpoint interval's seconds form (``30s``).
Each caller names the units it takes and whether a plain number (seconds) is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["DurationError", "UNITS_S", "parse_duration_s"]

UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0, "w": 604_800.0}
_UNITS = ("ms", "s", "m", "h", "d")


class DurationError(ValueError):
    """Not a duration; the message names the text and a form that works."""


def parse_duration_s(text: str, *, units: Iterable[str] = _UNITS, bare: bool = True) -> float:
    """``'90s'``, ``'30m'``, ``'2h'``, ``'1.5d'``, ``'250ms'`` (any of ``units``, any case)
    or, with ``bare``, plain seconds -> seconds: finite and >= 0, else DurationError."""
    raw = text.strip().lower() if isinstance(text, str) else ""
    for unit in sorted(units, key=len, reverse=True):  # "ms" before "s"
        if raw.endswith(unit):
            number, scale = raw[: -len(unit)], UNITS_S[unit]
            break
    else:
        number, scale = (raw, 1.0) if bare else ("", 1.0)
    try:
        value = float(number) * scale
    except ValueError:
        raise DurationError(f"duration {text!r} is not like 90s, 30m, 2h or 1d") from None
    if not math.isfinite(value) or value < 0:
        raise DurationError(f"duration {text!r} must be a finite number >= 0, like 30m")
    return value
