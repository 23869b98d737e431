"""Agents end to end: a real AgentHub in the test's event loop, real agent processes, real
sockets on 127.0.0.1. Every wait is bounded; nothing is mocked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from localuser import ensure_other_user, run_as

from cronfile.agent.daemon import AgentState
from cronfile.schedules.model import Agent, RunStatus
from cronfile.state.ledger import iso
from cronfile.transports.executor import HostUnavailable, RunRequest
from cronfile.transports.hub import AgentHub
from cronfile.transports.protocol import (
    MAX_PREAUTH_FRAME,
    Challenge,
    DaemonSpec,
    Finished,
    Hello,
    Message,
    ProtocolError,
    Refused,
    Response,
    Run,
    Running,
    Secrets,
    Session,
    Transcript,
    Welcome,
    agent_proof,
    new_nonce,
    read_frame,
)

SECRET = "fleet-secret-0123456789"
REPO = Path(__file__).resolve().parent.parent


def run(coro: Coroutine[Any, Any, Any], timeout: float = 14.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate: Callable[[], Any], what: str, timeout: float = 6.0) -> None:
    """Poll a condition (bounded): the state we wait on lives in another process."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Fleet:
    """A hub in this event loop plus agent processes, torn down however the test ends."""

    def __init__(
        self,
        tmp_path: Path,
        agents: tuple[str, ...] = ("a1",),
        secrets: Secrets | None = None,
        **hub_options: Any,
    ) -> None:
        self.tmp = tmp_path
        self.connects: list[str] = []
        self.disconnects: list[str] = []
        self.outcomes: list[tuple[str, str, dict[str, Any]]] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pgids: list[int] = []
        inventory = {name: Agent(name, labels=(("team", "ops"),)) for name in agents}
        options: dict[str, Any] = {"heartbeat_s": 1.0, "lease_s": 5.0,
                                   "handshake_timeout_s": 2.0}
        options.update(hub_options)
        self.hub = AgentHub(
            "127.0.0.1", 0,
            inventory=inventory,
            secrets=secrets if secrets is not None else Secrets(shared=SECRET.encode()),
            on_connect=self.connects.append,
            on_disconnect=self.disconnects.append,
            on_outcome=lambda run_id, agent, outcome: self.outcomes.append(
                (run_id, agent, outcome)),
            **options,
        )

    async def __aenter__(self) -> Fleet:
        await self.hub.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)
        for pgid in self.pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        await self.hub.close()

    @property
    def port(self) -> int:
        return self.hub.port

    def agent(self, name: str, *extra: str, token: str | None = SECRET,
              tls_ca: Path | None = None) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "cronfile", "agent", "--center", f"127.0.0.1:{self.port}",
                "--name", name, "--state", str(self.tmp / f"state-{name}"),
                "--backoff-max", "0.3", *extra]
        if token is not None:
            token_file = self.tmp / f"token-{name}"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
            args += ["--token-file", str(token_file)]
        if tls_ca is not None:
            args += ["--tls-ca", str(tls_ca)]
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    async def connected(self, name: str, times: int = 1) -> None:
        await until(lambda: self.connects.count(name) >= times and self.hub.is_connected(name),
                    f"agent {name} to connect ({times}x); log:\n{self._safe_log(name)}")

    def _safe_log(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return self.log(name)
        return ""

    async def start(self, name: str, request: RunRequest) -> Any:
        executor = self.hub.executor_for(name)
        assert executor is not None, f"{name} is not connected"
        assert executor.transport == "tcp"
        handle = await executor.start(request)
        if handle.pid:
            self.pgids.append(handle.pid)
        return handle


def req(run_id: str, command: tuple[str, ...] | str, **kw: Any) -> RunRequest:
    return RunRequest(run_id=run_id, job="job", command=command, **kw)


async def open_raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def send(writer: asyncio.StreamWriter, msg: Message) -> None:
    writer.write(msg.frame())
    await writer.drain()


async def read(reader: asyncio.StreamReader) -> Message:
    return await asyncio.wait_for(read_frame(reader), 5)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True when the other side closed the connection (EOF or reset) within the timeout."""
    try:
        data = await asyncio.wait_for(reader.read(1 << 16), timeout)
        while data:
            data = await asyncio.wait_for(reader.read(1 << 16), timeout)
        return True
    except TimeoutError:  # before OSError: TimeoutError is one
        return False
    except (ConnectionError, OSError):
        return True


async def sealed_handshake(
    port: int, name: str, secret: bytes | None, mac: str | None = None
) -> tuple[Message, str | None, asyncio.StreamReader, asyncio.StreamWriter, Session]:
    """Do the agent's half of the handshake by hand (and send ``running`` when welcomed);
    return the center's verdict, the MAC that was sent and the agent's end of the session."""
    reader, writer = await open_raw(port)
    hello = Hello(agent=name, version="test", nonce=new_nonce())
    await send(writer, hello)
    msg = await read(reader)
    session = Session()
    if isinstance(msg, Challenge):
        transcript = Transcript(hello, hello.encode(), msg.nonce)
        if mac is None:
            assert secret is not None
            mac = agent_proof(secret, transcript)
        await send(writer, Response(mac=mac))
        msg = await read(reader)
        if secret is not None:
            session = Session.of_agent(secret, transcript)
    if isinstance(msg, Welcome):
        writer.write(session.frame(Running()))
        await writer.drain()
    return msg, mac, reader, writer, session


async def handshake(
    port: int, name: str, secret: bytes | None, mac: str | None = None
) -> tuple[Message, str | None, asyncio.StreamReader, asyncio.StreamWriter]:
    msg, mac, reader, writer, _ = await sealed_handshake(port, name, secret, mac)
    return msg, mac, reader, writer


# --- registration and authentication ---------------------------------------------------


def test_good_agent_registers_with_inventory_labels(tmp_path: Path) -> None:
    async def go() -> None:
        async with Fleet(tmp_path) as fleet:
            fleet.agent("a1", "--label", "team=spoofed", "--label", "os=linux")
            await fleet.connected("a1")
            [entry] = fleet.hub.snapshot()
            assert entry["name"] == "a1" and entry["declared"]
            assert entry["labels"] == {"team": "ops"}  # the inventory wins over the hello
            assert entry["peer"].startswith("127.0.0.1:")
            assert entry["tls"] is False and entry["running"] == []
            assert fleet.hub.executor_for("nobody") is None

    run(go())


def test_wrong_secret_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async with Fleet(tmp_path) as fleet:
            fleet.agent("a1", token="not-the-secret-0123456789abcdef")
            await until(lambda: "authentication failed" in fleet.log("a1"),
                        "the agent to log the refusal")
            assert not fleet.hub.is_connected("a1") and fleet.connects == []
            msg, *_ = await handshake(fleet.port, "a1", b"also-wrong")
            assert isinstance(msg, Refused) and "authentication failed" in msg.reason

    run(go())


def test_recorded_handshake_cannot_be_replayed(tmp_path: Path) -> None:
    async def go() -> None:
        async with Fleet(tmp_path) as fleet:
            msg, mac, _, writer = await handshake(fleet.port, "a1", SECRET.encode())
            assert isinstance(msg, Welcome)
            writer.close()
            await until(lambda: fleet.disconnects == ["a1"], "the first session to end")
            # The eavesdropper replays hello + the recorded response on a new connection:
            # the center's nonce is new, so the old MAC no longer fits.
            msg, _, reader, _ = await handshake(fleet.port, "a1", None, mac=mac)
            assert isinstance(msg, Refused) and "authentication failed" in msg.reason
            assert await closed_by_peer(reader)
            assert fleet.connects == ["a1"]

    run(go())


def test_per_agent_secret_cannot_register_as_another_agent(tmp_path: Path) -> None:
    async def go() -> None:
        secrets = Secrets(per_agent={"a1": b"secret-of-a1-0123456789abcdef",
                                     "b1": b"secret-of-b1-0123456789abcdef"})
        async with Fleet(tmp_path, agents=("a1", "b1"), secrets=secrets) as fleet:
            msg, *_ = await handshake(fleet.port, "b1", b"secret-of-a1-0123456789abcdef")
            assert isinstance(msg, Refused) and "authentication failed" in msg.reason
            # A's valid proof for its own name, presented under B's name, fails too.
            reader, writer = await open_raw(fleet.port)
            await send(writer, Hello(agent="b1", version="test", nonce=new_nonce()))
            challenge = await read(reader)
            assert isinstance(challenge, Challenge)
            as_a1 = Hello(agent="a1", version="test", nonce=new_nonce())
            proof = agent_proof(b"secret-of-a1-0123456789abcdef",
                                Transcript(as_a1, as_a1.encode(), challenge.nonce))
            await send(writer, Response(mac=proof))
            assert isinstance(await read(reader), Refused)
            fleet.agent("b1", token="secret-of-a1-0123456789abcdef")
            await until(lambda: "authentication failed" in fleet.log("b1"), "b1's refusal")
            msg, *_ = await handshake(fleet.port, "b1", b"secret-of-b1-0123456789abcdef")
            assert isinstance(msg, Welcome)
            await until(lambda: fleet.connects == ["b1"], "b1 to register")

    run(go())


def test_undeclared_agent_is_refused_unless_accepted(tmp_path: Path) -> None:
    async def go() -> None:
        async with Fleet(tmp_path) as fleet:
            fleet.agent("stranger")
            await until(lambda: "not declared" in fleet.log("stranger"), "the refusal")
            assert fleet.connects == []
            msg, *_ = await handshake(fleet.port, "local", SECRET.encode())
            assert isinstance(msg, Refused) and "reserved" in msg.reason
        async with Fleet(tmp_path, accept_undeclared=True) as fleet:
            fleet.agent("stranger", "--label", "dc=fra")
            await fleet.connected("stranger")
            assert fleet.hub.snapshot()[0]["labels"] == {"dc": "fra"}
            assert fleet.hub.snapshot()[0]["declared"] is False

    run(go())


def test_bad_frames_close_only_that_connection(tmp_path: Path) -> None:
    async def go() -> None:
        async with Fleet(tmp_path, agents=("a1", "a2"), handshake_timeout_s=0.5) as fleet:
            fleet.agent("a1")
            await fleet.connected("a1")

            # Not our protocol at all ("GET " reads as a 1.2 GB length).
            reader, writer = await open_raw(fleet.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await closed_by_peer(reader)
            # An oversized length, body never sent, connection kept open by us.
            reader, writer = await open_raw(fleet.port)
            writer.write(struct.pack(">I", 0xFFFFFFFF))
            assert await closed_by_peer(reader)
            # A truncated frame, then EOF.
            reader, writer = await open_raw(fleet.port)
            writer.write(struct.pack(">I", 100) + b'{"type":')
            writer.write_eof()
            assert await closed_by_peer(reader)
            # A truncated frame and silence: the handshake deadline closes it.
            reader, writer = await open_raw(fleet.port)
            writer.write(struct.pack(">I", 100) + b'{"type":')
            assert await closed_by_peer(reader)
            # Well framed, not JSON.
            reader, writer = await open_raw(fleet.port)
            writer.write(struct.pack(">I", 5) + b"hello")
            assert await closed_by_peer(reader)
            # Anything but a hello first.
            reader, writer = await open_raw(fleet.port)
            await send(writer, Response(mac="00"))
            assert await closed_by_peer(reader)

            # An authenticated agent that then sends garbage loses its own connection.
            msg, _, reader, writer = await handshake(fleet.port, "a2", SECRET.encode())
            assert isinstance(msg, Welcome)
            await fleet.connected("a2")
            writer.write(struct.pack(">I", 8) + b"\x80garbage")
            assert await closed_by_peer(reader)
            await until(lambda: "a2" in fleet.disconnects, "a2 to be dropped")
            msg, _, reader, writer = await handshake(fleet.port, "a2", SECRET.encode())
            assert isinstance(msg, Welcome)
            writer.write(struct.pack(">I", 50 * 1024 * 1024))
            assert await closed_by_peer(reader)

            # The hub still serves the good agent.
            assert fleet.hub.is_connected("a1") and "a1" not in fleet.disconnects
            handle = await fleet.start("a1", req("after-garbage", ("echo", "still here")))
            outcome = await asyncio.wait_for(handle.wait(), 5)
            assert outcome.status is RunStatus.SUCCEEDED
            assert outcome.output_tail == "still here\n"

    run(go())


# --- runs ------------------------------------------------------------------------------


def test_remote_run_outcome_arrives_once_and_run_id_runs_once(tmp_path: Path) -> None:
    counter = tmp_path / "count"

    async def go() -> None:
        async with Fleet(tmp_path) as fleet:
            fleet.agent("a1")
            await fleet.connected("a1")
            request = req("r-once", f"echo ran >> {counter}; echo hello; exit 4",
                          env=(("GREETING", "hi"),))
            handle = await fleet.start("a1", request)
            assert handle.pid is not None  # start() waited for the agent's "started"
            outcome = await asyncio.wait_for(handle.wait(), 5)
            assert outcome.status is RunStatus.FAILED and outcome.exit_code == 4
            assert outcome.output_tail == "hello\n"
            await until(lambda: fleet.outcomes, "on_outcome")
            [(run_id, agent, record)] = fleet.outcomes
            assert (run_id, agent) == ("r-once", "a1")
            assert record["status"] == "failed" and record["exit_code"] == 4
            assert record["started_at"] == iso(outcome.started_at.timestamp())  # as for a local run

            # Dispatched again (a center retrying after a reconnect): the agent does not
            # run it again, answers with the outcome it kept; on_outcome is not called twice.
            again = await fleet.start("a1", request)
            assert (await asyncio.wait_for(again.wait(), 5)).exit_code == 4
            assert counter.read_text() == "ran\n"
            assert len(fleet.outcomes) == 1

    run(go())


def test_agent_killed_mid_run_resolves_lost_after_the_lease(tmp_path: Path) -> None:
    async def go() -> None:
        async with Fleet(tmp_path, lease_s=1.0) as fleet:
            proc = fleet.agent("a1")
            await fleet.connected("a1")
            handle = await fleet.start("a1", req("r-lost", ("sleep", "30")))
            assert handle.pid is not None
            proc.kill()
            killed_at = time.monotonic()
            outcome = await asyncio.wait_for(handle.wait(), 6)
            assert outcome.status is RunStatus.LOST
            assert time.monotonic() - killed_at >= 0.9
            assert "a1" in (outcome.reason or "")
            assert fleet.outcomes == []  # "lost" is the center's verdict, not a delivery

            # Restarted, the agent finds the run in its journal without an outcome and
            # reports it itself (the center records it as superseding its own verdict).
            fleet.agent("a1")
            await until(lambda: fleet.outcomes, "the restarted agent's report")
            [(run_id, _, record)] = fleet.outcomes
            assert run_id == "r-lost" and record["status"] == "lost"
            assert "agent stopped during the run" in record["reason"]

    run(go())


def test_connection_cut_mid_run_outcome_delivered_after_reconnect_once(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    script = f"while [ ! -e {gate} ]; do sleep 0.02; done; echo done"

    async def go() -> None:
        async with Fleet(tmp_path, lease_s=10.0) as fleet:
            fleet.agent("a1")
            await fleet.connected("a1")
            handle = await fleet.start("a1", req("r-cut", script))
            assert handle.pid is not None

            # 1. Cut from the hub side while the run runs: the agent comes back listing it.
            assert await fleet.hub.disconnect("a1")
            await fleet.connected("a1", times=2)
            assert fleet.hub.snapshot()[0]["running"] == ["r-cut"]
            assert not handle.done

            # 2. Cut again and keep the agent away while the run ends: the outcome waits
            # in the agent's outbox.
            inventory = dict(fleet.hub.inventory)
            fleet.hub.update_inventory({})
            await until(lambda: not fleet.hub.is_connected("a1"), "a1 to be dropped")
            gate.touch()
            outbox = tmp_path / "state-a1" / "outbox.jsonl"
            await until(lambda: outbox.exists() and "r-cut" in outbox.read_text(),
                        "the outcome to reach the outbox")
            assert fleet.outcomes == [] and not handle.done

            # 3. Let it back in: delivered once, handle resolved with the real outcome.
            fleet.hub.update_inventory(inventory)
            outcome = await asyncio.wait_for(handle.wait(), 6)
            assert outcome.status is RunStatus.SUCCEEDED and outcome.output_tail == "done\n"
            await until(lambda: fleet.outcomes, "on_outcome")

            # 4. Once more around: an acked outcome is not delivered again.
            connects = fleet.connects.count("a1")
            await fleet.hub.disconnect("a1")
            await fleet.connected("a1", times=connects + 1)
            # The agent re-sends its unacked outcomes first thing in a session, before it
            # reads a run: a (wrong) redelivery of r-cut would arrive before r-after's outcome.
            after = await fleet.start("a1", req("r-after", ("true",)))
            assert (await asyncio.wait_for(after.wait(), 6)).status is RunStatus.SUCCEEDED
            await until(lambda: len(fleet.outcomes) >= 2, "on_outcome of r-after")
            assert [o[0] for o in fleet.outcomes] == ["r-cut", "r-after"]

    run(go())


def test_stop_reaches_the_agent(tmp_path: Path) -> None:
    async def go() -> None:
        async with Fleet(tmp_path) as fleet:
            fleet.agent("a1")
            await fleet.connected("a1")
            handle = await fleet.start("a1", req("r-stop", ("sleep", "30"), kill_grace_s=1.0))
            await asyncio.wait_for(handle.stop("replaced by a newer run", 1.0), 5)
            outcome = await handle.wait()
            assert outcome.status is RunStatus.KILLED
            assert outcome.reason == "replaced by a newer run"

    run(go())


def test_allow_run_as_is_enforced_on_the_agent(tmp_path: Path) -> None:
    async def go() -> None:
        async with Fleet(tmp_path, agents=("a1", "a2")) as fleet:
            fleet.agent("a1")
            fleet.agent("a2", "--allow-run-as", "nobody")
            await fleet.connected("a1")
            await fleet.connected("a2")
            handle = await fleet.start("a1", req("ra-1", ("id", "-un"), run_as="nobody"))
            outcome = await asyncio.wait_for(handle.wait(), 5)
            assert outcome.status is RunStatus.FAILED
            assert outcome.reason == "run_as nobody not allowed on this agent"

            handle = await fleet.start("a2", req("ra-2", ("id", "-un"), run_as="nobody"))
            outcome = await asyncio.wait_for(handle.wait(), 5)
            if os.geteuid() == 0:
                assert outcome.status is RunStatus.SUCCEEDED
                assert outcome.output_tail == "nobody\n"
            else:  # allowed by the policy, refused by the OS: a different reason
                assert "not allowed on this agent" not in (outcome.reason or "")

    run(go())


def test_daemon_restarts_after_a_crash_and_stops_when_removed(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    statuses: list[Any] = []

    async def go() -> None:
        async with Fleet(tmp_path, on_daemon_status=lambda n, s: statuses.append(s)) as fleet:
            fleet.agent("a1")
            await fleet.connected("a1")
            spec = DaemonSpec(name="worker", command=("sh", "-c", f"echo $$ >> {pids}; "
                                                      "sleep 0.2; exit 1"),
                              backoff_s=0.1, max_backoff_s=0.2)
            await fleet.hub.set_daemons("a1", [spec])
            await until(lambda: pids.exists() and len(pids.read_text().split()) >= 3,
                        "the daemon to crash and be restarted twice", timeout=8)
            assert len(set(pids.read_text().split())) >= 3  # new processes each time
            await until(lambda: any(s and s[0].restarts >= 1 for s in statuses),
                        "a daemon_status showing the restarts", timeout=4)
            assert fleet.hub.snapshot()[0]["daemons"][0]["name"] == "worker"

            await fleet.hub.set_daemons("a1", [])
            await until(lambda: statuses and statuses[-1] == (), "the daemon to be removed")
            count = len(pids.read_text().split())
            await asyncio.sleep(0.5)
            assert len(pids.read_text().split()) == count  # no restart after removal

    run(go())


def test_agent_state_survives_torn_lines_and_restarts(tmp_path: Path) -> None:
    async def go() -> None:
        state = AgentState(tmp_path)
        for run_id in ("done-acked", "done-pending", "cut-short"):
            await state.accept(Run(run_id=run_id, job="j", command=("true",)))
        now = datetime.now(UTC)
        for run_id in ("done-acked", "done-pending"):
            await state.store(Finished(run_id=run_id, status="succeeded", started_at=now,
                                       finished_at=now, exit_code=0))
        state.ack("done-acked")
        await state.outbox_log.append({"v": 1, "note": "flush"})
        state.close()
        with open(tmp_path / "journal.jsonl", "ab") as fh:
            fh.write(b'{"v": 1, "run_id": "torn')  # power loss in the middle of a line
        with open(tmp_path / "outbox.jsonl", "ab") as fh:
            fh.write(b'{"v": 1, "finished": {"run_')

        for _ in range(2):  # and once more: compaction must not resurrect anything
            state = AgentState(tmp_path)
            assert all(state.knows(r) for r in ("done-acked", "done-pending", "cut-short"))
            assert set(state.outbox) == {"done-pending", "cut-short"}
            assert state.outbox["cut-short"].status == "lost"
            assert state.outbox["done-pending"].status == "succeeded"
            state.close()

    run(go())


# --- heartbeats and TLS ----------------------------------------------------------------


def test_silent_connection_is_closed_within_three_heartbeats(tmp_path: Path) -> None:
    async def go() -> None:
        async with Fleet(tmp_path, heartbeat_s=0.3) as fleet:
            # A peer that authenticates and then never answers a ping (half-open link).
            msg, _, reader, _ = await handshake(fleet.port, "a1", SECRET.encode())
            assert isinstance(msg, Welcome)
            start = time.monotonic()
            await until(lambda: fleet.disconnects == ["a1"], "the silent link to be closed",
                        timeout=3)
            assert time.monotonic() - start <= 3.0  # 3 heartbeats + one check interval, loaded

    run(go())


def test_without_a_secret_the_hub_listens_on_loopback_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        fleet = Fleet(tmp_path, agents=("a1", "a2"), secrets=Secrets())
        fleet.hub.host = "0.0.0.0"
        async with fleet:
            assert fleet.hub.host == "127.0.0.1"
            assert "listening on 127.0.0.1 only" in caplog.text
            fleet.agent("a1", token=None)
            await fleet.connected("a1")
            # An agent that has a token insists on a center that proves it knows it.
            fleet.agent("a2", token=SECRET)
            await until(lambda: "did not authenticate" in fleet.log("a2"), "a2's refusal")
            assert not fleet.hub.is_connected("a2")

    with caplog.at_level("WARNING", logger="cronfile.agents"):
        run(go())


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        pytest.skip("openssl is not available to make a test certificate")
    return cert, key


def test_agent_over_tls_verifies_the_center(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))

    async def go() -> None:
        async with Fleet(tmp_path, ssl_context=context) as fleet:
            fleet.agent("a1", tls_ca=cert)
            await fleet.connected("a1")
            assert fleet.hub.snapshot()[0]["tls"] is True
            handle = await fleet.start("a1", req("tls-1", ("echo", "over tls")))
            assert (await asyncio.wait_for(handle.wait(), 5)).output_tail == "over tls\n"

    run(go())


def test_garbage_from_the_center_side_is_a_protocol_error() -> None:
    # The agent decodes with the same module: a center that sends junk is refused too.
    with pytest.raises(ProtocolError):
        Message.decode(b'{"type": "run", "v": 1, "run_id": "x", "job": "j", "command": 5}')


# --- attacks (issue 11) ----------------------------------------------------------------


class Relay:
    """An on-path attacker: a real TCP proxy between agents and the hub that passes every
    frame through untouched, remembers the center's frames and can inject its own."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.to_agent: list[asyncio.StreamWriter] = []
        self.center_frames: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Relay:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        for writer in self.to_agent:
            writer.transport.abort()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._relay(reader, writer))
        self.tasks.add(task)

    async def _relay(self, agent_r: asyncio.StreamReader, agent_w: asyncio.StreamWriter) -> None:
        center_r, center_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.to_agent.append(agent_w)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       keep: list[bytes] | None) -> None:
            with contextlib.suppress(Exception):
                while True:
                    header = await src.readexactly(4)
                    body = await src.readexactly(struct.unpack(">I", header)[0])
                    if keep is not None:
                        keep.append(header + body)
                    dst.write(header + body)  # one write per frame: injections land between
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(agent_r, center_w, None),
                             pump(center_r, agent_w, self.center_frames))

    def inject(self, frame: bytes) -> None:
        self.to_agent[-1].write(frame)


