"""The center <-> agent protocol, version 2. This module IS the contract.

Both sides import it; nothing else defines what travels on the wire. Change a message here
and you change the protocol: additive changes (a new optional field with a default) keep
``v: 2``; anything else needs a new version and both sides speaking it.

Transport
    One TCP connection per agent, opened BY THE AGENT to the center (agents never listen).
    Optionally wrapped in TLS (confidentiality; the agent verifies the center with a CA
    file; the center may require client certificates). With or without TLS, every frame
    after the handshake is authenticated with a key of that session (see *Sessions*), so
    an on-path relay that passes a real handshake through cannot inject, replay, reorder
    or alter a single frame afterwards. Without TLS frames are readable on the wire (job
    commands, output tails with secrets masked); secret values never travel at all.

Framing
    Every frame is a 4-byte big-endian unsigned length followed by that many bytes: UTF-8
    JSON, which must be ONE JSON object, and after the handshake a 32-byte MAC behind it
    (the length covers both). A length above :data:`MAX_FRAME` (1 MiB, plus the MAC) is
    refused before a single byte of the body is read; before authentication the limit is
    :data:`MAX_PREAUTH_FRAME` (a few KiB), so an unauthenticated peer cannot make the
    center buffer more than that. Empty frames, invalid UTF-8, invalid JSON,
    ``NaN``/``Infinity``, duplicate keys, nesting deeper than the decoder allows and
    anything that is not an object are protocol errors; a protocol error closes THAT
    connection and nothing else.

Messages
    Every object carries ``"type"`` (one of the names below) and ``"v": 2``. A frame with
    another ``v`` is refused with :class:`UnsupportedVersion`, whose message names the
    versions this side speaks; the center answers a ``hello`` of another version with a
    ``refused`` written in THAT version, so an old agent logs a clear reason instead of
    retrying blind. ``refused`` is the one message whose shape never changes: it is read
    whatever its ``v``. Field types are checked on decode (``int`` is never ``bool``,
    times are ISO-8601 with an offset); unknown fields are ignored so that optional fields
    can be added without a version bump. Nothing is ever evaluated or unpickled: decoding
    is :func:`json.loads` plus type checks.

    ==============  ==========  ======================================================
    type            direction   meaning
    ==============  ==========  ======================================================
    hello           agent ->    first frame: name, version, labels, outcomes waiting
                                in its outbox, a fresh agent nonce
    challenge       <- center   a fresh random 32-byte nonce (hex)
    response        agent ->    HMAC proving the agent knows its secret
    welcome         <- center   registered; heartbeat interval; the center's own proof
    refused         <- center   not registered, with the reason; the center closes
    running         agent ->    first sealed frame: the run_ids alive on the agent
    run             <- center   start one run (see :class:`Run`)
    started         agent ->    the run's process started (time, pid)
    finished        agent ->    the run ended (the outcome); re-sent until acked
    ack             <- center   the outcome of run_id is recorded; drop it from the outbox
    cancel          <- center   stop a run (SIGTERM to its group, SIGKILL after grace)
    ping / pong     both        heartbeat; the center pings, the agent answers
    daemons         <- center   the complete desired daemon set for this agent
    daemon_status   agent ->    the state of every supervised daemon replica
    role            <- center   HA only: whether this center leads, and its term
    stale_term      agent ->    HA only: an order was refused for its stale term
    ==============  ==========  ======================================================

Fencing (SPEC §9; additive, so still ``v: 2``)
    A center running with ``--ha`` puts its ``term`` (the fencing token of its lease) in
    every order: ``run``, ``cancel`` and ``daemons``. An agent that speaks fencing says so
    in its hello (``terms: true``); only to such an agent does an HA center send ``role``
    frames (sealed: the first frame after ``running``, then at every change of role or
    term; ``welcome.ha`` announces that one is coming) and only such an agent sends
    ``stale_term``. The agent persists the highest term it has seen (in an order or a
    ``role`` frame) before it acts on it, and refuses an order whose term is lower, or that
    carries none although its center announced ``ha``. An order without a term from a
    center that never announced ``ha`` (a center without ``--ha``, or an older one) is
    not fenced. Compatibility: an older agent ignores the ``term`` fields and never gets a
    ``role`` frame (so an HA center can use it, unfenced); a newer agent with an older
    center sees no ``ha`` and no terms, and works as before.

Authentication (before the center parses anything but the hello)
    1. agent -> ``hello`` with ``nonce`` = 32 fresh random bytes (hex).
    2. center -> ``challenge`` with ``nonce`` = 32 fresh random bytes (hex).
    3. agent -> ``response``: ``mac = HMAC-SHA256(secret, "cronfile/v2 agent" 0x00
       agent_nonce 0x00 center_nonce 0x00 agent_name 0x00 SHA-256(hello frame body))``
       (see :func:`agent_proof`).
    4. center compares with :func:`hmac.compare_digest`; on success it sends ``welcome``
       whose ``proof`` is the same HMAC under the context ``"cronfile/v2 center"``
       (:func:`center_proof`), which the agent checks before it accepts a single run, so a
       host that merely pretends to be the center cannot make agents run commands.
       Otherwise ``refused`` and the connection is closed.

    The secret never crosses the wire. A recorded handshake cannot be replayed, because
    both nonces are new on every connection. The agent's name is inside the MAC, so agent
    A's per-agent secret cannot register as B; and because the center proves itself with
    the secret of the agent it talks to, an agent host holding only its own secret cannot
    play center to the others. Use per-agent secrets (the default in the examples): with
    one secret shared by every agent, any agent host can impersonate the center.

Sessions (:class:`Session`)
    Right after ``welcome`` both sides derive two keys, one per direction:
    ``HMAC-SHA256(secret, "cronfile/v2 session" 0x00 direction 0x00 agent_nonce 0x00
    center_nonce 0x00 agent_name 0x00 SHA-256(hello frame body))`` with direction
    ``center->agent`` or ``agent->center``. Every later frame carries
    ``BLAKE2s(key=key, digest_size=32)(seq as 8 bytes big-endian || body)`` where ``seq``
    counts that direction's frames from 0. The receiver checks it before decoding: a frame from
    outside the session, a replayed or reordered one, or one altered on the way fails
    and closes the connection. ``welcome`` itself travels before the keys exist: its
    heartbeat interval and labels are hints (an on-path attacker could change them, at
    worst delaying the agent's detection of a dead link), never commands; its ``proof``
    is bound to the whole handshake. A center with no secret configured (loopback only, peers
    checked by user: see :mod:`cronfile.transports.hub`) skips steps 2-3, sends
    ``welcome`` with an empty proof and exchanges plain frames.

Secrets (:func:`load_secrets`)
    A token file holds either ONE shared secret (the only non-comment line), or one
    ``agent-name secret`` pair per line, where the name ``*`` is a secret for every agent
    without its own line. ``#`` starts a comment line; blank lines are ignored; surrounding
    whitespace is stripped; a secret is one word (no whitespace inside) of at least
    :data:`MIN_SECRET_BYTES` bytes of entropy, e.g. ``openssl rand -hex 32``. A token
    DIRECTORY holds one file per agent, named after the agent, containing its secret (a
    file named ``*`` is the shared one). An agent reads the same formats and picks its own
    secret (its line, else ``*``, else the only one). A token file (or directory) that
    other users may read is refused.

Limits
    :data:`MAX_FRAME` per frame; ``output_tail`` is cut by the agent to the run's
    ``output_keep``; run ids are at most :data:`MAX_ID` characters.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import secrets as _secrets
import struct
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cronfile.schedules.model import EnvValue, RunStatus, SecretRef
from cronfile.state.runrecord import outcome_fields
from cronfile.transports.executor import RunOutcome, RunRequest

PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (2,)
MAX_FRAME = 1024 * 1024
"""The largest frame body, in bytes, either side accepts."""
MAX_PREAUTH_FRAME = 8 * 1024
"""The largest frame the center reads before the peer is authenticated (hello, response)."""
MAC_BYTES = 32
"""The MAC behind every frame of an authenticated session."""
MIN_SECRET_BYTES = 16
"""The least entropy, in bytes, a secret from a token file must carry."""
MAX_ID = 256
"""The longest run id or agent name accepted on the wire."""
NONCE_BYTES = 32

_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame or message that breaks this contract. The connection that sent it is closed."""


