"""A job's environment, its secrets, and the output tail that must never show them.

One implementation for every transport (local runs, agents, SSH), so a job behaves the
same wherever it runs:

* **Names.** An environment variable name is ``[A-Za-z_][A-Za-z0-9_]*`` (what a POSIX shell
  can ``export``); anything else is refused before a process starts, on every transport.
* **The environment** of a job is a documented minimal base plus the job's ``env``, then the
  ``CRONFILE_*`` identity variables (last, so ``env`` cannot spoof its run id) — never the
  executor's whole environment, which holds the center's or agent's own credentials and
  the ``from_env`` secrets of every other job. The base (:func:`base_env`), as cron sets it:
  ``HOME``, ``USER``, ``LOGNAME`` of the user the job runs as, ``SHELL=/bin/sh``, ``PATH``
  (the executor's own ``PATH`` when the job runs as the executor's user, else
  :data:`RUN_AS_PATH`) and ``LANG`` when the executor has one.
* **Secrets** (``{from_file}``/``{from_env}``) are resolved at run time on the host that
  runs the command, as the user the job runs as: a file the job's user cannot read is
  refused (it is read by a child process with that user's ids, never with the executor's
  privileges), and ``from_env`` — the executor's own environment — is refused for a job
  that runs as another user. One trailing newline of a secret file is dropped.
* **Masking.** Secret values are masked as :data:`REDACTED` in the output tail and in every
  message; a multi-line secret is masked whole and line by line (each line of at least
  :data:`MIN_MASKED_LINE` characters), so printing one line of a key does not show it.
  Errors about secrets name the variable and the source, never a value.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from cronfile.schedules.model import EnvValue, SecretRef
from cronfile.transports.executor import RunRefused, RunRequest

REDACTED = "***"
RUN_AS_PATH = "/usr/local/bin:/usr/bin:/bin"
"""``PATH`` of a job that runs as another user than the executor's."""
MIN_MASKED_LINE = 4
"""Lines of a multi-line secret shorter than this are not masked on their own (they would
mask ordinary output: a lone ``}`` of a JSON key file)."""
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# --- masking ---------------------------------------------------------------------------


class Redactor:
    """Masks secret values, in text (messages) and in the output tail (bytes)."""

    def __init__(self, secrets: Iterable[bytes] = ()) -> None:
        pieces: set[bytes] = set()
        for secret in secrets:
            if not secret:
                continue
            pieces.add(secret)
            lines = secret.splitlines()
            if len(lines) > 1:
                pieces.update(line for line in (raw.strip() for raw in lines)
                              if len(line) >= MIN_MASKED_LINE)
        # Longest first, so a secret containing another is masked whole.
        self.secrets: tuple[bytes, ...] = tuple(sorted(pieces, key=len, reverse=True))

    @property
    def margin(self) -> int:
        """Extra bytes the tail must keep so a secret crossing the window's start is still seen."""
        return max((len(s) for s in self.secrets), default=1) - 1

    def text(self, message: str) -> str:
        for secret in self.secrets:
            message = message.replace(os.fsdecode(secret), REDACTED)
        return message

    def window(self, data: bytes, keep: int) -> bytes:
        """The last ``keep`` bytes of ``data`` with every secret touching them masked.

        Masking is done on the raw bytes *before* the cut, over ``keep + margin`` bytes: an
        occurrence that straddles the window's start is then fully visible and masked, so no
        prefix or suffix of a secret can survive at the edge of the tail.
        """
        start = max(0, len(data) - keep)
        out = bytearray()
        pos = start
        for s, e in _merge_spans(self._spans(data)):
            if e <= start:
                continue
            out += data[pos : max(s, start)]
            out += REDACTED.encode()
            pos = e
        out += data[pos:]
        return bytes(out)

    def _spans(self, data: bytes) -> Iterator[tuple[int, int]]:
        for secret in self.secrets:
            i = data.find(secret)
            while i >= 0:
                yield i, i + len(secret)
                i = data.find(secret, i + 1)


NO_SECRETS = Redactor()


def _merge_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if merged and s < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


class OutputTail:
    """A rolling window over the output stream: memory stays flat whatever the job writes."""

    def __init__(self, keep: int, margin: int = 0) -> None:
        self.keep = max(0, keep)
        self._cap = self.keep + max(0, margin) if self.keep else 0
        self._buf = bytearray()
        self.total = 0
        """Bytes seen in all, kept or not."""

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if not self._cap:
            return
        if len(chunk) >= self._cap:
            self._buf[:] = chunk[-self._cap :]
            return
        self._buf += chunk
        excess = len(self._buf) - self._cap
        if excess > 0:
            del self._buf[:excess]

    def text(self, redactor: Redactor) -> str:
        """The kept tail, secrets masked, as text; invalid UTF-8 becomes U+FFFD, never an error."""
        if not self.keep:
            return ""
        data = redactor.window(bytes(self._buf), self.keep)
        if self.total > self.keep:
            data = _skip_partial_char(data)
        return data.decode("utf-8", errors="replace")


def _skip_partial_char(data: bytes) -> bytes:
    """Drop the continuation bytes of a character cut in half by the window's start."""
    i = 0
    while i < min(3, len(data)) and 0x80 <= data[i] <= 0xBF:
        i += 1
    return data[i:]