def test_relay_cannot_inject_or_replay_frames_after_a_real_handshake(tmp_path: Path) -> None:
    """Finding 1: the handshake passes through a real proxy, then the proxy injects a
    ``run`` frame (and, on the next session, replays a real frame of the center)."""
    marker = tmp_path / "pwned"

    async def go() -> None:
        async with Fleet(tmp_path, heartbeat_s=0.2) as fleet, Relay(fleet.port) as relay:
            proc = fleet.agent("a1", "--center", f"127.0.0.1:{relay.port}")
            await fleet.connected("a1")
            relay.inject(Run(run_id="evil-1", job="x",
                             command=("touch", str(marker))).frame())
            await until(lambda: "failed authentication" in fleet.log("a1"),
                        "the agent to refuse the injected frame")
            await fleet.connected("a1", times=2)  # it reconnects, through the relay again
            await until(lambda: len(relay.center_frames) > 5, "pings of the new session")
            relay.inject(relay.center_frames[-1])  # a genuine frame of this session, again
            await fleet.connected("a1", times=3)
            assert fleet.log("a1").count("failed authentication") >= 2
            assert not marker.exists() and proc.poll() is None
            # The agent still runs what the real center sends, through the same relay.
            handle = await fleet.start("a1", req("legit", ("echo", "ok")))
            assert (await asyncio.wait_for(handle.wait(), 5)).output_tail == "ok\n"

    run(go(), timeout=25)
    assert not marker.exists()


