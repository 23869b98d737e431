"""High availability (SPEC §9): standby centers coordinated through PostgreSQL.

PostgreSQL is the only arbiter: a lease row with a ``term`` (the fencing token) decides who
leads, slot claims are inserted in the statement that checks that lease, and every §4 record
is kept there. Nothing here invents consensus; the database's row locks and ``now()`` do it.

- :mod:`cronfile.ha.migrations`: the versioned schema, applied at start under an advisory lock.
- :mod:`cronfile.ha.lease`: the lease statements (acquire, renew, release, read).
- :mod:`cronfile.ha.claims`: slot claims and the records table.
- :mod:`cronfile.ha.elector`: the asyncio loop that keeps (or waits for) the lease.
"""
