"""The center <-> agent wire contract: framing, versions, validation, authentication."""

from __future__ import annotations

import asyncio
import json
import secrets as secrets_module
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
    BadMac,
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
    Role,
    Run,
    Running,
    Secrets,
    SecretsError,
    Session,
    StaleTerm,
    Started,
    Transcript,
    UnsupportedVersion,
    Welcome,
    agent_proof,
    center_proof,
    decode_message,
    load_secrets,
    new_nonce,
    proofs_equal,
    read_frame,
    refusal_frame,
    write_frame,
)

T0 = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
T1 = datetime(2026, 3, 29, 1, 30, 5, 250000, tzinfo=UTC)


def every_message() -> list[Message]:
    return [
        Hello(agent="web-1", version="0.1.0", nonce=new_nonce(), labels={"dc": "fra"},
              pending_outcomes=3),
        Running(run_ids=("r1", "r2")),
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
        Run(run_id="r4", job="fenced", command=("true",), term=7),
        Cancel(run_id="r4", term=7),
        Daemons(term=7),
        Role(leading=True, term=7),
        Role(leading=False),
        StaleTerm(order="run", highest_term=8, term=7, center="10.0.0.1:7070", run_id="r4",
                  job="fenced"),
        StaleTerm(order="daemons", highest_term=8),
    ]


@pytest.mark.parametrize("msg", every_message(), ids=lambda m: m.TYPE)
def test_every_message_round_trips(msg: Message) -> None:
    body = msg.encode()
    data = json.loads(body)
    assert data["type"] == msg.TYPE and data["v"] == 2
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


