"""The desired-state model: what the schedule files say, as frozen values.

Everything here is immutable and hashable, so two desired states can be compared field by
field (see :mod:`cronfile.schedules.diff`) and shared between the loader, the planner and the center
without defensive copies. Durations are seconds as ``float``; sizes are bytes as ``int``.
Source locations (``source``) are carried for messages but never take part in equality
checks that decide whether a job changed: moving a job to another file is no change.
"""

from __future__ import annotations

import bisect
import enum
import functools
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

MAPPING = {"mapping": True}
"""Field metadata: a tuple of (key, value) pairs that means a mapping (``env``, ``labels``)."""


class JobKind(enum.Enum):
    """What a job is."""

    CRON = "cron"
    """Runs at scheduled times (or on a trigger, or after other jobs) and then exits."""
    DAEMON = "daemon"
    """A long-running process kept alive on each target."""


class Concurrency(enum.Enum):
    """What to do when a slot comes while the previous run of the job is still running."""

    ALLOW = "allow"
    """Start the new run beside the old one."""
    FORBID = "forbid"
    """Skip the new slot and record it as ``skipped`` (the default, as in cron daemons)."""
    REPLACE = "replace"
    """Stop the running one (recorded ``killed``) and start the new one."""
    QUEUE = "queue"
    """Keep the new slot waiting and start it when the running one ends; at most one waits,
    a further slot meanwhile is recorded ``skipped`` (Temporal's BufferOne)."""


class CatchUp(enum.Enum):
    """What to do with slots that passed while the center was down."""

    NONE = "none"
    """Record them ``missed``; run nothing late."""
    LATEST = "latest"
    """Run the most recent missed slot once (systemd ``Persistent=true``)."""


class OnChange(enum.Enum):
    """What a reload does to a run in progress when its job changed."""

    LET_FINISH = "let_finish"
    """The run finishes under the old definition; new slots use the new one."""
    RESTART = "restart"
    """The run is stopped and the job follows its new definition at once."""


class Strategy(enum.Enum):
    """How a job's matching agents are chosen for one slot."""

    ONE = "one"
    """Round-robin over the connected matches."""
    ALL = "all"
    """Every match (broadcast)."""
    HASH = "hash"
    """A stable agent per job (rendezvous hashing over the matches)."""
    FAILOVER = "failover"
    """The first connected match, in declared order."""
    SHARD = "shard"
    """Every match, each told its index and the total."""


class Transport(enum.Enum):
    """How a run reaches its host."""

    AUTO = "auto"
    """The agent's TCP channel when connected, else SSH when the agent declares ``ssh:``."""
    TCP = "tcp"
    """Only the agent's TCP channel."""
    SSH = "ssh"
    """Only SSH."""


class RestartPolicyKind(enum.Enum):
    """When a daemon's process is started again after it exits."""

    ALWAYS = "always"
    """After every exit."""
    ON_FAILURE = "on-failure"
    """After a non-zero exit or a signal."""


class NotifyFormat(enum.Enum):
    """The body a ``notify.webhook`` POST carries: each chat service wants its own shape."""

    JSON = "json"
    """cronfile's own JSON object (kind, job, run fields): for your own receivers."""
    SLACK = "slack"
    """A Slack incoming webhook message: ``{"text": ...}`` (Slack refuses a body without it)."""
    TEAMS = "teams"
    """A Microsoft Teams incoming webhook MessageCard with ``text`` (and a summary)."""


class RunStatus(enum.Enum):
    """The final outcome of one slot on one target."""

    SUCCEEDED = "succeeded"
    """Exit code 0."""
    FAILED = "failed"
    """A non-zero exit code, a signal, or a command that could not start."""
    TIMEOUT = "timeout"
    """Stopped because it ran past ``timeout``."""
    KILLED = "killed"
    """Stopped on purpose: ``concurrency: replace``, a reload, or a shutdown."""
    LOST = "lost"
    """Dispatched, but its outcome never came back (center crash, agent gone past its lease)."""
    SKIPPED = "skipped"
    """Not started because the previous run was still running (``concurrency: forbid``, or
    ``queue`` with a slot already waiting)."""
    MISSED = "missed"
    """Not started within ``starting_deadline`` (or while the center was down)."""
    NO_AGENT = "no_agent"
    """No connected agent matched the job's targets."""