# --- resolving secrets -----------------------------------------------------------------


def _strip_one_newline(data: bytes) -> bytes:
    """Files written by editors and ``echo`` end with a newline nobody means as part of a secret."""
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data


def _read_as_user(name: str, path: str, user: pwd.struct_passwd) -> bytes:
    """Read ``path`` with the ids of ``user`` (its uid, gid and groups), in a child process:
    the kernel then decides what that user may read, exactly as for the job itself."""
    try:
        groups = os.getgrouplist(user.pw_name, user.pw_gid)
    except OSError:
        groups = [user.pw_gid]
    try:
        done = subprocess.run(
            ["/bin/cat", "--", path], user=user.pw_uid, group=user.pw_gid,
            extra_groups=groups, cwd="/", env={"LC_ALL": "C", "PATH": RUN_AS_PATH},
            stdin=subprocess.DEVNULL, capture_output=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise RunRefused(
            f"secret for env {name}: cannot read file {path} as {user.pw_name}: "
            f"{getattr(exc, 'strerror', None) or type(exc).__name__}"
        ) from None
    if done.returncode != 0:
        error = done.stderr.decode(errors="replace")
        if "No such file" in error:
            why = "does not exist"
        elif "Is a directory" in error:
            why = "is a directory"
        elif "Permission denied" in error:
            why = f"is not readable by {user.pw_name}"
        else:
            why = "cannot be read"
        raise RunRefused(f"secret for env {name}: file {path} {why}")
    return done.stdout


def _read_secret_file(name: str, path: str, user: pwd.struct_passwd | None) -> bytes:
    if user is not None:
        return _read_as_user(name, path, user)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise RunRefused(f"secret for env {name}: file {path} does not exist") from None
    except IsADirectoryError:
        raise RunRefused(f"secret for env {name}: {path} is a directory") from None
    except OSError as exc:
        raise RunRefused(f"secret for env {name}: cannot read file {path}: {exc.strerror}") from None


def resolve_secret(
    name: str, ref: SecretRef, source_env: Mapping[str, str],
    switch_to: pwd.struct_passwd | None = None, where: str = "this host",
) -> str:
    """The secret's value; refusals name the variable and the source, never a value.

    ``switch_to``: the other user the job runs as, whose rights the file is read with and
    for whom the executor's environment is off limits.
    """
    if ref.from_file:
        return os.fsdecode(_strip_one_newline(_read_secret_file(name, ref.from_file, switch_to)))
    if ref.from_env:
        if switch_to is not None:
            raise RunRefused(
                f"secret for env {name}: from_env reads the executor's own environment, "
                f"which a job running as {switch_to.pw_name} may not use"
            )
        value = source_env.get(ref.from_env)
        if value is None:
            raise RunRefused(f"secret for env {name}: variable {ref.from_env} is not set on {where}")
        return value
    raise RunRefused(f"secret for env {name} names no source (from_file or from_env)")


def check_env_name(name: str) -> None:
    if not ENV_NAME.fullmatch(name):
        raise RunRefused(f"invalid environment variable name {name!r}")


def resolve_env(
    pairs: Iterable[tuple[str, EnvValue]], source_env: Mapping[str, str],
    switch_to: pwd.struct_passwd | None = None, where: str = "this host",
) -> tuple[dict[str, str], list[bytes]]:
    """The job's environment additions as plain strings, and the secret values among them."""
    env: dict[str, str] = {}
    secrets: list[bytes] = []
    for name, value in pairs:
        check_env_name(name)
        if isinstance(value, SecretRef):
            text = resolve_secret(name, value, source_env, switch_to, where)
            secrets.append(os.fsencode(text))
        else:
            text = str(value)
        if "\0" in text:  # exec would fail with a message we could not control
            raise RunRefused(f"environment variable {name}: value contains a NUL byte")
        env[name] = text
    return env, secrets


# --- the environment -------------------------------------------------------------------


def base_env(user: pwd.struct_passwd, source_env: Mapping[str, str], own_user: bool
             ) -> dict[str, str]:
    """The minimal environment every job starts from (see the module docstring)."""
    env = {
        "HOME": user.pw_dir,
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
        "SHELL": "/bin/sh",
        "PATH": source_env.get("PATH", RUN_AS_PATH) if own_user else RUN_AS_PATH,
    }
    if "LANG" in source_env:
        env["LANG"] = source_env["LANG"]
    return env


@lru_cache(maxsize=256)  # a burst's runs share their scheduled time
def _iso_utc(moment: datetime | None) -> str:
    """ISO-8601 in UTC with a ``Z``; a naive time is taken as UTC (never the host's zone)."""
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def cronfile_vars(request: RunRequest, state_dir: Path | None) -> dict[str, str]:
    """The ``CRONFILE_*`` identity of a run, applied after the job's own ``env``."""
    env = {
        "CRONFILE_JOB": request.job,
        "CRONFILE_RUN_ID": request.run_id,
        "CRONFILE_SCHEDULED_AT": _iso_utc(request.scheduled_at),
        "CRONFILE_ATTEMPT": str(request.attempt),
    }
    if state_dir is not None:
        env["CRONFILE_STATE_DIR"] = str(state_dir)
    return env
