"""What the benchmarks share: percentiles, ledger times, stopping a center."""

from __future__ import annotations

import math
import signal
import subprocess
from collections.abc import Sequence
from datetime import datetime


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (NaN for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def parse_iso(text: str | None) -> float | None:
    """Epoch seconds of a ledger time (``...Z``), None when absent."""
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def stop_center(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, as an operator would; SIGKILL when it has not stopped within ``timeout``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