@dataclass(frozen=True, slots=True)
class Source:
    """Where a value was written: file (relative to the schedules directory) and 1-based line."""

    file: str
    line: int
    column: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class SecretRef:
    """An environment value resolved on the host that runs the job, never logged."""

    from_file: str | None = None
    from_env: str | None = None

    def describe(self) -> str:
        return f"from_file:{self.from_file}" if self.from_file else f"from_env:{self.from_env}"


EnvValue = str | SecretRef


@dataclass(frozen=True, slots=True)
class Retries:
    """Re-run a failed run up to ``max`` times, waiting ``backoff * factor**n`` between."""

    max: int = 0
    backoff_s: float = 30.0
    factor: float = 2.0
    retry_on_exit_codes: tuple[int, ...] | None = None

    def delay_before(self, attempt: int) -> float:
        """Seconds to wait before ``attempt`` (2 = the first retry)."""
        return self.backoff_s * self.factor ** max(0, attempt - 2)

    def wanted_after(self, status: RunStatus, attempt: int, exit_code: int | None) -> bool:
        """Whether a retry follows attempt ``attempt`` ending so (the scheduler queues the
        retry; notifications wait for the last attempt)."""
        return (status in (RunStatus.FAILED, RunStatus.TIMEOUT) and attempt <= self.max
                and (self.retry_on_exit_codes is None or exit_code in self.retry_on_exit_codes))


