"""Durations and byte sizes in the notations StudioML clients write.

Durations follow Go's ``time.ParseDuration`` (``"75s"``, ``"1h30m"``) because the upstream
runner parsed them with it; sizes follow go-humanize (``"2g"``, ``"16GiB"``, ``"512mb"``).
"""

from __future__ import annotations

import math
import re

_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?)(b?)\s*$", re.IGNORECASE)
_SIZE_EXPONENT = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string; raises ValueError for anything Go would reject."""
    value = text.strip()
    if value in ("0", "+0", "-0"):
        return 0.0
    sign = -1.0 if value.startswith("-") else 1.0
    body = value.lstrip("+-")
    if not body:
        raise ValueError(f"invalid duration {text!r}")
    total = 0.0
    position = 0
    # match() at each position, never finditer(): scanning ahead for a later match made a long
    # run of digits quadratic (a megabyte max_duration held a runner for hours)
    while (match := _DURATION_PART.match(body, position)) is not None:
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(body):
        raise ValueError(f"invalid duration {text!r} (expected e.g. '90s', '20m', '1h30m')")
    return sign * total


def format_duration(seconds: float) -> str:
    """The shortest Go duration string for a whole number of seconds."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"


def parse_size(text: str | int | float) -> int:
    """Bytes in a human size: SI suffixes are powers of 1000, ``i`` suffixes powers of 1024."""
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"invalid size {text!r}")
        return int(text)
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r} (expected e.g. '512mb', '2g', '16GiB')")
    number, prefix, binary, _ = match.groups()
    base = 1024 if binary else 1000
    if binary and not prefix:
        raise ValueError(f"invalid size {text!r}")
    size = float(number) * base ** _SIZE_EXPONENT[prefix.lower()]
    if not math.isfinite(size):  # hundreds of digits: int() would raise OverflowError
        raise ValueError(f"invalid size {text!r} (too large)")
    return int(size)


def format_size(size: int) -> str:
    """A compact binary size for logs and summaries."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