class FrameTooLarge(ProtocolError):
    """The announced frame length is above the limit; the body was not read."""


class UnsupportedVersion(ProtocolError):
    """The message's ``v`` is not a version this side speaks."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version
        """The version the peer spoke, so a refusal can be written in it."""


class BadMac(ProtocolError):
    """A frame of a session whose MAC does not verify: injected, replayed, reordered or
    altered on the way."""


# --- the message framework -------------------------------------------------------------

_MESSAGES: dict[str, type[Message]] = {}
M = TypeVar("M", bound="Message")
_Decoder = Callable[[Any], Any]


class _BadField(Exception):
    """A value that does not fit its field; ``path`` grows while the error unwinds."""

    def __init__(self, problem: str, path: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.path = path

    def under(self, segment: str) -> _BadField:
        return _BadField(self.problem, segment + self.path)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# Decoding checks every value against its field's annotation. The checks are compiled
# once per annotation into closures, so a frame costs a few dict lookups per field and
# no typing introspection.


def _decode_str(value: Any) -> str:
    if not isinstance(value, str):
        raise _BadField(f"expected a string, got {_kind(value)}")
    return value


def _decode_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _BadField(f"expected a boolean, got {_kind(value)}")
    return value


def _decode_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadField(f"expected an integer, got {_kind(value)}")
    return value


def _decode_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadField(f"expected a number, got {_kind(value)}")
    if not math.isfinite(value):
        raise _BadField("expected a finite number")
    return float(value)


def _decode_none(value: Any) -> None:
    if value is not None:
        raise _BadField(f"expected null, got {_kind(value)}")


def _decode_datetime(value: Any) -> datetime:
    if not isinstance(value, str):
        raise _BadField(f"expected an ISO-8601 time, got {_kind(value)}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _BadField("expected an ISO-8601 time") from None
    if parsed.tzinfo is None:
        raise _BadField("expected an ISO-8601 time with an offset")
    return parsed


_SCALARS: dict[Any, _Decoder] = {
    str: _decode_str,
    bool: _decode_bool,
    int: _decode_int,
    float: _decode_float,
    type(None): _decode_none,
    datetime: _decode_datetime,
}
_DECODERS: dict[Any, _Decoder] = {}


def _decoder(tp: Any) -> _Decoder:
    """The checking decoder for the annotation ``tp`` (cached)."""
    decoder = _DECODERS.get(tp)
    if decoder is None:
        decoder = _DECODERS[tp] = _compile(tp)
    return decoder


def _compile(tp: Any) -> _Decoder:
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        alternatives = typing.get_args(tp)
        nullable = type(None) in alternatives
        options = [_decoder(a) for a in alternatives if a is not type(None)]

        def decode_union(value: Any) -> Any:
            if value is None and nullable:
                return None
            errors = []
            for option in options:
                try:
                    return option(value)
                except _BadField as exc:
                    errors.append(exc)
            if len(errors) == 1:  # "or null" is never the interesting part
                raise errors[0]
            raise _BadField(f"unexpected {_kind(value)}")

        return decode_union
    if origin is tuple:
        item = _decoder(typing.get_args(tp)[0])

        def decode_tuple(value: Any) -> tuple[Any, ...]:
            if not isinstance(value, list):
                raise _BadField(f"expected a list, got {_kind(value)}")
            result = []
            for i, v in enumerate(value):
                try:
                    result.append(item(v))
                except _BadField as exc:
                    raise exc.under(f"[{i}]") from None
            return tuple(result)

        return decode_tuple
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        key, val = _decoder(key_type), _decoder(value_type)

        def decode_dict(value: Any) -> dict[Any, Any]:
            if not isinstance(value, dict):
                raise _BadField(f"expected an object, got {_kind(value)}")
            result = {}
            for k, v in value.items():
                try:
                    result[key(k)] = val(v)
                except _BadField as exc:
                    raise exc.under(f".{k}") from None
            return result

        return decode_dict
    if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
        return _compile_dataclass(tp)
    raise TypeError(f"protocol field type {tp!r} is not supported")  # a bug in this module


def _compile_dataclass(cls: type) -> _Decoder:
    hints = typing.get_type_hints(cls)
    specs: list[tuple[str, _Decoder, bool]] = []
    for f in fields(cls):
        required = f.default is MISSING and f.default_factory is MISSING
        specs.append((f.name, _decoder(hints[f.name]), required))

    def decode_object(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _BadField(f"expected an object, got {_kind(value)}")
        kwargs: dict[str, Any] = {}
        for name, decode, required in specs:
            if name in value:
                try:
                    kwargs[name] = decode(value[name])
                except _BadField as exc:
                    raise exc.under(f".{name}") from None
            elif required:
                raise _BadField("missing", f".{name}")
        try:
            return cls(**kwargs)
        except ValueError as exc:  # __post_init__ checks
            raise _BadField(str(exc)) from None

    return decode_object


_PLAIN = (str, int, float, bool, type(None))
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


def _to_json(value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):
        return {name: _to_json(getattr(value, name)) for name in _field_names(type(value))}
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in object")
    return result


def _check_id(what: str, value: str) -> None:
    if not value or len(value) > MAX_ID or not value.isprintable():
        raise ValueError(f"{what} must be 1-{MAX_ID} printable characters")


@dataclass(frozen=True)
class Message:
    """Base of every message; subclasses set ``TYPE`` and are registered by it."""

    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            _MESSAGES[cls.TYPE] = cls

    def to_dict(self) -> dict[str, Any]:
        data = {"type": self.TYPE, "v": PROTOCOL_VERSION}
        for name in _field_names(type(self)):
            data[name] = _to_json(getattr(self, name))
        return data

    def encode(self) -> bytes:
        """The frame body: compact UTF-8 JSON."""
        body = json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)
        return body.encode("utf-8")

    def frame(self) -> bytes:
        """The whole frame: length header and body."""
        body = self.encode()
        if len(body) > MAX_FRAME:
            raise FrameTooLarge(f"{self.TYPE} message is {len(body)} bytes, above {MAX_FRAME}")
        return _HEADER.pack(len(body)) + body

    @classmethod
    def decode(cls: type[M], body: bytes) -> M:
        """Parse one frame body. On ``Message`` any type; on a subclass only that type."""
        msg = decode_message(body)
        if cls is not Message and not isinstance(msg, cls):
            raise ProtocolError(f"expected a {cls.TYPE!r} message, got {msg.TYPE!r}")
        return typing.cast(M, msg)


def decode_message(body: bytes) -> Message:
    """Parse and check one frame body; raise :class:`ProtocolError` on anything else."""
    if not body:
        raise ProtocolError("empty frame")
    if len(body) > MAX_FRAME:
        raise FrameTooLarge(f"frame of {len(body)} bytes is above the limit of {MAX_FRAME}")
    try:
        text = body.decode("utf-8")
        data = json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys
        )
    except UnicodeDecodeError:
        raise ProtocolError("frame is not valid UTF-8") from None
    except RecursionError:
        raise ProtocolError("frame nests too deeply") from None
    except ValueError as exc:
        raise ProtocolError(f"frame is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"frame must be a JSON object, got {_kind(data)}")
    version = data.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ProtocolError('message has no integer protocol version "v"')
    kind = data.get("type")
    if version not in SUPPORTED_VERSIONS and kind != Refused.TYPE:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise UnsupportedVersion(
            f"protocol version {version} is not supported (this side speaks {supported})",
            version,
        )
    cls = _MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    try:
        return typing.cast(Message, _decoder(cls)(data))
    except _BadField as exc:
        raise ProtocolError(f"bad {kind} message: {kind}{exc.path}: {exc.problem}") from None


async def read_body(reader: asyncio.StreamReader, max_frame: int = MAX_FRAME) -> bytes:
    """Read one frame's bytes (after the length header), checking the size first."""
    header = await reader.readexactly(_HEADER.size)
    (length,) = _HEADER.unpack(header)
    if length > max_frame:
        raise FrameTooLarge(f"frame of {length} bytes announced; the limit is {max_frame}")
    return await reader.readexactly(length)