@dataclass(frozen=True, slots=True)
class Targets:
    """Where a job runs. No agents and no labels means the center's own host (``local``)."""

    agents: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = field(default=(), metadata=MAPPING)
    strategy: Strategy = Strategy.ONE
    transport: Transport = Transport.AUTO

    @property
    def is_local_only(self) -> bool:
        return not self.labels and self.agents in ((), ("local",))


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How a daemon is kept alive; the backoff doubles per crash up to ``max_backoff_s``."""

    policy: RestartPolicyKind = RestartPolicyKind.ALWAYS
    backoff_s: float = 5.0
    max_backoff_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Trigger:
    """Run on ``cronfile trigger EVENT``, optionally after a delay."""

    event: str
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Notify:
    """Where failures are reported."""

    webhook: str | None = None
    command: tuple[str, ...] | str | None = None
    when: tuple[str, ...] = ("failure",)
    format: NotifyFormat = NotifyFormat.JSON


@dataclass(frozen=True, slots=True)
class Expect:
    """What the center alerts on by itself."""

    max_runtime_s: float | None = None
    min_runtime_s: float | None = None
    success_within_s: float | None = None


@dataclass(frozen=True, slots=True)
class Active:
    """``active: {from, until}``: the job fires only at or after ``from_s`` and before
    ``until_s`` (epoch seconds; either may be open)."""

    from_s: float | None = None
    until_s: float | None = None

    def allows(self, ts: float) -> bool:
        return (self.from_s is None or ts >= self.from_s) and (self.until_s is None or ts < self.until_s)


@dataclass(frozen=True, slots=True)
class Calendar:
    """A named set of days and time windows on which the jobs that ``skip`` it do not run.

    ``dates`` are calendar days read in each job's own zone (a holiday is a local day);
    ``windows`` are ``[from, to)`` instants, the same for every job (they carry offsets)."""

    name: str
    dates: tuple[str, ...] = ()  # YYYY-MM-DD, sorted
    windows: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Pool:
    """A fleet-wide cap on the runs in flight of the jobs that name it (``pool:``).

    Resolved into each job by the loader, like calendars: a changed cap then changes the
    jobs of the pool, which is how ``plan`` shows it."""

    name: str
    max_running: int = 0


DEFAULT_POOL_WAIT_S = 3600.0
"""How long a run that finds its pool (or its agent) full waits when the job sets no
``starting_deadline``."""


@dataclass(frozen=True, slots=True)
class SkipIndex:
    """The calendars of a job as non-overlapping ``[start, end)`` instants with a reason each:
    asked for every slot of every job that skips a calendar, one bisect per slot."""

    starts: tuple[float, ...]
    ends: tuple[float, ...]
    reasons: tuple[str, ...]

    def why(self, ts: float) -> str | None:
        i = bisect.bisect_right(self.starts, ts) - 1
        return self.reasons[i] if i >= 0 and ts < self.ends[i] else None


@functools.lru_cache(maxsize=4096)  # jobs sharing calendars and a zone share one index
def skip_index(calendars: tuple[Calendar, ...], zone: str) -> SkipIndex:
    """Each date runs from the first instant whose local date it is (fold=0 midnight is
    exactly that, also when midnight is in a DST gap or repeat) to that of the next day.
    Where spans overlap, the earlier one gives the reason."""
    tz = ZoneInfo(zone)
    spans: list[tuple[float, float, str]] = []
    for calendar in calendars:
        for text in calendar.dates:
            day = date.fromisoformat(text)
            after = day + timedelta(days=1)
            spans.append((datetime(day.year, day.month, day.day, tzinfo=tz).timestamp(),
                          datetime(after.year, after.month, after.day, tzinfo=tz).timestamp(),
                          f"calendar {calendar.name}: {text} is one of its dates"))
        for start, end in calendar.windows:
            spans.append((start, end, f"calendar {calendar.name}: inside its window "
                                      f"{_iso(start)} - {_iso(end)}"))
    merged: list[tuple[float, float, str]] = []
    for start, end, why in sorted(spans, key=lambda span: span[0]):
        if merged and start < merged[-1][1]:
            start = merged[-1][1]  # the overlap belongs to the span before
        if start < end:
            merged.append((start, end, why))
    return SkipIndex(tuple(m[0] for m in merged), tuple(m[1] for m in merged),
                     tuple(m[2] for m in merged))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


DEFAULT_OUTPUT_KEEP = 64 * 1024
DEFAULT_KILL_GRACE_S = 10.0


@dataclass(frozen=True, slots=True)
class Job:
    """One job with its file's ``defaults`` applied."""

    name: str
    command: tuple[str, ...] | str
    schedules: tuple[str, ...] = ()
    run_at: float | None = None  # a one-shot job: fires once, at this instant
    trigger: Trigger | None = None
    after: tuple[str, ...] = ()
    kind: JobKind = JobKind.CRON
    replicas: int = 1
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    timezone: str = "UTC"
    env: tuple[tuple[str, EnvValue], ...] = field(default=(), metadata=MAPPING)
    workdir: str | None = None
    run_as: str | None = None
    timeout_s: float | None = None
    concurrency: Concurrency = Concurrency.FORBID
    starting_deadline_s: float | None = None
    catch_up: CatchUp = CatchUp.NONE
    jitter_s: float = 0.0
    retries: Retries = field(default_factory=Retries)
    targets: Targets = field(default_factory=Targets)
    suspend: bool = False
    notify: Notify | None = None
    output_keep: int = DEFAULT_OUTPUT_KEEP
    expect: Expect = field(default_factory=Expect)
    on_change: OnChange = OnChange.LET_FINISH
    active: Active | None = None
    skip: tuple[Calendar, ...] = ()  # resolved by the loader from the names written
    pool: Pool | None = None  # resolved by the loader from the name written
    description: str = ""
    owner: str = ""
    source: Source = field(default=Source("", 0), compare=False)

    def definition(self) -> dict[str, Any]:
        """The job's fields as plain data, without its source location (for diffs and JSON)."""
        return dict(to_plain(self))

    def skipped_because(self, ts: float) -> str | None:
        """Why the slot at ``ts`` is skipped by one of the job's calendars, or None."""
        return skip_index(self.skip, self.timezone).why(ts) if self.skip else None


@dataclass(frozen=True, slots=True)
class SshConfig:
    """How the center reaches an agent's host over SSH when the agent is not connected."""

    host: str
    port: int = 22
    user: str | None = None
    key: str | None = None
    known_hosts: str | None = None
    passphrase_file: str | None = None
    passphrase_env: str | None = None
    sudo: bool = True


