"""Checks of values read from JSON, each a function value -> what is wrong with it (None when
nothing is): the manifest schema is written with them, so every problem is one readable line."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

Check = Callable[[object], str | None]  # a value -> what is wrong with it, or None


def int_at_least(low: int) -> Check:
    def check(v: object) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= low
        return None if ok else f"must be an integer >= {low}, got {v!r}"

    return check


def number(low: float, allow_inf: bool = False, optional: bool = False, upper: float = math.inf) -> Check:
    def check(v: object) -> str | None:
        if v is None and optional:
            return None
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) and low <= v <= upper
        ok = ok and (allow_inf or math.isfinite(v))  # type: ignore[arg-type]
        bound = f" >= {low:g}" if math.isfinite(low) else ""
        bound += f" and <= {upper:g}" if math.isfinite(upper) else ""
        kind = f"a {'' if allow_inf else 'finite '}number{bound}{' or null' if optional else ''}"
        return None if ok else f"must be {kind}, got {v!r}"

    return check


def text(*allowed: str) -> Check:
    def check(v: object) -> str | None:
        if not isinstance(v, str) or (allowed and v not in allowed):
            return f"must be {' or '.join(map(repr, allowed)) if allowed else 'a string'}, got {v!r}"
        return None

    return check


def is_object(v: object) -> str | None:
    return None if isinstance(v, dict) else f"must be an object, got {type(v).__name__}"


def matching(pattern: str, what: str) -> Check:
    """A string that ``pattern`` matches in full; ``what`` says which in the message."""
    compiled = re.compile(pattern)

    def check(v: object) -> str | None:
        return None if isinstance(v, str) and compiled.fullmatch(v) else f"must be {what}, got {v!r}"

    return check
