"""Finding 3 of issue 11 against a real center: an agent reports the outcome of a run that
was sent to another agent, for a run the center awaits after its own restart (no handle,
only the ledger says where the run went). Real ``cronfile center`` and ``cronfile agent``
processes; the forger is a raw client doing a genuine handshake with its own name."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from centerlib import finished  # noqa: E402
from fleetlib import SECRET  # noqa: E402
from test_fleet import Fleet, labelled  # noqa: E402

from cronfile.transports.protocol import (  # noqa: E402
    Challenge,
    Finished,
    Hello,
    Response,
    Running,
    Session,
    Transcript,
    Welcome,
    agent_proof,
    new_nonce,
    read_frame,
)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


async def forge(port: int, as_agent: str, run_id: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hello = Hello(agent=as_agent, version="forger", nonce=new_nonce())
    writer.write(hello.frame())
    challenge = await asyncio.wait_for(read_frame(reader), 5)
    assert isinstance(challenge, Challenge)
    transcript = Transcript(hello, hello.encode(), challenge.nonce)
    writer.write(Response(mac=agent_proof(SECRET.encode(), transcript)).frame())
    assert isinstance(await asyncio.wait_for(read_frame(reader), 5), Welcome)
    session = Session.of_agent(SECRET.encode(), transcript)
    now = datetime.now(UTC)
    writer.write(session.frame(Running()))
    writer.write(session.frame(Finished(run_id=run_id, status="succeeded", started_at=now,
                                        finished_at=now, exit_code=0)))
    await writer.drain()
    await asyncio.sleep(0.5)  # let the center read it before we hang up
    writer.close()


def test_outcome_of_a_run_awaited_after_restart_is_taken_only_from_its_agent(
        fleet: Fleet) -> None:
    c = fleet.start_center(labelled("a1", "a2"), lease=30.0, jobs="""  victim:
    schedule: '0 0 1 1 *'
    command: 'sleep 6; exit 7'
    targets: {agents: [a1]}
""")
    fleet.agent("a1")
    assert c.cli("run", "victim").returncode == 0
    runs = c.until(lambda rs: [r for r in rs if r.get("job") == "victim"
                               and r.get("record") == "started"], 10, "victim to start on a1")
    run_id = next(r["run_id"] for r in runs if r.get("record") == "started")
    c.kill()
    c.start()
    c.wait_connected("a1", times=2)  # the hub is up; a1 says the run is still going
    asyncio.run(forge(c.port, "a2", run_id))
    done = c.until(lambda rs: finished(rs, "victim"), 15, "victim's real outcome")
    assert [(r["run_id"], r["status"], r["exit_code"], r["agent"])
            for r in finished(done, "victim")] == [(run_id, "failed", 7, "a1")]
    assert f"agent a2 sent an outcome for run {run_id}, which ran on a1: ignored" in c.log_text()