def test_old_protocol_agent_gets_a_clear_refusal_not_a_hang(tmp_path: Path) -> None:
    async def go() -> None:
        async with Fleet(tmp_path) as fleet:
            reader, writer = await open_raw(fleet.port)
            body = json.dumps({"type": "hello", "v": 1, "agent": "a1", "version": "0.1",
                               "nonce": new_nonce(), "running": []}).encode()
            writer.write(struct.pack(">I", len(body)) + body)
            header = await asyncio.wait_for(reader.readexactly(4), 5)
            reply = json.loads(await reader.readexactly(struct.unpack(">I", header)[0]))
            assert reply["type"] == "refused" and reply["v"] == 1
            assert "protocol version 1 is not supported" in reply["reason"]
            assert "speaks version 2" in reply["reason"]
            assert await closed_by_peer(reader)

    run(go())


def test_allow_run_as_covers_runs_without_run_as(tmp_path: Path) -> None:
    """Finding 2: ``--allow-run-as nobody`` ran a run without ``run_as`` as the agent's
    own user (root, usually)."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    other = "nobody" if me != "nobody" else "root"

    async def go() -> None:
        async with Fleet(tmp_path) as fleet:
            fleet.agent("a1", "--allow-run-as", other)
            await fleet.connected("a1")
            handle = await fleet.start("a1", req("no-run-as", ("id", "-un")))
            outcome = await asyncio.wait_for(handle.wait(), 5)
            assert outcome.status is RunStatus.FAILED
            assert outcome.output_tail == ""
            assert outcome.reason == (f"no run_as: the run would run as {me}, which is not "
                                      "allowed on this agent (--allow-run-as)")

    run(go())


def test_an_agent_cannot_forge_the_outcome_of_another_agents_run(tmp_path: Path) -> None:
    """Finding 3: a2, holding only its own secret, claims a1's run succeeded."""
    secrets = Secrets(per_agent={"a1": b"secret-of-a1-0123456789abcdef",
                                 "a2": b"secret-of-a2-0123456789abcdef"})

    async def go() -> None:
        async with Fleet(tmp_path, agents=("a1", "a2"), secrets=secrets) as fleet:
            fleet.agent("a1", token="secret-of-a1-0123456789abcdef")
            await fleet.connected("a1")
            handle = await fleet.start("a1", req("victim", "sleep 1; exit 7"))
            msg, _, reader, writer, session = await sealed_handshake(
                fleet.port, "a2", b"secret-of-a2-0123456789abcdef")
            assert isinstance(msg, Welcome)
            now = datetime.now(UTC)
            writer.write(session.frame(Finished(run_id="victim", status="succeeded",
                                                started_at=now, finished_at=now,
                                                exit_code=0)))
            await writer.drain()
            outcome = await asyncio.wait_for(handle.wait(), 6)
            assert (outcome.status, outcome.exit_code) == (RunStatus.FAILED, 7)
            assert [(r, a, o["status"]) for r, a, o in fleet.outcomes] == [
                ("victim", "a1", "failed")]

    run(go())


