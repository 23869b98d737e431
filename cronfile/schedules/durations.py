"""Durations (``90s``, ``10m``, ``1h30m``) and sizes (``64KiB``) as written in schedule files."""

from __future__ import annotations

import functools
import math
import re

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d|w)")
_DURATION = re.compile(r"^(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d|w))+$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DURATION_S = 100 * 365 * 86400  # past this a duration is a typo (and overflows datetimes)
_SIZE = re.compile(r"^([0-9]+)(B|KiB|MiB|GiB|KB|MB|GB)?$")
_SIZE_FACTORS = {
    None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
}


@functools.lru_cache(maxsize=4096, typed=True)  # typed: True must not hit the entry for 1
def parse_duration(value: str | int | float) -> float:
    """Seconds in a duration; a bare number is seconds. Raises ValueError with the grammar."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value != value:  # NaN
            raise ValueError("NaN is not a duration")
        if value < 0:
            raise ValueError(f"{_shown(value)} is negative")
        seconds = float(value) if value < 10 * MAX_DURATION_S else math.inf
    else:
        text = value.strip()
        if not _DURATION.match(text):
            raise ValueError(
                f"{_shown(value)} is not a duration (write e.g. 90s, 10m, 1h30m, 500ms; "
                "units ms s m h d w)"
            )
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
    if not seconds <= MAX_DURATION_S:
        raise ValueError(f"{_shown(value)} is longer than 100 years")
    # Rounded to the microsecond so that "1h2ms" is exactly 3600002/1000, as it would be
    # written in any other way: format_duration and parse_duration round-trip.
    return round(seconds, 6)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_duration(seconds: float) -> str:
    """The shortest duration text that parses back to ``seconds`` (``5400`` -> ``1h30m``)."""
    if not 0 <= seconds < math.inf:
        raise ValueError(f"{seconds!r} is not a duration")
    whole = int(seconds)
    millis = round((seconds - whole) * 1000)
    if millis == 1000:
        whole, millis = whole + 1, 0
    parts = []
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    if millis:
        parts.append(f"{millis}ms")
    return "".join(parts) or "0s"


def parse_size(value: str | int) -> int:
    """Bytes in a size such as ``64KiB`` (1024-based) or ``10KB`` (1000-based)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return value
    match = _SIZE.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a size (write e.g. 64KiB, 1MiB, 512B)")
    return int(match.group(1)) * _SIZE_FACTORS[match.group(2)]