@pytest.mark.parametrize("version", [0, 1, 3, 99])
def test_unknown_version_is_refused_with_the_supported_ones(version: int) -> None:
    body = json.dumps({"type": "ping", "v": version, "seq": 1}).encode()
    with pytest.raises(UnsupportedVersion, match=rf"version {version} .*speaks 2"):
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
        (b'{"v": 2}', "unknown message type"),
        (b'{"type": "exec", "v": 2}', "unknown message type"),
        (b'{"type": ["ping"], "v": 2}', "unknown message type"),
        (b'{"type": "ping", "v": 2, "seq": "7"}', "integer"),
        (b'{"type": "ping", "v": 2, "seq": true}', "integer"),
        (b'{"type": "ping", "v": 2, "seq": 1.5}', "integer"),
        (b'{"type": "ping", "v": 2, "seq": NaN}', "NaN"),
        (b'{"type": "ping", "v": 2, "v": 2}', "duplicate"),
        (b'{"type": "ack", "v": 2}', "run_id: missing"),
        (b'{"type": "ack", "v": 2, "run_id": ""}', "run_id"),
        (b'{"type": "ack", "v": 2, "run_id": {"$gt": ""}}', "string"),
        (b'{"type": "hello", "v": 2, "agent": "a", "version": "1", "nonce": "00"}', "nonce"),
        (b'{"type": "run", "v": 2, "run_id": "r", "job": "j", "command": []}', "empty"),
        (b'{"type": "run", "v": 2, "run_id": "r", "job": "j", "command": [1]}', "command"),
        (b'{"type": "run", "v": 2, "run_id": "r", "job": "j", "command": "x",'
         b' "env": [{"name": "A"}]}', "exactly one"),
        (b'{"type": "run", "v": 2, "run_id": "r", "job": "j", "command": "x",'
         b' "scheduled_at": "yesterday"}', "ISO-8601"),
        (b'{"type": "run", "v": 2, "run_id": "r", "job": "j", "command": "x",'
         b' "scheduled_at": "2026-01-01T00:00:00"}', "offset"),
        (b'{"type": "finished", "v": 2, "run_id": "r", "status": "great",'
         b' "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:00Z"}',
         "status"),
        (b'{"type": "hello", "v": 2, "agent": "a", "version": "1", "nonce": "' + b"0" * 64
         + b'", "labels": {"a": 1}}', "string"),
        (b"[" * 200_000 + b"]" * 200_000, "nests too deeply|JSON object"),
    ],
)
def test_bad_frames_are_refused(body: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        Message.decode(body)


def test_unknown_fields_are_ignored_for_additive_evolution() -> None:
    body = json.dumps({"type": "ping", "v": 2, "seq": 3, "future_field": [1]}).encode()
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


def _transcript(secret_name: str = "a", hello_nonce: str | None = None,
                center_nonce: str | None = None, labels: dict[str, str] | None = None
                ) -> Transcript:
    hello = Hello(agent=secret_name, version="t", nonce=hello_nonce or new_nonce(),
                  labels=labels or {})
    return Transcript(hello, hello.encode(), center_nonce or new_nonce())


def test_proofs_bind_secret_both_nonces_name_and_the_hello() -> None:
    agent_nonce, nonce = new_nonce(), new_nonce()
    t = _transcript("a", agent_nonce, nonce)
    base = agent_proof(b"s", t)
    assert agent_proof(b"s", _transcript("a", agent_nonce, nonce)) == base
    assert agent_proof(b"t", t) != base
    assert agent_proof(b"s", _transcript("a", agent_nonce, new_nonce())) != base
    assert agent_proof(b"s", _transcript("a", new_nonce(), nonce)) != base
    assert agent_proof(b"s", _transcript("b", agent_nonce, nonce)) != base
    assert agent_proof(b"s", _transcript("a", agent_nonce, nonce, {"x": "y"})) != base
    assert center_proof(b"s", t) != base  # different context


def test_proofs_equal_survives_a_lone_surrogate() -> None:
    # Finding 15: a MAC of "\ud800" made compare_digest raise UnicodeEncodeError.
    assert proofs_equal("\ud800", "ab" * 32) is False
    assert proofs_equal("ab" * 32, "ab" * 32) is True


def test_session_frames_verify_in_order_and_refuse_injection_replay_reorder() -> None:
    t = _transcript()
    center, agent = Session.of_center(b"k" * 32, t), Session.of_agent(b"k" * 32, t)
    frames = [center.frame(Ping(seq=i)) for i in range(3)]

    async def read_all(session: Session, data: bytes, count: int) -> list[Message]:
        feed = _Feed(data)
        return [await session.read(feed.reader) for _ in range(count)]

    assert asyncio.run(read_all(agent, b"".join(frames), 3)) == [Ping(seq=i) for i in range(3)]
    # Injected: a plain frame, or one sealed with another session's key.
    for bad in (Ping(seq=9).frame(), Session.of_center(b"j" * 32, t).frame(Ping(seq=0))):
        with pytest.raises(BadMac):
            asyncio.run(read_all(Session.of_agent(b"k" * 32, t), bad, 1))
    # Replayed and reordered.
    with pytest.raises(BadMac):
        asyncio.run(read_all(Session.of_agent(b"k" * 32, t), frames[0] + frames[0], 2))
    with pytest.raises(BadMac):
        asyncio.run(read_all(Session.of_agent(b"k" * 32, t), frames[1], 1))
    # The agent's own frames are not valid in the other direction.
    echo = Session.of_agent(b"k" * 32, t).frame(Ping(seq=0))
    with pytest.raises(BadMac):
        asyncio.run(read_all(Session.of_agent(b"k" * 32, t), echo, 1))


def test_refused_is_read_whatever_its_version_and_names_the_version() -> None:
    async def read_refusal() -> Message:
        return await read_frame(_Feed(refusal_frame("upgrade", 1)).reader)

    assert asyncio.run(read_refusal()) == Refused(reason="upgrade")
    with pytest.raises(UnsupportedVersion) as info:
        decode_message(b'{"type":"hello","v":1,"agent":"a","version":"x","nonce":"00"}')
    assert info.value.version == 1


def test_nonces_are_fresh() -> None:
    assert len({new_nonce() for _ in range(100)}) == 100


S1, S2, S3 = (secrets_module.token_hex(16) for _ in range(3))


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_token_file_with_one_shared_secret(tmp_path: Path) -> None:
    path = _private(tmp_path / "token", f"# the fleet's token\n\n  {S1}  \n")
    secrets = load_secrets(path)
    assert secrets == Secrets(shared=S1.encode())
    assert secrets.for_agent("anyone") == S1.encode()


def test_token_file_with_per_agent_lines(tmp_path: Path) -> None:
    path = _private(tmp_path / "tokens", f"# per agent\nweb-1 {S1}\nweb-2 {S2}\n* {S3}\n")
    secrets = load_secrets(path)
    assert secrets.for_agent("web-1") == S1.encode()
    assert secrets.for_agent("web-2") == S2.encode()
    assert secrets.for_agent("db-1") == S3.encode()
    path.write_text(f"web-1 {S1}\n")
    assert load_secrets(path).for_agent("web-2") is None


def test_token_directory(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.mkdir(mode=0o700)
    _private(tokens / "web-1", f"{S1}\n")
    _private(tokens / "web-2", S2)
    secrets = load_secrets(tokens)
    assert secrets.for_agent("web-1") == S1.encode()
    assert secrets.for_agent("web-3") is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [("", "no secret"), ("# only a comment\n", "no secret"),
     (f"a {S1}\nb y z\n", ":2: expected"), (f"a {S1}\na {S2}\n", "listed twice"),
     ("abc\n", ":1: the secret is too weak"), (f"a {S1}\nb xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n",
                                             ":2: the secret is too weak"),
     ("0123456789abcdef\n", "too weak")],
    # fixed ids: the secrets are random per process, and every xdist worker must collect
    # the same test names (a secret has no place in a test name either)
    ids=["empty", "comment-only", "bad-line", "listed-twice", "weak", "weak-line-2", "weak-bare"],
)
def test_bad_token_files_name_the_line_not_the_secret(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = _private(tmp_path / "tokens", text)
    with pytest.raises(SecretsError, match=problem) as info:
        load_secrets(path)
    message = str(info.value)
    for secret in (S1, S2, "abc", "xxxx", "0123456789abcdef"):
        assert secret not in message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_token_file_other_users_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = _private(tmp_path / "token", S1)
    path.chmod(mode)
    with pytest.raises(SecretsError, match=f"mode {mode:o}.*chmod 600"):
        load_secrets(path)
    tokens = tmp_path / "dir"
    tokens.mkdir(mode=0o700)
    _private(tokens / "web-1", S1).chmod(mode)
    with pytest.raises(SecretsError, match="web-1: other users may read it"):
        load_secrets(tokens)


def test_missing_token_file(tmp_path: Path) -> None:
    with pytest.raises(SecretsError, match="cannot read"):
        load_secrets(tmp_path / "nope")