@pytest.fixture
def other_user() -> pwd.struct_passwd:
    return ensure_other_user()


def test_token_less_hub_refuses_another_local_user(tmp_path: Path, other_user: Any,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Finding 4: with no token, any local user could register as a declared agent."""
    script = (
        "import json, socket, struct, sys\n"
        "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
        "body = json.dumps({'type': 'hello', 'v': 2, 'agent': 'a1', 'version': 'x',"
        " 'nonce': '00' * 32}).encode()\n"
        "s.sendall(struct.pack('>I', len(body)) + body)\n"
        "n = struct.unpack('>I', s.recv(4))[0]\n"
        "print(json.loads(s.recv(n))['reason'] if n else '')\n"
    )

    async def go() -> None:
        async with Fleet(tmp_path, secrets=Secrets()) as fleet:
            result = await asyncio.to_thread(
                run_as, other_user, ["/usr/bin/python3", "-c", script, str(fleet.port)])
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == (
                f"the connection comes from uid {other_user.pw_uid}, not the center's user; "
                "without a --token-file only its own user's agents may connect")
            assert fleet.connects == []
            # The center's own user still connects without a token.
            fleet.agent("a1", token=None)
            await fleet.connected("a1")

    run(go())


def test_idle_sockets_cannot_lock_agents_out(tmp_path: Path) -> None:
    """Finding 9: at the handshake cap the OLDEST unauthenticated connection goes."""
    async def go() -> None:
        async with Fleet(tmp_path, max_handshakes=8, handshake_timeout_s=30) as fleet:
            idle = [await open_raw(fleet.port) for _ in range(8)]
            await asyncio.sleep(0)  # the hub has accepted them
            msg, *_ = await handshake(fleet.port, "a1", SECRET.encode())
            assert isinstance(msg, Welcome)
            await fleet.connected("a1")
            assert await closed_by_peer(idle[0][0], timeout=2)

    run(go())


def test_sockets_that_never_start_tls_are_timed_out(tmp_path: Path) -> None:
    """Finding 10: no ClientHello used to hold a descriptor for 60 s, uncapped."""
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))

    async def go() -> None:
        async with Fleet(tmp_path, ssl_context=context, handshake_timeout_s=0.5,
                         max_handshakes=4) as fleet:
            silent = [await open_raw(fleet.port) for _ in range(5)]
            assert await closed_by_peer(silent[0][0], timeout=1.5)  # evicted by the 5th
            assert all([await closed_by_peer(r, timeout=3) for r, _ in silent[1:]])
            fleet.agent("a1", tls_ca=cert)
            await fleet.connected("a1")

    run(go())


def test_pre_auth_hello_is_bounded_to_a_few_kib(tmp_path: Path) -> None:
    """Finding 14: a hello could announce 1 MiB before authentication."""
    async def go() -> None:
        async with Fleet(tmp_path, handshake_timeout_s=10) as fleet:
            reader, writer = await open_raw(fleet.port)
            writer.write(struct.pack(">I", MAX_PREAUTH_FRAME + 1) + b"{")
            assert await closed_by_peer(reader, timeout=2)

    run(go())


def test_wrong_macs_are_throttled_per_peer(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """Finding 13: thousands of wrong MACs per second were answered at full speed."""
    async def go() -> None:
        async with Fleet(tmp_path) as fleet:
            for _ in range(10):
                msg, *_ = await handshake(fleet.port, "a1", b"wrong-secret-0123456789abcdef")
                assert isinstance(msg, Refused) and "authentication failed" in msg.reason
            msg, *_ = await handshake(fleet.port, "a1", SECRET.encode())
            assert isinstance(msg, Refused)
            assert msg.reason == ("too many failed authentications from 127.0.0.1: "
                                  "wait and try again")
            assert "too many failed authentications; refusing them for 10s" in caplog.text

    run(go())


def test_a_lone_surrogate_mac_is_refused_without_a_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Finding 15: proofs_equal raised UnicodeEncodeError, logged with a traceback."""
    async def go() -> None:
        async with Fleet(tmp_path) as fleet:
            reader, writer = await open_raw(fleet.port)
            await send(writer, Hello(agent="a1", version="test", nonce=new_nonce()))
            assert isinstance(await read(reader), Challenge)
            body = b'{"type":"response","v":2,"mac":"\\ud800"}'  # JSON-escaped, as sent
            writer.write(struct.pack(">I", len(body)) + body)
            msg = await read(reader)
            assert isinstance(msg, Refused) and "authentication failed" in msg.reason

    run(go())
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info]