async def read_frame(reader: asyncio.StreamReader, max_frame: int = MAX_FRAME) -> Message:
    """Read one plain (unsealed) frame and decode it.

    Raises :class:`asyncio.IncompleteReadError` when the peer closes (cleanly or mid-frame)
    and :class:`ProtocolError` for a frame that breaks the contract; the size check comes
    before the body is read.
    """
    return decode_message(await read_body(reader, max_frame))


async def write_frame(writer: asyncio.StreamWriter, msg: Message) -> None:
    """Write one frame (in a single write, so concurrent writers never interleave) and drain."""
    writer.write(msg.frame())
    await writer.drain()


def refusal_frame(reason: str, version: int) -> bytes:
    """A ``refused`` frame in protocol ``version``: what a peer speaking another version
    reads (the shape of ``refused`` never changes), so it can log why instead of hanging."""
    body = json.dumps({"type": "refused", "v": version, "reason": reason}).encode()
    return _HEADER.pack(len(body)) + body


# --- authentication --------------------------------------------------------------------

_AGENT_CONTEXT = b"cronfile/v2 agent"
_CENTER_CONTEXT = b"cronfile/v2 center"
_SESSION_CONTEXT = b"cronfile/v2 session"
_TO_AGENT = b"center->agent"
_TO_CENTER = b"agent->center"
_SEQ = struct.Struct(">Q")


