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
    Migration(
        2,
        "record lines, indexes and open runs for runs/status/logs",
        # ``line``: the record exactly as the JSONL ledger has it (jsonb keeps neither key
        # order nor the text), so runs/logs from here print the bytes the JSONL path prints.
        # NULL for rows copied before; readers then rebuild a line from ``body``.
        # The partial indexes serve the read side (cronfile.ha.queries): runs newest first,
        # overall and per job; each job's last outcome; each agent's last run; the last
        # rejection and each job's last failed notification.
        # ``cronfile_open_runs`` is the set of runs dispatched or started and not finished,
        # kept by a statement trigger (set-based: one claim statement of 1,000 runs fires it
        # once), because finding them in the records means an anti-join over all history.
        """
        ALTER TABLE cronfile_records ADD COLUMN line text;
        CREATE INDEX cronfile_records_runs ON cronfile_records (seq) WHERE kind = 'run';
        CREATE INDEX cronfile_records_job_seq ON cronfile_records (job, seq) WHERE kind = 'run';
        CREATE INDEX cronfile_records_run_seq ON cronfile_records (run_id, seq) WHERE kind = 'run';
        CREATE INDEX cronfile_records_finished ON cronfile_records (job, seq)
            WHERE kind = 'run' AND body->>'record' = 'finished';
        CREATE INDEX cronfile_records_host ON cronfile_records ((body->>'agent'), seq)
            WHERE kind = 'run' AND body->>'record' IS DISTINCT FROM 'started'
              AND jsonb_typeof(body->'scheduled_at') = 'string'
              AND body->>'transport' IN ('local', 'tcp', 'ssh');
        CREATE INDEX cronfile_records_revisions ON cronfile_records (seq)
            WHERE kind = 'event' AND body->>'event' IN ('revision_rejected', 'revision_applied');
        CREATE INDEX cronfile_records_notify_failed ON cronfile_records ((body->>'job'), seq)
            WHERE kind = 'event' AND body->>'event' = 'notify_failed';

        CREATE TABLE cronfile_open_runs (
            run_id text PRIMARY KEY,
            job text NOT NULL,
            seq bigint NOT NULL
        );
        CREATE INDEX cronfile_open_runs_seq ON cronfile_open_runs (seq);
        INSERT INTO cronfile_open_runs (run_id, job, seq)
        SELECT r.run_id, min(r.job), min(r.seq) FROM cronfile_records r
        LEFT JOIN (SELECT run_id, max(seq) AS done FROM cronfile_records
                   WHERE kind = 'run' AND body->>'record' = 'finished' GROUP BY run_id) f
            USING (run_id)
        WHERE r.kind = 'run' AND r.body->>'record' IN ('dispatched', 'started')
          AND r.run_id IS NOT NULL AND r.job IS NOT NULL AND (f.done IS NULL OR r.seq > f.done)
        GROUP BY r.run_id;

        -- The ledger fold's rule, per run and in seq order: dispatched or started opens it
        -- (where it was first opened), finished closes it.
        CREATE FUNCTION cronfile_track_open_runs() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM cronfile_open_runs o USING added a
            WHERE a.kind = 'run' AND a.run_id = o.run_id AND a.body->>'record' = 'finished';
            INSERT INTO cronfile_open_runs (run_id, job, seq)
            SELECT DISTINCT ON (a.run_id) a.run_id, a.job, a.seq FROM added a
            WHERE a.kind = 'run' AND a.run_id IS NOT NULL AND a.job IS NOT NULL
              AND a.body->>'record' IN ('dispatched', 'started')
              AND NOT EXISTS (SELECT 1 FROM added f WHERE f.run_id = a.run_id AND f.kind = 'run'
                              AND f.body->>'record' = 'finished' AND f.seq > a.seq)
            ORDER BY a.run_id, a.seq
            ON CONFLICT (run_id) DO NOTHING;
            RETURN NULL;
        END $$;
        CREATE TRIGGER cronfile_records_open_runs AFTER INSERT ON cronfile_records
            REFERENCING NEW TABLE AS added FOR EACH STATEMENT
            EXECUTE FUNCTION cronfile_track_open_runs();
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