def test_token_less_agent_refuses_a_center_of_another_local_user(
        tmp_path: Path, other_user: Any) -> None:
    """The mirror of finding 4: while the real center is down, another local user listens
    on its port and sends runs to an agent that has no token."""
    marker = tmp_path / "pwned"
    fake_center = (
        "import json, socket, struct, sys\n"
        "srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen()\n"
        "print(srv.getsockname()[1], flush=True)\n"
        "def send(s, obj):\n"
        "    body = json.dumps(obj).encode(); s.sendall(struct.pack('>I', len(body)) + body)\n"
        "while True:\n"
        "    conn, _ = srv.accept()\n"
        "    try:\n"
        "        conn.recv(65536)\n"
        "        send(conn, {'type': 'welcome', 'v': 2, 'agent': 'a1', 'center': 'x',"
        " 'heartbeat_s': 10.0, 'proof': ''})\n"
        "        send(conn, {'type': 'run', 'v': 2, 'run_id': 'evil', 'job': 'x',"
        " 'command': ['touch', sys.argv[1]]})\n"
        "    except OSError:\n"
        "        pass\n"
        "    conn.close()\n"
    )

    async def go() -> None:
        async with Fleet(tmp_path, secrets=Secrets()) as fleet:
            proc = await asyncio.create_subprocess_exec(
                "/usr/bin/python3", "-c", fake_center, str(marker),
                stdout=asyncio.subprocess.PIPE, user=other_user.pw_uid,
                group=other_user.pw_gid, extra_groups=[], cwd="/")
            try:
                assert proc.stdout is not None
                port = int(await asyncio.wait_for(proc.stdout.readline(), 5))
                fleet.agent("a1", "--center", f"127.0.0.1:{port}", token=None)
                await until(lambda: f"runs as uid {other_user.pw_uid}" in fleet.log("a1"),
                            "the agent to refuse the other user's center")
                assert not marker.exists()
            finally:
                proc.kill()
                await proc.wait()

    run(go())
    assert not marker.exists()


