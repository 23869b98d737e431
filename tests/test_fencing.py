"""Fencing by term (SPEC §9): real agent processes connected to two real hubs in this event
loop, each playing an HA center whose role and term the test sets, over real sockets on
127.0.0.1. The stale leader is forced: it believes it leads with term 1 while the other
leads with term 2, and sends orders; the agent must refuse them, run nothing, say so, and
remember the term across a restart. Plus the compatibility of the change both ways."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fencinglib import AGENT, Replica  # noqa: E402

from cronfile.agent.terms import TermFileError, TermStore
from cronfile.transports.hub import STALE_TERM_EVENT, CenterRole
from cronfile.transports.protocol import (
    Challenge,
    DaemonSpec,
    Finished,
    Hello,
    Message,
    Response,
    Run,
    Running,
    Session,
    Transcript,
    Welcome,
    agent_proof,
    center_proof,
    decode_message,
    new_nonce,
    read_body,
    read_frame,
)

SECRET = "fencing-secret-0123456789abcdef"
REPO = Path(__file__).resolve().parent.parent
OLD_AGENT_TYPES = {"challenge", "welcome", "refused", "run", "ack", "cancel", "ping", "pong",
                   "daemons"}
"""What a center sent an agent before fencing existed."""


def run(coro: Coroutine[Any, Any, Any], timeout: float = 40.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate: Callable[[], Any], what: str, timeout: float = 8.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return value


class AgentProc:
    """``cronfile agent --center A,B`` as a real process, torn down whatever happens."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "agent-state"
        self.token = tmp / "token"
        self.token.write_text(SECRET + "\n")
        self.token.chmod(0o600)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "agent.log"

    def start(self, *centers: str) -> None:
        argv = [sys.executable, "-m", "cronfile", "agent", "--center", ",".join(centers),
                "--name", AGENT, "--token-file", str(self.token), "--state", str(self.state),
                "--backoff-max", "0.3"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(REPO)})

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 5)

    def term(self) -> int | None:
        with contextlib.suppress(FileNotFoundError):
            return int(json.loads((self.state / "term.json").read_text())["term"])
        return None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def marks(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_an_order_below_the_highest_term_is_refused_reported_and_remembered(tmp_path: Path) -> None:
    marks_file = tmp_path / "marks"
    gate = tmp_path / "gate"

    def mark(run_id: str) -> str:
        return f"echo {run_id} >> {marks_file}"

    async def scenario() -> None:
        a = Replica("a", leading=True, term=1, secret=SECRET)
        b = Replica("b", leading=False, term=1, secret=SECRET)
        agent = AgentProc(tmp_path)
        await a.hub.start()
        await b.hub.start()
        try:
            agent.start(a.address, b.address)
            await until(lambda: a.connects and b.connects, "the agent on both centers")
            assert (await a.run("r1", mark("r1"))).status.value == "succeeded"
            assert a.outcome_ids() == ["r1"] and b.outcomes == []  # outcomes go to the leader
            assert agent.term() == 1
            slow = await a.start("slow", f"while [ ! -e {gate} ]; do sleep 0.05; done; "
                                         f"echo slow >> {marks_file}")
            assert slow.confirmed

            # b takes over with term 2; a was frozen and still believes it leads with term 1
            b.role = CenterRole(leading=True, term=2)
            await until(lambda: agent.term() == 2, "the agent to persist term 2")
            refused = await a.run("r2", mark("r2"))
            assert refused.status.value == "failed"
            assert refused.reason == (f"stale term: the order carries term 1; agent {AGENT} "
                                      "has seen term 2: not run")
            await until(lambda: b.events, "the refusal reported to the leader")
            assert b.events == [{"event": STALE_TERM_EVENT, "agent": AGENT, "order": "run",
                                 "run_id": "r2", "job": "fenced", "term": 1, "highest_term": 2,
                                 "from_center": a.address}]
            assert a.events == []
            # a daemon set from the stale leader is refused too: nothing starts
            await a.hub.set_daemons(AGENT, [DaemonSpec(name="sleeper", command=("sleep", "30"))])
            await until(lambda: len(b.events) == 2, "the daemons refusal")
            assert {k: b.events[1][k] for k in ("order", "run_id", "term", "highest_term")} == {
                "order": "daemons", "run_id": None, "term": 1, "highest_term": 2}
            # and so is its stop of the run it started while it led: the run goes on
            stopping = asyncio.ensure_future(slow.stop("stopped by the stale leader"))
            await until(lambda: len(b.events) == 3, "the cancel refusal")
            assert {k: b.events[2][k] for k in ("order", "run_id", "term")} == {
                "order": "cancel", "run_id": "slow", "term": 1}
            assert (await b.run("r3", mark("r3"))).status.value == "succeeded"
            gate.touch()  # the run a started ends: its outcome goes to b, the leader now
            await until(lambda: "slow" in b.outcome_ids(), "the slow run's outcome at b")
            assert b.outcome_ids() == ["r3", "slow"] and b.outcomes[1][2]["status"] == "succeeded"
            assert marks(marks_file) == ["r1", "r3", "slow"]  # r2 never ran
            stopping.cancel()

            # restart the agent with the stale center alone: the term survived on disk
            await agent.stop()
            agent.start(a.address)
            await until(lambda: len(a.connects) == 2, "the agent back on a")
            again = await a.run("r4", mark("r4"))
            assert again.status.value == "failed" and again.reason is not None
            assert "stale term" in again.reason and "seen term 2" in again.reason
            # no leader is connected now: the stale center hears of its refusals itself
            # (its daemon set, re-sent on connect, and the run)
            await until(lambda: len(a.events) == 2, "the refusals reported to the only center")
            assert [(e["order"], e["run_id"], e["highest_term"]) for e in a.events] == [
                ("daemons", None, 2), ("run", "r4", 2)]
            assert marks(marks_file) == ["r1", "r3", "slow"]
            assert "refused a run order (run r4)" in agent.log_text()
        finally:
            await agent.stop()
            await a.hub.close()
            await b.hub.close()

    run(scenario())


def test_outcomes_of_the_old_leaders_run_go_to_the_new_leader_after_a_failover(
        tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    wait_for_gate = f"while [ ! -e {gate} ]; do sleep 0.05; done; echo finished"

    async def scenario() -> None:
        a = Replica("a", leading=True, term=1, secret=SECRET)
        b = Replica("b", leading=False, term=1, secret=SECRET)
        agent = AgentProc(tmp_path)
        await a.hub.start()
        await b.hub.start()
        try:
            agent.start(a.address, b.address)
            await until(lambda: a.connects and b.connects, "the agent on both centers")
            handle = await a.start("slow", wait_for_gate)
            assert handle.confirmed  # running on the agent
            # a steps down and nobody leads yet: the outcome waits in the agent's outbox
            a.role = CenterRole(leading=False, term=1)
            await until(lambda: f"the center at {a.address} stands by" in agent.log_text(),
                        "the agent told that a stands by")
            gate.touch()
            outbox = agent.state / "outbox.jsonl"
            await until(lambda: "slow" in outbox.read_text(), "the outcome stored")
            assert a.outcomes == [] and b.outcomes == []
            # b leads with term 2: it gets the outbox, for a run it never dispatched
            b.role = CenterRole(leading=True, term=2)
            await until(lambda: b.outcomes, "the outcome delivered to the new leader")
            run_id, sender, outcome = b.outcomes[0]
            assert (run_id, sender, outcome["status"]) == ("slow", AGENT, "succeeded")
            assert outcome["output_tail"] == "finished\n"
            assert a.outcomes == [] and not handle.done
            assert agent.term() == 2
            # the old leader, standing by, neither orders a stop nor waits for one
            await asyncio.wait_for(handle.stop("too late"), 2)
            assert not handle.done
        finally:
            await agent.stop()
            await a.hub.close()
            await b.hub.close()

    run(scenario())


def test_a_standby_center_sends_no_order(tmp_path: Path) -> None:
    """A standby knows the leader's term from the lease: it must not order with it."""

    async def scenario() -> None:
        b = Replica("b", leading=False, term=3, secret=SECRET)
        agent = AgentProc(tmp_path)
        await b.hub.start()
        try:
            agent.start(b.address)
            await until(lambda: b.connects, "the agent connected")
            await until(lambda: agent.term() == 3, "the standby's term persisted")
            with pytest.raises(Exception, match="does not lead"):
                await b.start("r1", "true")
            await b.hub.set_daemons(AGENT, [DaemonSpec(name="sleeper", command=("sleep", "30"))])
            assert b.hub.snapshot()[0]["name"] == AGENT  # connected, listed in status
            b.role = CenterRole(leading=True, term=3)  # it takes over: now it may order
            assert (await b.run("r2", "echo ok")).status.value == "succeeded"
            await until(lambda: any(d.name == "sleeper" for d in b.hub.daemon_status(AGENT)),
                        "the daemon set sent on becoming the leader")
        finally:
            await agent.stop()
            await b.hub.close()

    run(scenario())


def test_an_agent_with_a_center_without_ha_works_as_before(tmp_path: Path) -> None:
    """New agent, center without --ha (or an older center): no term anywhere, nothing fenced."""

    async def scenario() -> None:
        hub = Replica("plain", leading=True, term=None, secret=SECRET)
        hub.role = None
        hub.hub.role = None  # a center without --ha
        agent = AgentProc(tmp_path)
        await hub.hub.start()
        try:
            agent.start(hub.address)
            await until(lambda: hub.connects, "the agent connected")
            assert (await hub.run("r1", "echo ok")).status.value == "succeeded"
            assert hub.outcome_ids() == ["r1"] and agent.term() is None
        finally:
            await agent.stop()
            await hub.hub.close()

    run(scenario())


def test_an_old_agent_gets_no_role_frames_from_an_ha_center(tmp_path: Path) -> None:
    """An agent from before fencing (its hello has no ``terms``) on an HA center: it is
    served, gets only the frames it knows, and its run frame just has a field it ignores."""

    async def scenario() -> None:
        a = Replica("a", leading=True, term=4, secret=SECRET)
        await a.hub.start()
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", a.hub.port)
            hello = Hello(agent=AGENT, version="0.9", nonce=new_nonce())
            old = {k: v for k, v in hello.to_dict().items() if k != "terms"}
            body = json.dumps(old).encode()
            writer.write(len(body).to_bytes(4, "big") + body)
            challenge = await read_frame(reader)
            assert isinstance(challenge, Challenge)
            transcript = Transcript(hello, body, challenge.nonce)
            writer.write(Response(mac=agent_proof(SECRET.encode(), transcript)).frame())
            welcome = await read_frame(reader)
            assert isinstance(welcome, Welcome) and welcome.ha
            session = Session.of_agent(SECRET.encode(), transcript)
            writer.write(session.frame(Running()))
            await writer.drain()
            await until(lambda: a.connects, "the old agent registered")
            dispatch = asyncio.ensure_future(a.start("r1", "true"))
            seen: list[dict[str, Any]] = []
            while not seen or seen[-1]["type"] != "run":
                msg = await asyncio.wait_for(session.read(reader), 5)
                seen.append(msg.to_dict())
            assert {m["type"] for m in seen} <= OLD_AGENT_TYPES
            assert seen[-1]["term"] == 4 and seen[-1]["run_id"] == "r1"
            now = Finished(run_id="r1", status="succeeded", started_at=datetime.now(UTC),
                           finished_at=datetime.now(UTC))
            writer.write(session.frame(now))
            await writer.drain()
            handle = await dispatch
            assert (await asyncio.wait_for(handle.wait(), 5)).status.value == "succeeded"
        finally:
            if writer is not None:
                writer.transport.abort()
            await a.hub.close()

    run(scenario())


def test_old_peers_decode_the_new_frames() -> None:
    """Additive: a hello without ``terms`` is an agent that does not fence; a run with a
    term decodes for a reader that ignores unknown fields (as v2 readers always did)."""
    hello = decode_message(json.dumps({"type": "hello", "v": 2, "agent": "a", "version": "0.9",
                                       "nonce": new_nonce()}).encode())
    assert isinstance(hello, Hello) and hello.terms is False
    welcome = decode_message(b'{"type":"welcome","v":2,"agent":"a","center":"0.9",'
                             b'"heartbeat_s":10}')
    assert isinstance(welcome, Welcome) and welcome.ha is False
    run_frame = decode_message(b'{"type":"run","v":2,"run_id":"r","job":"j","command":"true"}')
    assert isinstance(run_frame, Run) and run_frame.term is None


def test_term_store_persists_only_higher_terms(tmp_path: Path) -> None:
    store = TermStore(tmp_path)
    assert store.highest == 0 and not (tmp_path / "term.json").exists()
    store.raise_to(3)
    store.raise_to(2)
    assert TermStore(tmp_path).highest == 3
    assert json.loads((tmp_path / "term.json").read_text()) == {"v": 1, "term": 3}
    assert not (tmp_path / "term.tmp").exists()
    (tmp_path / "term.json").write_text('{"v": 1, "term": "x"}')
    with pytest.raises(TermFileError, match="term.json: expected"):
        TermStore(tmp_path)


def test_agent_with_an_unreadable_term_file_does_not_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "term.json").write_text("garbage")
    out = subprocess.run(
        [sys.executable, "-m", "cronfile", "agent", "--center", "127.0.0.1:1", "--name", AGENT,
         "--state", str(state)], capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2
    assert f"{state / 'term.json'}: expected" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(("centers", "problem"), [
    ("127.0.0.1:7070,127.0.0.1:7070", "--center lists 127.0.0.1:7070 twice"),
    ("127.0.0.1:7070,nonsense", "--center must be HOST:PORT, got 'nonsense'"),
])
def test_bad_center_lists_are_usage_errors(tmp_path: Path, centers: str, problem: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cronfile", "agent", "--center", centers, "--name", AGENT,
         "--state", str(tmp_path / "s")], capture_output=True, text=True, timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and problem in out.stderr, out.stderr


class _OldFrame(Message):
    """A frame body exactly as a center from before fencing wrote it (no ``ha``, no
    ``term``): sealed by the real session code, written by hand."""

    def __init__(self, msg: Message, drop: str) -> None:
        self.data = {k: v for k, v in msg.to_dict().items() if k != drop}

    def encode(self) -> bytes:
        return json.dumps(self.data).encode()


def test_a_new_agent_works_with_a_center_from_before_fencing(tmp_path: Path) -> None:
    """The reverse direction: a real agent process and a hand-written center that speaks v2
    as it was (its welcome has no ``ha``, its run no ``term``): the run runs, unfenced."""
    out_file = tmp_path / "ran"

    async def scenario() -> None:
        frames: list[Message] = []
        done = asyncio.Event()

        async def old_center(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                body = await read_body(reader)
                hello = decode_message(body)
                assert isinstance(hello, Hello) and hello.terms  # the new agent says so
                nonce = new_nonce()
                writer.write(Challenge(nonce=nonce).frame())
                await read_frame(reader)  # the response (not checked: this is a test center)
                transcript = Transcript(hello, body, nonce)
                welcome = Welcome(agent=AGENT, center="0.9", heartbeat_s=1.0,
                                  proof=center_proof(SECRET.encode(), transcript))
                old_welcome = _OldFrame(welcome, drop="ha").encode()
                writer.write(len(old_welcome).to_bytes(4, "big") + old_welcome)
                session = Session.of_center(SECRET.encode(), transcript)
                assert isinstance(await session.read(reader), Running)
                order = Run(run_id="old-1", job="j", command=f"echo ran > {out_file}")
                writer.write(session.frame(_OldFrame(order, drop="term")))
                await writer.drain()
                while not any(isinstance(f, Finished) for f in frames):
                    frames.append(await asyncio.wait_for(session.read(reader), 10))
                done.set()
            finally:
                writer.transport.abort()

        server = await asyncio.start_server(old_center, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        agent = AgentProc(tmp_path)
        try:
            agent.start(f"127.0.0.1:{port}")
            await asyncio.wait_for(done.wait(), 20)
        finally:
            await agent.stop()
            server.close()
        final = [f for f in frames if isinstance(f, Finished)]
        assert [(f.run_id, f.status) for f in final] == [("old-1", "succeeded")]
        assert out_file.read_text() == "ran\n"
        assert agent.term() is None  # nothing to fence with: no term.json

    run(scenario())
