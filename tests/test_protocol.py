"""The center <-> agent wire contract: framing, versions, validation, authentication."""

from __future__ import annotations

import asyncio
import json
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cronfile.schedules.model import RunStatus, SecretRef
from cronfile.transports.executor import RunOutcome, RunRequest
from cronfile.transports.protocol import (
    MAX_FRAME,
    MESSAGE_TYPES,
    Ack,
    Cancel,
    Challenge,
    Daemons,
    DaemonSpec,
    DaemonState,
    DaemonStatus,
    EnvVar,
    Finished,
    FrameTooLarge,
    Hello,
    Message,
    Ping,
    Pong,
    ProtocolError,
    Refused,
    Response,
    Run,
    Secrets,
    SecretsError,
    Started,
    UnsupportedVersion,
    Welcome,
    agent_proof,
    center_proof,
    load_secrets,
    new_nonce,
    read_frame,
    write_frame,
)

T0 = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
T1 = datetime(2026, 3, 29, 1, 30, 5, 250000, tzinfo=UTC)


def every_message() -> list[Message]:
    return [
        Hello(agent="web-1", version="0.1.0", nonce=new_nonce(), labels={"dc": "fra"},
              running=("r1", "r2"), pending_outcomes=3),
        Challenge(nonce=new_nonce()),
        Response(mac="ab" * 32),
        Welcome(agent="web-1", center="0.1.0", heartbeat_s=10.0, proof="cd" * 32,
                labels={"team": "billing"}),
        Refused(reason="authentication failed"),
        Run(run_id="nightly@2026-03-29T01:30:00Z#web-1#1", job="nightly",
            command=("/usr/bin/env", "ünïcode"),
            env=(EnvVar("PLAIN", value="1"), EnvVar("TOKEN", from_file="/etc/tok"),
                 EnvVar("KEY", from_env="API_KEY")),
            workdir="/srv", run_as="cron", timeout_s=90.0, kill_grace_s=5.0, output_keep=1024,
            scheduled_at=T0, attempt=2),
        Run(run_id="r2", job="shell", command="echo $HOME | tr a-z A-Z"),
        Started(run_id="r1", started_at=T0, pid=4242),
        Finished(run_id="r1", status="failed", started_at=T0, finished_at=T1, exit_code=3,
                 signal=None, output_tail="boom\n", reason=None),
        Finished(run_id="r3", status="killed", started_at=T0, finished_at=T1, signal=15,
                 reason="replaced"),
        Ack(run_id="r1"),
        Cancel(run_id="r1", reason="replace", grace_s=2.5),
        Ping(seq=7),
        Pong(seq=7),
        Daemons(revision="abc", daemons=(
            DaemonSpec(name="worker", command=("worker", "--serve"), replicas=2,
                       restart_policy="on-failure", backoff_s=1.0,
                       env=(EnvVar("X", value="y"),)),
        )),
        DaemonStatus(daemons=(
            DaemonState(name="worker", replica=0, state="running", pid=12, restarts=1,
                        last_exit_code=1, since=T0),
        )),
    ]


@pytest.mark.parametrize("msg", every_message(), ids=lambda m: m.TYPE)
def test_every_message_round_trips(msg: Message) -> None:
    body = msg.encode()
    data = json.loads(body)
    assert data["type"] == msg.TYPE and data["v"] == 1
    assert Message.decode(body) == msg
    assert type(msg).decode(body) == msg


def test_every_message_type_is_covered() -> None:
    assert {m.TYPE for m in every_message()} == set(MESSAGE_TYPES)


def test_run_carries_secret_references_not_values() -> None:
    request = RunRequest(
        run_id="r", job="j", command=("true",),
        env=(("A", "plain"), ("B", SecretRef(from_file="/etc/b")), ("C", SecretRef(from_env="C"))),
        scheduled_at=T0,
    )
    msg = Run.from_request(request)
    assert b"/etc/b" in msg.encode()
    assert Run.decode(msg.encode()).to_request() == request


def test_finished_round_trips_an_outcome() -> None:
    outcome = RunOutcome(RunStatus.TIMEOUT, T0, T1, signal=9, output_tail="x",
                         reason="timed out after 5s")
    msg = Finished.from_outcome("r", outcome)
    assert Finished.decode(msg.encode()).to_outcome() == outcome
    assert msg.outcome_dict()["duration_s"] == 5.25
    assert msg.outcome_dict()["status"] == "timeout"