def _client_cert(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
            check=True, capture_output=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        pytest.skip("openssl is not available to make a test certificate")
    return cert, key


def test_mutual_tls_binds_the_client_certificate_to_the_agent_name(tmp_path: Path) -> None:
    server_cert, server_key = _self_signed(tmp_path)
    a1_cert, a1_key = _client_cert(tmp_path, "a1")
    a2_cert, a2_key = _client_cert(tmp_path, "a2")
    clients = tmp_path / "clients.pem"
    clients.write_text(a1_cert.read_text() + a2_cert.read_text())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(server_cert), str(server_key))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(str(clients))

    def hello_over_tls(name: str, cert: Path, key: Path) -> Message:
        # A blocking client in a thread, which sends its ClientHello the moment it is
        # connected (the hub must not read a byte of it in plain before start_tls).
        client = ssl.create_default_context(cafile=str(server_cert))
        client.load_cert_chain(str(cert), str(key))
        with socket.create_connection(("127.0.0.1", fleet.port), timeout=5) as raw, \
                client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(Hello(agent=name, version="test", nonce=new_nonce()).frame())
            data = b""
            while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
                chunk = tls.recv(65536)
                assert chunk, "closed before a whole frame"
                data += chunk
            return Message.decode(data[4:4 + struct.unpack(">I", data[:4])[0]])

    async def go() -> None:
        async with Fleet(tmp_path, agents=("a1", "a2"), ssl_context=context) as f:
            nonlocal fleet
            fleet = f
            msg = await asyncio.to_thread(hello_over_tls, "a1", a2_cert, a2_key)
            assert isinstance(msg, Refused)
            assert msg.reason == "the client certificate is for a2, not for agent 'a1'"
            assert isinstance(await asyncio.to_thread(hello_over_tls, "a1", a1_cert, a1_key),
                              Challenge)
            f.agent("a1", "--tls-cert", str(a1_cert), "--tls-key", str(a1_key),
                    tls_ca=server_cert)
            await f.connected("a1")

    fleet: Any = None
    run(go())