def new_nonce() -> str:
    """A fresh random nonce, hex-encoded."""
    return _secrets.token_hex(NONCE_BYTES)


def _nonce_bytes(nonce: str) -> bytes:
    try:
        raw = bytes.fromhex(nonce)
    except ValueError:
        raise ProtocolError("nonce is not hex") from None
    if len(raw) != NONCE_BYTES:
        raise ProtocolError(f"nonce must be {NONCE_BYTES} bytes")
    return raw


@dataclass(frozen=True)
class Transcript:
    """What both proofs and both session keys are bound to: the hello exactly as sent
    (its bytes, so nothing in it can be changed on the way) and the center's nonce."""

    hello: Hello
    hello_body: bytes
    center_nonce: str

    def _mac(self, secret: bytes, *context: bytes) -> bytes:
        message = b"\0".join((
            *context,
            _nonce_bytes(self.hello.nonce),
            _nonce_bytes(self.center_nonce),
            self.hello.agent.encode(),
            hashlib.sha256(self.hello_body).digest(),
        ))
        return hmac.new(secret, message, hashlib.sha256).digest()


def agent_proof(secret: bytes, transcript: Transcript) -> str:
    """What the agent answers to a challenge."""
    return transcript._mac(secret, _AGENT_CONTEXT).hex()