def test_decode_on_a_subclass_insists_on_its_type() -> None:
    with pytest.raises(ProtocolError, match="expected a 'welcome'"):
        Welcome.decode(Ping(seq=1).encode())


@pytest.mark.parametrize("version", [0, 2, 99])
def test_unknown_version_is_refused_with_the_supported_ones(version: int) -> None:
    body = json.dumps({"type": "ping", "v": version, "seq": 1}).encode()
    with pytest.raises(UnsupportedVersion, match=rf"version {version} .*speaks 1"):
        Message.decode(body)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"", "empty"),
        (b"[1, 2]", "JSON object"),
        (b'"hello"', "JSON object"),
        (b"null", "JSON object"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "UTF-8"),
        (b'{"type": "ping", "seq": 1}', "version"),
        (b'{"type": "ping", "v": "1", "seq": 1}', "version"),
        (b'{"type": "ping", "v": true, "seq": 1}', "version"),
        (b'{"v": 1}', "unknown message type"),
        (b'{"type": "exec", "v": 1}', "unknown message type"),
        (b'{"type": ["ping"], "v": 1}', "unknown message type"),
        (b'{"type": "ping", "v": 1, "seq": "7"}', "integer"),
        (b'{"type": "ping", "v": 1, "seq": true}', "integer"),
        (b'{"type": "ping", "v": 1, "seq": 1.5}', "integer"),
        (b'{"type": "ping", "v": 1, "seq": NaN}', "NaN"),
        (b'{"type": "ping", "v": 1, "v": 1}', "duplicate"),
        (b'{"type": "ack", "v": 1}', "run_id: missing"),
        (b'{"type": "ack", "v": 1, "run_id": ""}', "run_id"),
        (b'{"type": "ack", "v": 1, "run_id": {"$gt": ""}}', "string"),
        (b'{"type": "hello", "v": 1, "agent": "a", "version": "1", "nonce": "00"}', "nonce"),
        (b'{"type": "run", "v": 1, "run_id": "r", "job": "j", "command": []}', "empty"),
        (b'{"type": "run", "v": 1, "run_id": "r", "job": "j", "command": [1]}', "command"),
        (b'{"type": "run", "v": 1, "run_id": "r", "job": "j", "command": "x",'
         b' "env": [{"name": "A"}]}', "exactly one"),
        (b'{"type": "run", "v": 1, "run_id": "r", "job": "j", "command": "x",'
         b' "scheduled_at": "yesterday"}', "ISO-8601"),
        (b'{"type": "run", "v": 1, "run_id": "r", "job": "j", "command": "x",'
         b' "scheduled_at": "2026-01-01T00:00:00"}', "offset"),
        (b'{"type": "finished", "v": 1, "run_id": "r", "status": "great",'
         b' "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:00Z"}',
         "status"),
        (b'{"type": "hello", "v": 1, "agent": "a", "version": "1", "nonce": "' + b"0" * 64
         + b'", "labels": {"a": 1}}', "string"),
        (b"[" * 200_000 + b"]" * 200_000, "nests too deeply|JSON object"),
    ],
)
def test_bad_frames_are_refused(body: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        Message.decode(body)


def test_unknown_fields_are_ignored_for_additive_evolution() -> None:
    body = json.dumps({"type": "ping", "v": 1, "seq": 3, "future_field": [1]}).encode()
    assert Message.decode(body) == Ping(seq=3)


def test_encoding_refuses_a_frame_above_the_limit() -> None:
    with pytest.raises(FrameTooLarge):
        Refused(reason="x" * (MAX_FRAME + 1)).frame()


class _Feed:
    """A StreamReader fed by hand, counting how much of it was consumed."""

    def __init__(self, data: bytes, eof: bool = True) -> None:
        self.reader = asyncio.StreamReader(limit=2 * MAX_FRAME)
        self.reader.feed_data(data)
        if eof:
            self.reader.feed_eof()


def test_read_frame_round_trip_through_a_stream() -> None:
    msgs = every_message()

    async def go() -> list[Message]:
        feed = _Feed(b"".join(m.frame() for m in msgs))
        return [await read_frame(feed.reader) for _ in msgs]

    assert asyncio.run(go()) == msgs


def test_oversized_length_is_refused_before_the_body_is_read() -> None:
    async def go() -> None:
        # Only the header arrives and the stream stays open: a reader that tried to read
        # the body would wait forever; the check must come first.
        feed = _Feed(struct.pack(">I", MAX_FRAME + 1), eof=False)
        with pytest.raises(FrameTooLarge, match="limit"):
            await asyncio.wait_for(read_frame(feed.reader), 2)
        feed2 = _Feed(struct.pack(">I", 0xFFFFFFFF), eof=False)
        with pytest.raises(FrameTooLarge):
            await asyncio.wait_for(read_frame(feed2.reader), 2)

    asyncio.run(go())


def test_a_frame_at_exactly_the_limit_is_read() -> None:
    async def go() -> Message:
        filler = MAX_FRAME - len(Refused(reason="").encode())
        msg = Refused(reason="r" * filler)
        assert len(msg.encode()) == MAX_FRAME
        return await read_frame(_Feed(msg.frame()).reader)

    assert isinstance(asyncio.run(go()), Refused)


def test_truncated_frame_is_an_incomplete_read() -> None:
    async def go() -> None:
        frame = Ping(seq=1).frame()
        with pytest.raises(asyncio.IncompleteReadError):
            await read_frame(_Feed(frame[:-3]).reader)
        with pytest.raises(asyncio.IncompleteReadError):
            await read_frame(_Feed(frame[:2]).reader)

    asyncio.run(go())


def test_write_frame_over_a_real_socket() -> None:
    async def go() -> Message:
        received: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.set_result(await read_frame(reader))
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await write_frame(writer, Cancel(run_id="r", reason="because"))
        msg = await asyncio.wait_for(received, 5)
        writer.close()
        server.close()
        return msg

    assert asyncio.run(go()) == Cancel(run_id="r", reason="because")


# --- authentication primitives ---------------------------------------------------------


def test_proofs_bind_secret_nonce_and_name() -> None:
    nonce = new_nonce()
    base = agent_proof(b"s", nonce, "a")
    assert agent_proof(b"s", nonce, "a") == base
    assert agent_proof(b"t", nonce, "a") != base
    assert agent_proof(b"s", new_nonce(), "a") != base
    assert agent_proof(b"s", nonce, "b") != base
    agent_nonce = new_nonce()
    assert center_proof(b"s", agent_nonce, nonce, "a") != base  # different context
    assert center_proof(b"s", agent_nonce, nonce, "a") != center_proof(
        b"s", new_nonce(), nonce, "a")


def test_nonces_are_fresh() -> None:
    assert len({new_nonce() for _ in range(100)}) == 100


def test_token_file_with_one_shared_secret(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("# the fleet's token\n\n  s3cret-value  \n")
    secrets = load_secrets(path)
    assert secrets == Secrets(shared=b"s3cret-value")
    assert secrets.for_agent("anyone") == b"s3cret-value"


def test_token_file_with_per_agent_lines(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# per agent\nweb-1 aaa\nweb-2 bbb\n* shared\n")
    secrets = load_secrets(path)
    assert secrets.for_agent("web-1") == b"aaa"
    assert secrets.for_agent("web-2") == b"bbb"
    assert secrets.for_agent("db-1") == b"shared"
    path.write_text("web-1 aaa\n")
    assert load_secrets(path).for_agent("web-2") is None


def test_token_directory(tmp_path: Path) -> None:
    (tmp_path / "web-1").write_text("aaa\n")
    (tmp_path / "web-2").write_text("bbb")
    secrets = load_secrets(tmp_path)
    assert secrets.for_agent("web-1") == b"aaa"
    assert secrets.for_agent("web-3") is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [("", "no secret"), ("# only a comment\n", "no secret"),
     ("a x\nb y z\n", ":2: expected"), ("a x\na y\n", "listed twice")],
)
def test_bad_token_files_name_the_line_not_the_secret(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(SecretsError, match=problem) as info:
        load_secrets(path)
    assert "x" not in str(info.value).replace(str(tmp_path), "").replace("expected", "")


def test_missing_token_file(tmp_path: Path) -> None:
    with pytest.raises(SecretsError, match="cannot read"):
        load_secrets(tmp_path / "nope")
