"""What ``cronfile center`` is started with (its command-line options, typed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cronfile.ha.settings import HaSettings
from cronfile.schedules.model import DEFAULT_KILL_GRACE_S
from cronfile.state.ledger import DEFAULT_SEGMENT_BYTES
from cronfile.state.retention import DEFAULT_RETENTION


@dataclass(frozen=True)
class HttpOptions:
    """``--http HOST:PORT`` and its companions (see :mod:`cronfile.center.http`)."""

    host: str
    port: int
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False
    idle_timeout_s: float = 15.0
    body_timeout_s: float = 10.0
    records_dsn: str | None = None
    """With ``--ha``: the DSN the API reads run records from (PostgreSQL, the ledger of
    record, so every replica answers the same); None: the state directory's ledger."""

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class GitOptions:
    """``--git URL --git-ref REF --git-poll DURATION`` (see :mod:`cronfile.center.gitsync`);
    ``subdir`` is where the schedules are inside the repository (``--schedules``)."""

    url: str
    ref: str = "main"
    poll_s: float = 30.0
    subdir: str = "schedules"


@dataclass
class CenterOptions:
    schedules: Path
    state: Path
    listen: str | None = None
    token_file: Path | None = None
    shutdown_grace_s: float = DEFAULT_KILL_GRACE_S
    watch: bool = True
    accept_undeclared: bool = False
    heartbeat_s: float = 10.0
    lease_s: float = 60.0
    known_hosts: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    retention: str = DEFAULT_RETENTION
    """``--retention``: ledger segments older than this are removed (``forever``: none)."""
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    http: HttpOptions | None = None
    git: GitOptions | None = None
    log_runs: bool = False
    """``--log-runs``: one INFO line per finished run (:mod:`cronfile.center.runlog`)."""
    ha: HaSettings | None = None  # --ha DSN --name NAME: stand by or lead (SPEC §9)