def center_proof(secret: bytes, transcript: Transcript) -> str:
    """What the center puts in ``welcome``: proves to the agent that it knows the secret."""
    return transcript._mac(secret, _CENTER_CONTEXT).hex()


def proofs_equal(a: str, b: str) -> bool:
    """Constant-time comparison of two proofs; any string from the wire is safe to pass
    (a lone surrogate cannot be encoded strictly, so errors are passed through)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"),
                               b.encode("utf-8", "surrogatepass"))


def _frame_mac(key: bytes, seq: int, body: bytes) -> bytes:
    """BLAKE2s keyed with the session key (RFC 7693: keyed BLAKE2 is a MAC by design) over
    the sequence number and the body. Chosen over HMAC-SHA256 for the per-frame work: one
    pass instead of two, about 2 µs instead of 6 per frame, which shows on a busy link."""
    mac = hashlib.blake2s(_SEQ.pack(seq), key=key, digest_size=MAC_BYTES)
    mac.update(body)
    return mac.digest()


class Session:
    """Seals the frames one side sends and opens the frames it receives, for one connection.

    Without keys (a center with no secret, loopback only) frames are plain. With keys,
    the sequence numbers are implicit: both sides count, so a frame replayed, dropped or
    reordered by a relay has the wrong number inside its MAC and is refused.
    """

    def __init__(self, send_key: bytes | None = None, recv_key: bytes | None = None) -> None:
        self._send_key = send_key
        self._recv_key = recv_key
        self._send_seq = 0
        self._recv_seq = 0

    @classmethod
    def of_agent(cls, secret: bytes, transcript: Transcript) -> Session:
        """The agent's end: it sends agent->center and receives center->agent."""
        return cls(transcript._mac(secret, _SESSION_CONTEXT, _TO_CENTER),
                   transcript._mac(secret, _SESSION_CONTEXT, _TO_AGENT))

    @classmethod
    def of_center(cls, secret: bytes, transcript: Transcript) -> Session:
        return cls(transcript._mac(secret, _SESSION_CONTEXT, _TO_AGENT),
                   transcript._mac(secret, _SESSION_CONTEXT, _TO_CENTER))

    @property
    def sealed(self) -> bool:
        return self._send_key is not None

    def frame(self, msg: Message) -> bytes:
        """The whole frame of ``msg``, sealed with the next sequence number. Callers write
        frames in the order they were made (one synchronous write each)."""
        if self._send_key is None:
            return msg.frame()
        body = msg.encode()
        if len(body) > MAX_FRAME:
            raise FrameTooLarge(f"{msg.TYPE} message is {len(body)} bytes, above {MAX_FRAME}")
        tag = _frame_mac(self._send_key, self._send_seq, body)
        self._send_seq += 1
        return _HEADER.pack(len(body) + MAC_BYTES) + body + tag

    async def read(self, reader: asyncio.StreamReader, max_frame: int = MAX_FRAME) -> Message:
        """Read, verify and decode the next frame of the session."""
        if self._recv_key is None:
            return await read_frame(reader, max_frame)
        # read_body inlined: one coroutine less on the hottest path of the channel.
        (length,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        if length > max_frame + MAC_BYTES:
            raise FrameTooLarge(f"frame of {length} bytes announced; the limit is {max_frame}")
        data = await reader.readexactly(length)
        if len(data) <= MAC_BYTES:
            raise BadMac("frame too short to carry a MAC")
        body, tag = data[:-MAC_BYTES], data[-MAC_BYTES:]
        expected = _frame_mac(self._recv_key, self._recv_seq, body)
        if not hmac.compare_digest(expected, tag):
            raise BadMac(f"frame {self._recv_seq} of the session failed authentication "
                         "(injected, replayed, reordered or altered on the way)")
        self._recv_seq += 1
        return decode_message(body)


@dataclass(frozen=True)
class Secrets:
    """Agent secrets: one shared by all agents, and/or one per agent name."""

    shared: bytes | None = None
    per_agent: dict[str, bytes] = field(default_factory=dict)

    def for_agent(self, name: str) -> bytes | None:
        """The secret agent ``name`` must prove, or None (no secret: refuse it)."""
        return self.per_agent.get(name, self.shared)

    @property
    def empty(self) -> bool:
        return self.shared is None and not self.per_agent


class SecretsError(Exception):
    """A token file that cannot be used; the message names the file and line, never a secret."""


def load_secrets(path: Path) -> Secrets:
    """Read a token file or directory (formats: see the module docstring).

    Refused: a file or directory that other users may read (or write), and a secret
    weaker than :data:`MIN_SECRET_BYTES` bytes of entropy.
    """
    _check_private(path)
    if path.is_dir():
        per_agent: dict[str, bytes] = {}
        for entry in sorted(path.iterdir()):
            if entry.is_file() and not entry.name.startswith("."):
                _check_private(entry)
                token = _read_token_lines(entry)
                if len(token) != 1 or len(token[0][1].split()) != 1:
                    raise SecretsError(f"{entry}: expected one line holding the secret")
                per_agent[entry.name] = _strong(token[0][1], f"{entry}:{token[0][0]}")
        shared = per_agent.pop("*", None)
        return Secrets(shared=shared, per_agent=per_agent)
    lines = _read_token_lines(path)
    if not lines:
        raise SecretsError(f"{path}: no secret in the file")
    if len(lines) == 1 and len(lines[0][1].split()) == 1:
        return Secrets(shared=_strong(lines[0][1], f"{path}:{lines[0][0]}"))
    shared_secret: bytes | None = None
    mapping: dict[str, bytes] = {}
    for lineno, line in lines:
        parts = line.split()
        if len(parts) != 2:
            raise SecretsError(f"{path}:{lineno}: expected 'agent-name secret'")
        name, secret = parts
        if name in mapping or (name == "*" and shared_secret is not None):
            raise SecretsError(f"{path}:{lineno}: agent {name!r} is listed twice")
        if name == "*":
            shared_secret = _strong(secret, f"{path}:{lineno}")
        else:
            mapping[name] = _strong(secret, f"{path}:{lineno}")
    return Secrets(shared=shared_secret, per_agent=mapping)


def _check_private(path: Path) -> None:
    """Refuse a token file or directory other users can read: its secrets are theirs too."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SecretsError(f"{path}: cannot read the token file ({exc.strerror})") from None
    if mode & 0o077:
        raise SecretsError(
            f"{path}: other users may read it (mode {mode & 0o777:o}); run chmod "
            f"{'700' if path.is_dir() else '600'} {path}"
        )


_HEX = frozenset("0123456789abcdefABCDEF")
_BASE64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_")


def secret_entropy_bytes(secret: str) -> float:
    """A generous upper bound on the entropy of ``secret``, in bytes: 4 bits per hex
    digit, 6 per base64 character, 8 per byte otherwise; a secret of one repeated
    character has none. Enough to refuse ``abc`` and ``password``-length tokens."""
    if len(set(secret)) <= 2:
        return 0.0
    if set(secret) <= _HEX:
        return len(secret) / 2
    if set(secret) <= _BASE64:
        return len(secret) * 6 / 8
    return float(len(secret.encode()))


def _strong(secret: str, where: str) -> bytes:
    if secret_entropy_bytes(secret) < MIN_SECRET_BYTES:
        raise SecretsError(
            f"{where}: the secret is too weak (at least {MIN_SECRET_BYTES} random bytes, "
            "e.g. `openssl rand -hex 32`)"
        )
    return secret.encode()


def _read_token_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretsError(f"{path}: cannot read the token file ({type(exc).__name__})") from None
    result = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            result.append((lineno, line))
    return result


# --- the messages ----------------------------------------------------------------------


@dataclass(frozen=True)
class Hello(Message):
    """First frame of every connection, from the agent."""

    TYPE: ClassVar[str] = "hello"
    agent: str
    version: str
    nonce: str
    labels: dict[str, str] = field(default_factory=dict)
    pending_outcomes: int = 0
    """Outcomes in the agent's outbox, sent right after ``welcome``."""
    terms: bool = False
    """The agent checks terms (fencing): an HA center may send it ``role`` frames."""

    def __post_init__(self) -> None:
        _check_id("agent", self.agent)
        if not _is_hex_nonce(self.nonce):
            raise ValueError(f"nonce must be {NONCE_BYTES} bytes, hex-encoded")


def _is_hex_nonce(value: str) -> bool:
    try:
        return len(bytes.fromhex(value)) == NONCE_BYTES
    except ValueError:
        return False


@dataclass(frozen=True)
class Challenge(Message):
    TYPE: ClassVar[str] = "challenge"
    nonce: str

    def __post_init__(self) -> None:
        if not _is_hex_nonce(self.nonce):
            raise ValueError(f"nonce must be {NONCE_BYTES} bytes, hex-encoded")


@dataclass(frozen=True)
class Response(Message):
    TYPE: ClassVar[str] = "response"
    mac: str


@dataclass(frozen=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    agent: str
    center: str
    """The center's version."""
    heartbeat_s: float
    """The center pings this often; silence for three times as long means a dead link."""
    proof: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    """The labels the center uses for this agent (the inventory's, when declared)."""
    ha: bool = False
    """The center runs with ``--ha`` and will send a sealed ``role`` frame next (only to an
    agent whose hello said ``terms``). A hint, as the rest of ``welcome``: the ``role``
    frame and the terms in the orders are what the agent acts on."""


@dataclass(frozen=True)
class Refused(Message):
    TYPE: ClassVar[str] = "refused"
    reason: str


@dataclass(frozen=True)
class Running(Message):
    """The agent's first sealed frame: the run ids whose processes are alive on it now.

    Sent after authentication rather than in the hello, so the hello stays a few KiB
    however many runs an agent has."""

    TYPE: ClassVar[str] = "running"
    run_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: a literal ``value`` or a reference resolved on the agent."""

    name: str
    value: str | None = None
    from_file: str | None = None
    from_env: str | None = None

    def __post_init__(self) -> None:
        if not self.name or "=" in self.name or "\0" in self.name:
            raise ValueError(f"bad environment variable name {self.name!r}")
        if sum(v is not None for v in (self.value, self.from_file, self.from_env)) != 1:
            raise ValueError(f"env {self.name}: exactly one of value, from_file, from_env")

    @classmethod
    def of(cls, name: str, value: EnvValue) -> EnvVar:
        if isinstance(value, SecretRef):
            return cls(name, from_file=value.from_file, from_env=value.from_env)
        return cls(name, value=value)

    def to_env_value(self) -> EnvValue:
        if self.value is not None:
            return self.value
        return SecretRef(from_file=self.from_file, from_env=self.from_env)


@dataclass(frozen=True)
class Run(Message):
    """Start one run. Secret env values travel as references and are resolved on the agent."""

    TYPE: ClassVar[str] = "run"
    run_id: str
    job: str
    command: tuple[str, ...] | str
    env: tuple[EnvVar, ...] = ()
    workdir: str | None = None
    run_as: str | None = None
    timeout_s: float | None = None
    kill_grace_s: float = 10.0
    output_keep: int = 64 * 1024
    scheduled_at: datetime | None = None
    attempt: int = 1
    term: int | None = None
    """The sending HA center's term (fencing); None from a center without ``--ha``."""

    def __post_init__(self) -> None:
        _check_id("run_id", self.run_id)
        if isinstance(self.command, tuple) and not self.command:
            raise ValueError("command must not be empty")
        if self.output_keep < 0 or self.kill_grace_s < 0:
            raise ValueError("output_keep and kill_grace_s must not be negative")

    @classmethod
    def from_request(cls, request: RunRequest, term: int | None = None) -> Run:
        return cls(
            term=term,
            run_id=request.run_id,
            job=request.job,
            command=request.command,
            env=tuple(EnvVar.of(k, v) for k, v in request.env),
            workdir=request.workdir,
            run_as=request.run_as,
            timeout_s=request.timeout_s,
            kill_grace_s=request.kill_grace_s,
            output_keep=request.output_keep,
            scheduled_at=request.scheduled_at,
            attempt=request.attempt,
        )

    def to_request(self) -> RunRequest:
        return RunRequest(
            run_id=self.run_id,
            job=self.job,
            command=self.command,
            scheduled_at=self.scheduled_at,
            attempt=self.attempt,
            env=tuple((e.name, e.to_env_value()) for e in self.env),
            workdir=self.workdir,
            run_as=self.run_as,
            timeout_s=self.timeout_s,
            kill_grace_s=self.kill_grace_s,
            output_keep=self.output_keep,
        )


@dataclass(frozen=True)
class Started(Message):
    TYPE: ClassVar[str] = "started"
    run_id: str
    started_at: datetime
    pid: int | None = None

    def __post_init__(self) -> None:
        _check_id("run_id", self.run_id)


_STATUSES = frozenset(s.value for s in RunStatus)


@dataclass(frozen=True)
class Finished(Message):
    """A run's outcome. The agent re-sends it (after every reconnect) until it is acked."""

    TYPE: ClassVar[str] = "finished"
    run_id: str
    status: str
    started_at: datetime
    finished_at: datetime
    exit_code: int | None = None
    signal: int | None = None
    output_tail: str = ""
    reason: str | None = None

    def __post_init__(self) -> None:
        _check_id("run_id", self.run_id)
        if self.status not in _STATUSES:
            raise ValueError(f"unknown status {self.status!r}")

    @classmethod
    def from_outcome(cls, run_id: str, outcome: RunOutcome) -> Finished:
        return cls(
            run_id=run_id,
            status=outcome.status.value,
            started_at=outcome.started_at,
            finished_at=outcome.finished_at,
            exit_code=outcome.exit_code,
            signal=outcome.signal,
            output_tail=outcome.output_tail,
            reason=outcome.reason,
        )

    def to_outcome(self) -> RunOutcome:
        return RunOutcome(
            status=RunStatus(self.status),
            started_at=self.started_at,
            finished_at=self.finished_at,
            exit_code=self.exit_code,
            signal=self.signal,
            output_tail=self.output_tail,
            reason=self.reason,
        )

    def outcome_dict(self) -> dict[str, Any]:
        """The outcome as the fields of a ``finished`` record (§4), formatted exactly as
        for a local run (:func:`cronfile.state.runrecord.outcome_fields`)."""
        return outcome_fields(self.to_outcome())


@dataclass(frozen=True)
class Ack(Message):
    TYPE: ClassVar[str] = "ack"
    run_id: str

    def __post_init__(self) -> None:
        _check_id("run_id", self.run_id)


@dataclass(frozen=True)
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    run_id: str
    reason: str = "stopped"
    grace_s: float | None = None
    term: int | None = None
    """As in :class:`Run`."""

    def __post_init__(self) -> None:
        _check_id("run_id", self.run_id)


@dataclass(frozen=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    seq: int = 0


@dataclass(frozen=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    seq: int = 0


@dataclass(frozen=True)
class DaemonSpec:
    """One daemon job as the agent needs it; ``replicas`` processes are kept alive."""

    name: str
    command: tuple[str, ...] | str
    env: tuple[EnvVar, ...] = ()
    workdir: str | None = None
    run_as: str | None = None
    replicas: int = 1
    restart_policy: str = "always"
    """``always`` or ``on-failure``."""
    backoff_s: float = 5.0
    max_backoff_s: float = 300.0
    kill_grace_s: float = 10.0
    output_keep: int = 64 * 1024

    def __post_init__(self) -> None:
        _check_id("daemon name", self.name)
        if self.restart_policy not in ("always", "on-failure"):
            raise ValueError(f"unknown restart policy {self.restart_policy!r}")
        if self.replicas < 0:
            raise ValueError("replicas must not be negative")


@dataclass(frozen=True)
class Daemons(Message):
    """The complete desired daemon set: start new ones, stop missing ones, restart changed."""

    TYPE: ClassVar[str] = "daemons"
    daemons: tuple[DaemonSpec, ...] = ()
    revision: str = ""
    term: int | None = None
    """As in :class:`Run`."""


@dataclass(frozen=True)
class DaemonState:
    """One daemon replica as the agent sees it."""

    name: str
    replica: int
    state: str
    """``starting``, ``running``, ``backoff``, ``stopped``, ``refused`` ..."""
    pid: int | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    last_signal: int | None = None
    since: datetime | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return typing.cast(dict[str, Any], _to_json(self))


@dataclass(frozen=True)
class DaemonStatus(Message):
    TYPE: ClassVar[str] = "daemon_status"
    daemons: tuple[DaemonState, ...] = ()


@dataclass(frozen=True)
class Role(Message):
    """An HA center's role: whether it leads now, and its term (while it leads, the term it
    stamps on orders; while it stands by, the last term it saw in the lease). Sealed, so an
    agent may raise its highest term from it; it sends its outcomes to the center that
    leads with the highest term."""

    TYPE: ClassVar[str] = "role"
    leading: bool
    term: int | None = None


ORDERS = ("run", "cancel", "daemons")
"""The messages that make an agent act, and so carry a term from an HA center."""


@dataclass(frozen=True)
class StaleTerm(Message):
    """The agent refused an order because its term is lower than the highest it has seen
    (or it carries none from a center that announced ``ha``); nothing was done. The center
    records it as an ``agent_refused_stale_term`` event."""

    TYPE: ClassVar[str] = "stale_term"
    order: str
    """``run``, ``cancel`` or ``daemons``."""
    highest_term: int
    term: int | None = None
    """The term the order carried."""
    center: str = ""
    """The address (``HOST:PORT``) the refused order came from, as the agent dials it."""
    run_id: str | None = None
    job: str | None = None

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}")


MESSAGE_TYPES: dict[str, type[Message]] = dict(_MESSAGES)
"""Every message class by its ``type``."""