@dataclass(frozen=True, slots=True)
class Agent:
    """A host in the inventory."""

    name: str
    labels: tuple[tuple[str, str], ...] = field(default=(), metadata=MAPPING)
    ssh: SshConfig | None = None
    source: Source = field(default=Source("", 0), compare=False)
    max_running: int | None = None  # never more runs at once on this host (None: no cap)

    def definition(self) -> dict[str, Any]:
        return dict(to_plain(self))


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """What the jobs of the files under ``path`` may do (SPEC §11). ``None`` = not restricted.

    ``path`` is normalised: ``""`` (every file) or a directory ending in ``/``."""

    path: str
    owners: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] | None = None  # ``targets.labels``
    local: bool | None = None
    run_as: tuple[str, ...] | None = None
    commands: tuple[str, ...] | None = None
    source: Source = field(default=Source("", 0), compare=False)

    def covers(self, relative: str) -> bool:
        """Whether the file ``relative`` (to the schedules directory) lies under ``path``."""
        return relative.startswith(self.path)

    @property
    def allows_local(self) -> bool:
        """``local: true`` allows the center's host; absent, it is allowed unless ``targets``
        restricts the agents (the center's host has no labels)."""
        return self.local if self.local is not None else self.labels is None


@dataclass(frozen=True, slots=True)
class Policy:
    """The ``policy:`` of a schedules directory: at most one, in any one file."""

    rules: tuple[PolicyRule, ...]
    source: Source = field(default=Source("", 0), compare=False)

    def rule_for(self, relative: str) -> PolicyRule | None:
        """The rule with the longest path that covers the file ``relative``."""
        best: PolicyRule | None = None
        for rule in self.rules:
            if rule.covers(relative) and (best is None or len(rule.path) > len(best.path)):
                best = rule
        return best


@dataclass(frozen=True, slots=True)
class Revision:
    """Which schedules a desired state came from."""

    content_hash: str
    git_commit: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"content_hash": self.content_hash, "git_commit": self.git_commit}


@dataclass(frozen=True, slots=True)
class DesiredState:
    """Every job and agent of a schedules directory, by name.

    ``sources`` names the schedule files the state was built from (file as the loader
    names it -> sha256 of its bytes), when it came from files: the center stores those
    files as its applied state instead of re-encoding every job (see
    :mod:`cronfile.state.applied`). They are not part of the value: two states with the same
    jobs and agents are equal."""

    jobs: dict[str, Job]
    agents: dict[str, Agent]
    revision: Revision
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    # The policy the jobs were checked against (not part of the value either), and the
    # schedules directory as the loader spelled it in ``source.file`` (``""`` when unknown):
    # what ``plan`` needs to say what a policy change allows or forbids.
    policy: Policy | None = field(default=None, compare=False, repr=False)
    root: str = field(default="", compare=False, repr=False)

    def __hash__(self) -> int:  # dicts inside: identity is the revision
        return hash(self.revision)


_FIELD_CACHE: dict[type, tuple[tuple[str, bool], ...]] = {}


def _compared_fields(cls: type) -> tuple[tuple[str, bool], ...]:
    """(name, is a mapping) for the fields that define a value (source locations excluded);
    cached per class because plans and diffs call this for every job."""
    names = _FIELD_CACHE.get(cls)
    if names is None:
        names = _FIELD_CACHE[cls] = tuple((f.name, bool(f.metadata.get("mapping")))
                                          for f in fields(cls) if f.compare)
    return names


def to_plain(value: Any) -> Any:
    """Turn model values into JSON-ready data (enums to values, dataclasses to dicts)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, SecretRef):
        return {"from_file": value.from_file} if value.from_file else {"from_env": value.from_env}
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain_field(getattr(value, name), mapping)
                for name, mapping in _compared_fields(type(value))}
    if isinstance(value, tuple):
        return [to_plain(v) for v in value]
    return value


def _plain_field(value: Any, mapping: bool) -> Any:
    """A field marked as a mapping (env, labels: stored as sorted pairs) is a dict, even
    when empty, so diffs and plans compare like with like."""
    return {k: to_plain(v) for k, v in value} if mapping else to_plain(value)
