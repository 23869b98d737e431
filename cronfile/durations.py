"""Durations (``90s``, ``10m``, ``1h30m``) and sizes (``64KiB``) as written in schedule files."""

from __future__ import annotations

import re

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d|w)")
_DURATION = re.compile(r"^(?:[0-9]+(?:\.[0-9]+)?(?:ms|s|m|h|d|w))+$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^([0-9]+)(B|KiB|MiB|GiB|KB|MB|GB)?$")
_SIZE_FACTORS = {
    None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
}


def parse_duration(value: str | int | float) -> float:
    """Seconds in a duration; a bare number is seconds. Raises ValueError with the grammar."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    text = value.strip()
    if not _DURATION.match(text):
        raise ValueError(
            f"{value!r} is not a duration (write e.g. 90s, 10m, 1h30m, 500ms; units ms s m h d w)"
        )
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


def format_duration(seconds: float) -> str:
    """The shortest duration text that parses back to ``seconds`` (``5400`` -> ``1h30m``)."""
    if seconds < 0:
        raise ValueError("negative duration")
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
