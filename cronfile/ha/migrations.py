"""The HA schema, versioned, applied by every center at start (SPEC §9).

Each migration is applied once, in order, and recorded in ``cronfile_schema``. Two centers
starting together must not race: ``CREATE TABLE IF NOT EXISTS`` run concurrently can still
fail on the catalog's unique index, and two centers could both see version 1 missing. So the
whole upgrade runs in ONE transaction that first takes a transaction-scoped advisory lock;
the second center waits, then sees every version applied and does nothing.

Why the lease table is an ordinary (logged) table, unlike River's UNLOGGED leader table: the
``term`` is our fencing token and must never go backwards. An UNLOGGED table is emptied by
crash recovery, which would restart terms at 1 and let a stale leader's orders look new.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

__all__ = ["MIGRATIONS", "Migration", "applied_versions", "migrate"]

# Any constant works as long as every cronfile center uses the same one; "cronfile" in ASCII.
ADVISORY_LOCK_KEY = 0x63726F6E66696C65


@dataclass(frozen=True)
class Migration:
    """One step of the schema; ``sql`` may hold several statements."""

    version: int
    description: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "lease, slot claims, records",
        """
        CREATE TABLE cronfile_lease (
            id smallint PRIMARY KEY CHECK (id = 1),
            holder text NOT NULL,
            term bigint NOT NULL CHECK (term >= 1),
            acquired_at timestamptz NOT NULL,
            expires_at timestamptz NOT NULL
        );
        -- target is '' for one/hash/failover/local jobs (one claim per slot) and the agent's
        -- name for all/shard jobs (one claim per slot and agent).
        CREATE TABLE cronfile_claims (
            job text NOT NULL,
            scheduled_at timestamptz,
            target text NOT NULL,
            run_id text NOT NULL UNIQUE,
            term bigint NOT NULL,
            holder text NOT NULL,
            claimed_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (job, scheduled_at, target)
        );
        CREATE TABLE cronfile_records (
            seq bigserial PRIMARY KEY,
            kind text NOT NULL CHECK (kind IN ('run', 'event')),
            ts timestamptz NOT NULL,
            run_id text,
            job text,
            center text NOT NULL,
            term bigint,
            body jsonb NOT NULL
        );
        CREATE INDEX cronfile_records_run_id ON cronfile_records (run_id);
        CREATE INDEX cronfile_records_job_ts ON cronfile_records (job, ts);
        CREATE INDEX cronfile_records_ts ON cronfile_records (ts);
        """,
    ),
)


def migrate(conn: psycopg.Connection[Any], migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Bring the schema up to date; return the versions this call applied (often none)."""
    applied_now: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS cronfile_schema ("
            " version integer PRIMARY KEY, description text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM cronfile_schema")}
        for step in sorted(migrations, key=lambda m: m.version):
            if step.version in done:
                continue
            conn.execute(step.sql.encode())
            conn.execute(
                "INSERT INTO cronfile_schema (version, description) VALUES (%s, %s)",
                (step.version, step.description),
            )
            applied_now.append(step.version)
    return applied_now


def applied_versions(conn: psycopg.Connection[Any]) -> list[int]:
    """The versions recorded in the database, oldest first."""
    return [row[0] for row in conn.execute("SELECT version FROM cronfile_schema ORDER BY version")]