def test_a_start_on_an_agent_that_just_left_is_host_unavailable(tmp_path: Path) -> None:
    """Routed while connected, gone when sent: the center records ``no_agent`` for that
    (issue 9, item 20), not a failed run with retries and notifications."""
    async def go() -> None:
        async with Fleet(tmp_path) as fleet:
            proc = fleet.agent("a1")
            await fleet.connected("a1")
            executor = fleet.hub.executor_for("a1")
            assert executor is not None
            proc.kill()
            await until(lambda: not fleet.hub.is_connected("a1"), "a1 to be gone")
            with pytest.raises(HostUnavailable, match="agent a1 is not connected"):
                await executor.start(req("r-gone", "true"))

    run(go())


def test_a_refused_agent_backs_off_exponentially_and_never_fast() -> None:
    """Issue 9, item 17: a refused agent (bad token, undeclared name) retried forever at a
    fast pace. Refusals double the wait, at least half of it each time, up to 5 minutes;
    ordinary reconnects keep their full jitter."""
    import random

    from cronfile.agent.daemon import REFUSED_BACKOFF_MAX_S, reconnect_delay

    rng = random.Random(9)
    for refused in range(1, 14):
        cap = min(REFUSED_BACKOFF_MAX_S, 0.5 * 2 ** refused)
        delays = [reconnect_delay(5, refused, 0.5, 2.0, rng) for _ in range(200)]
        assert min(delays) >= cap / 2 and max(delays) <= cap, (refused, min(delays), max(delays))
    assert reconnect_delay(0, 40, 0.5, 2.0, rng) <= REFUSED_BACKOFF_MAX_S
    ordinary = [reconnect_delay(5, 0, 0.5, 2.0, rng) for _ in range(200)]
    assert max(ordinary) <= 2.0 and min(ordinary) < 0.5
