"""Durations and byte sizes in the notations StudioML clients write.

Durations follow Go's ``time.ParseDuration`` (``"75s"``, ``"1h30m"``) because the upstream
runner parsed them with it; sizes follow go-humanize (``"2g"``, ``"16GiB"``, ``"512mb"``).
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

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


def parse_seconds(value: str | float | timedelta) -> float:
    """Seconds in a timedelta, a number, a number's text (``"90"``) or a Go duration (``"1m30s"``).

    The one reading of every duration option, on the command line and in operator arguments;
    bounds (positive, non-negative) are the caller's to check. Raises ValueError, also for NaN and
    infinities, which no limit can mean.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value)
        except ValueError:
            seconds = parse_duration(value)
    else:
        raise ValueError(f"invalid duration {value!r} (expected e.g. '90s', '20m', '1h30m' or seconds)")
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r} (not a finite number of seconds)")
    return seconds


def is_seconds_number(text: str) -> bool:
    """Whether ``text`` is a plain number of seconds rather than a Go duration."""
    try:
        float(text)
    except ValueError:
        return False
    return True


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
