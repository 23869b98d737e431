"""What ``--ha`` asks of a center (SPEC §9), in a module that does not import psycopg.

The options of every center carry it, with or without ``--ha``; the PostgreSQL driver is
imported only by the parts that talk to the database, so a center without ``--ha`` (and
every other command) starts without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HaSettings"]


@dataclass(frozen=True)
class HaSettings:
    """``--ha DSN --name NAME --ha-lease --ha-renew-deadline`` (seconds)."""

    dsn: str
    name: str
    lease_s: float = 15.0
    renew_deadline_s: float = 10.0
    renew_interval_s: float = 2.0
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("--name must not be empty")
        if not 0 < self.renew_deadline_s < self.lease_s:
            raise ValueError(
                f"--ha-renew-deadline ({self.renew_deadline_s:g}s) must be shorter than "
                f"--ha-lease ({self.lease_s:g}s)"
            )
        if not 0 < self.renew_interval_s < self.renew_deadline_s:
            raise ValueError(
                f"the renew interval ({self.renew_interval_s:g}s) must be shorter than "
                f"--ha-renew-deadline ({self.renew_deadline_s:g}s)"
            )
