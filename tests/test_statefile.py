"""applied.json: an exact round trip of the desired state, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cronfile.schedules.loader import load_schedules
from cronfile.schedules.model import (
    Active,
    Agent,
    Calendar,
    CatchUp,
    Concurrency,
    DesiredState,
    Expect,
    Job,
    JobKind,
    Notify,
    NotifyFormat,
    OnChange,
    Pool,
    RestartPolicy,
    RestartPolicyKind,
    Retries,
    Revision,
    SecretRef,
    Source,
    SshConfig,
    Strategy,
    Targets,
    Transport,
    Trigger,
)
from cronfile.state.applied import (
    APPLIED_FILE,
    StateFileError,
    read_applied,
    state_from_json,
    state_to_json,
    write_applied,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(REPO.glob("examples/*/schedules"))


def assert_same(a: DesiredState, b: DesiredState) -> None:
    """Equal including what ``==`` ignores (sources) and in the same order."""
    assert a.revision == b.revision
    assert list(a.jobs) == list(b.jobs) and list(a.agents) == list(b.agents)
    for name, job in a.jobs.items():
        other = b.jobs[name]
        assert job == other and job.source == other.source
        for f in fields(Job):  # types too: a float stays a float, a tuple a tuple
            assert type(getattr(job, f.name)) is type(getattr(other, f.name)), f.name
    for name, agent in a.agents.items():
        assert agent == b.agents[name] and agent.source == b.agents[name].source


def through_json(state: DesiredState) -> DesiredState:
    return state_from_json(json.loads(json.dumps(state_to_json(state))))


FULL_JOB = Job(
    name="every-field",
    command=("/usr/bin/env", "--", "backup", "--all"),
    schedules=("0 2 * * *", "*/10 * * * * *"),
    trigger=Trigger("deploy", 30.0),
    after=("upstream-a", "upstream-b"),
    kind=JobKind.DAEMON,
    replicas=3,
    restart=RestartPolicy(RestartPolicyKind.ON_FAILURE, 2.5, 60.0),
    timezone="Europe/Berlin",
    env=(("PGHOST", "db-1"), ("PGPASSWORD", SecretRef(from_file="/etc/pg.pass")),
         ("TOKEN", SecretRef(from_env="CI_TOKEN"))),
    workdir="/srv/backup",
    run_as="postgres",
    timeout_s=5400.0,
    concurrency=Concurrency.REPLACE,
    starting_deadline_s=120.0,
    catch_up=CatchUp.LATEST,
    jitter_s=15.0,
    retries=Retries(max=3, backoff_s=10.0, factor=1.5, retry_on_exit_codes=(75, 111)),
    targets=Targets(agents=("db-1", "db-2"), labels=(("dc", "fra"), ("role", "db")),
                    strategy=Strategy.FAILOVER, transport=Transport.SSH),
    suspend=True,
    notify=Notify(webhook="https://hooks.example.com/x", command=("/bin/page", "oncall"),
                  when=("failure", "missed", "recovered"), format=NotifyFormat.TEAMS),
    output_keep=1024 * 1024,
    expect=Expect(max_runtime_s=3600.0, min_runtime_s=5.0, success_within_s=93600.0),
    on_change=OnChange.RESTART,
    run_at=1798124400.0,
    active=Active(1796079600.0, 1799276400.0),
    skip=(Calendar("holidays", ("2026-12-25",), ((1798153200.0, 1798182000.0),)),),
    pool=Pool("db-heavy", 2),
    description="Every field set — ünïcode too",
    owner="team-data",
    source=Source("schedules/data.yaml", 12, 3),
)

FULL_AGENT = Agent(
    "db-1", (("dc", "fra"), ("role", "db")),
    SshConfig(host="db-1.internal", port=2222, user="cron", key="/k", known_hosts="/kh",
              passphrase_file="/pf", passphrase_env="PASS", sudo=False),
    Source("schedules/inventory.yaml", 4, 3),
    max_running=4,
)


def test_hand_built_job_sets_every_field() -> None:
    """Guards the test itself: a new model field must be given a non-default value here."""
    default = Job(name="x", command="x")
    for f in fields(Job):
        if f.name not in ("name", "command"):
            assert getattr(FULL_JOB, f.name) != getattr(default, f.name), f.name


def test_round_trip_of_every_field() -> None:
    state = DesiredState({FULL_JOB.name: FULL_JOB, "plain": Job("plain", "echo hi")},
                         {FULL_AGENT.name: FULL_AGENT, "bare": Agent("bare")},
                         Revision("sha256:0123456789abcdef", "a" * 40))
    assert_same(state, through_json(state))
    data = state_to_json(state)
    job = data["jobs"][0]
    # the format is readable and secret references stay references
    assert job["env"] == {"PGHOST": "db-1",
                          "PGPASSWORD": {"from_file": "/etc/pg.pass", "from_env": None},
                          "TOKEN": {"from_file": None, "from_env": "CI_TOKEN"}}
    assert job["kind"] == "daemon" and job["targets"]["labels"] == {"dc": "fra", "role": "db"}
    assert job["source"] == {"file": "schedules/data.yaml", "line": 12, "column": 3}
    assert data["jobs"][1]["command"] == "echo hi"


@pytest.mark.parametrize("schedules", EXAMPLES, ids=lambda p: p.parent.name)
def test_round_trip_of_examples(schedules: Path, tmp_path: Path) -> None:
    result = load_schedules(schedules)
    assert result.state is not None, [p.render() for p in result.problems]
    assert_same(result.state, through_json(result.state))
    write_applied(tmp_path, result.state)
    back = read_applied(tmp_path)
    assert back is not None
    assert_same(result.state, back)


def test_loaded_state_is_stored_as_its_files_bytes(tmp_path: Path) -> None:
    """What the center writes: the schedule files themselves (no per-job encoding), read
    back with the loader to the same jobs, sources and locations."""
    schedules = tmp_path / "schedules"
    (schedules / "team").mkdir(parents=True)
    text_a = ("apiVersion: cronfile/v1\n# a comment, kept\njobs:\n  backup:\n"
              "    description: Sicherung für München\n    schedule: \"0 2 * * *\"\n"
              "    command: [/usr/bin/backup, --all]\n")
    text_b = "apiVersion: cronfile/v1\njobs:\n  report: {schedule: \"@daily\", command: echo hi}\n"
    (schedules / "a.yaml").write_text(text_a, encoding="utf-8")
    (schedules / "team" / "b.yaml").write_text(text_b, encoding="utf-8")
    state = load_schedules(schedules).state
    assert state is not None
    path = write_applied(tmp_path / "state", state)
    data = json.loads(path.read_text())
    assert data["v"] == 2 and set(data) == {"v", "revision", "files"}
    assert [(f["file"], f["text"], f["sha256"]) for f in data["files"]] == [
        (str(schedules / "a.yaml"), text_a, hashlib.sha256(text_a.encode()).hexdigest()),
        (str(schedules / "team" / "b.yaml"), text_b, hashlib.sha256(text_b.encode()).hexdigest())]
    assert len(path.read_text().splitlines()) == 4  # one line per file, between head and tail
    back = read_applied(tmp_path / "state")
    assert back is not None
    assert_same(state, back)
    assert back.sources == state.sources
    assert back.jobs["backup"].source == Source(str(schedules / "a.yaml"), 4, 3)


def test_a_file_changed_since_it_was_applied_is_copied_from_the_previous_file(tmp_path: Path) -> None:
    """The state holds digests, not bytes: a file edited on disk after it was applied (the
    edit may yet be rejected) is taken from the previous applied.json, matched by digest."""
    schedules, state_dir = tmp_path / "schedules", tmp_path / "state"
    schedules.mkdir()
    applied_text = "apiVersion: cronfile/v1\njobs:\n  a: {schedule: \"@daily\", command: x}\n"
    (schedules / "a.yaml").write_text(applied_text)
    (schedules / "b.yaml").write_text(
        "apiVersion: cronfile/v1\njobs:\n  b: {schedule: \"@daily\", command: y}\n")
    first = load_schedules(schedules).state
    assert first is not None
    write_applied(state_dir, first)
    (schedules / "a.yaml").write_text("apiVersion: cronfile/v1\njobs:\n  a: {schedule: nope}\n")
    write_applied(state_dir, first)  # again, e.g. after a restart kept this revision
    back = read_applied(state_dir)
    assert back is not None
    assert_same(first, back)
    entries = json.loads((state_dir / APPLIED_FILE).read_text())["files"]
    assert entries[0]["text"] == applied_text

    # Changed on disk and no copy anywhere: refused, and no temporary file is left behind.
    os.unlink(state_dir / APPLIED_FILE)
    with pytest.raises(StateFileError, match=r"a\.yaml changed on disk since it was applied"):
        write_applied(state_dir, first)
    assert sorted(p.name for p in state_dir.iterdir()) == []


def test_examples_present_or_skipped() -> None:
    if not EXAMPLES:
        pytest.skip("no examples/*/schedules yet")
    assert all(p.is_dir() for p in EXAMPLES)


# --------------------------------------------------------------------------- hypothesis

text = st.text(max_size=12)
names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
seconds = st.floats(min_value=0, max_value=1e7, allow_nan=False)
maybe_seconds = st.none() | seconds
pairs = st.dictionaries(text, text, max_size=3).map(lambda d: tuple(d.items()))
secret = st.builds(SecretRef, from_file=st.none() | text, from_env=st.none() | text)
env = st.dictionaries(text, text | secret, max_size=4).map(lambda d: tuple(d.items()))
command = st.lists(text, min_size=1, max_size=4).map(tuple) | text
sources = st.builds(Source, file=text, line=st.integers(0, 10**6), column=st.integers(1, 500))

jobs = st.builds(
    Job,
    name=names,
    command=command,
    schedules=st.lists(text, max_size=3).map(tuple),
    trigger=st.none() | st.builds(Trigger, event=text, delay_s=seconds),
    after=st.lists(names, max_size=3).map(tuple),
    kind=st.sampled_from(JobKind),
    replicas=st.integers(1, 100),
    restart=st.builds(RestartPolicy, policy=st.sampled_from(RestartPolicyKind),
                      backoff_s=seconds, max_backoff_s=seconds),
    timezone=text,
    env=env,
    workdir=st.none() | text,
    run_as=st.none() | text,
    timeout_s=maybe_seconds,
    concurrency=st.sampled_from(Concurrency),
    starting_deadline_s=maybe_seconds,
    catch_up=st.sampled_from(CatchUp),
    jitter_s=seconds,
    retries=st.builds(Retries, max=st.integers(0, 100), backoff_s=seconds, factor=seconds,
                      retry_on_exit_codes=st.none() | st.lists(st.integers(0, 255)).map(tuple)),
    targets=st.builds(Targets, agents=st.lists(names, max_size=3).map(tuple), labels=pairs,
                      strategy=st.sampled_from(Strategy), transport=st.sampled_from(Transport)),
    suspend=st.booleans(),
    notify=st.none() | st.builds(Notify, webhook=st.none() | text,
                                 command=st.none() | command,
                                 when=st.lists(text, max_size=3).map(tuple),
                                 format=st.sampled_from(NotifyFormat)),
    output_keep=st.integers(0, 2**40),
    expect=st.builds(Expect, max_runtime_s=maybe_seconds, min_runtime_s=maybe_seconds,
                     success_within_s=maybe_seconds),
    on_change=st.sampled_from(OnChange),
    description=text,
    owner=text,
    source=sources,
)
agents = st.builds(
    Agent, name=names, labels=pairs,
    ssh=st.none() | st.builds(SshConfig, host=text, port=st.integers(1, 65535),
                              user=st.none() | text, key=st.none() | text,
                              known_hosts=st.none() | text, passphrase_file=st.none() | text,
                              passphrase_env=st.none() | text, sudo=st.booleans()),
    source=sources,
)
states = st.builds(
    DesiredState,
    jobs=st.lists(jobs, max_size=4, unique_by=lambda j: j.name).map(
        lambda js: {j.name: j for j in js}),
    agents=st.lists(agents, max_size=3, unique_by=lambda a: a.name).map(
        lambda ags: {a.name: a for a in ags}),
    revision=st.builds(Revision, content_hash=text, git_commit=st.none() | text),
)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states)
def test_round_trip_property(state: DesiredState) -> None:
    assert_same(state, through_json(state))


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(states)
def test_round_trip_through_the_file(tmp_path: Path, state: DesiredState) -> None:
    write_applied(tmp_path, state)
    back = read_applied(tmp_path)
    assert back is not None
    assert_same(state, back)


# --------------------------------------------------------------------------- the file


def test_missing_file_is_none(tmp_path: Path) -> None:
    assert read_applied(tmp_path) is None
    assert read_applied(tmp_path / "not-created") is None


def test_write_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    one = DesiredState({"a": Job("a", "true")}, {}, Revision("sha256:1"))
    two = DesiredState({"b": Job("b", "true")}, {}, Revision("sha256:2"))
    path = write_applied(state_dir, one)
    assert path == state_dir / APPLIED_FILE
    write_applied(state_dir, two)
    assert sorted(p.name for p in state_dir.iterdir()) == [APPLIED_FILE]
    back = read_applied(state_dir)
    assert back is not None and list(back.jobs) == ["b"]
    assert json.loads(path.read_text())["v"] == 1


def test_unencodable_state_fails_before_touching_the_file(tmp_path: Path) -> None:
    good = DesiredState({"a": Job("a", "true")}, {}, Revision("sha256:1"))
    write_applied(tmp_path, good)
    bad = DesiredState({"a": Job("a", "true", timeout_s=float("nan"))}, {}, Revision("x"))
    with pytest.raises(ValueError):
        write_applied(tmp_path, bad)
    assert read_applied(tmp_path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [APPLIED_FILE]


def _v2(*files: tuple[str, str], digest: str | None = None) -> str:
    """A "v": 2 applied.json holding ``files`` (name, text)."""
    entries = [{"file": f, "text": t, "sha256": digest or hashlib.sha256(t.encode()).hexdigest()}
               for f, t in files]
    return json.dumps({"v": 2, "revision": {"content_hash": "x"}, "files": entries})


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ('{"v": 3, "revision": {"content_hash": "x"}}', "format version 3 is not supported"),
    ('{"v": 2, "revision": {"content_hash": "x"}, "files": [{"file": "a.yaml"}]}',
     'files[0]: expected {"file": ..., "sha256": ..., "text": ...}'),
    (_v2(("a.yaml", "apiVersion: cronfile/v1\njobs:\n  a: {schedule: nope, command: x}\n")),
     "files[0] (a.yaml) no longer loads: a.yaml:3:"),
    (_v2(("a.yaml", 'apiVersion: cronfile/v1\njobs:\n  a: {schedule: "@daily", command: x}\n'),
         ("b.yaml", 'apiVersion: cronfile/v1\njobs:\n  a: {schedule: "@daily", command: y}\n')),
     "files[1]: job 'a' appears twice"),
    (_v2(("a.yaml", "apiVersion: cronfile/v1\n"), digest="0" * 64),
     "files[0] (a.yaml): its text does not match its sha256"),
    ('{"v": 1, "revision": {"content_hash": "x"}, "jobs": [{"name": "a"}]}',
     "jobs[0]: missing 'command'"),
    ('{"v": 1, "revision": {"content_hash": "x"}, "jobs": [{"name": "a", "command": "x", '
     '"kind": "sometimes"}]}', "jobs[0].kind: 'sometimes' is not one of"),
    ('{"v": 1, "revision": {"content_hash": "x"}, "jobs": [{"name": "a", "command": "x", '
     '"surprise": 1}]}', "unknown keys ['surprise']"),
    ('{"v": 1, "revision": {"content_hash": "x"}, "jobs": [{"name": "a", "command": "x", '
     '"replicas": "3"}]}', "jobs[0].replicas: expected int"),
    ('{"v": 1, "revision": {"content_hash": "x"}, "jobs": [{"name": "a", "command": "x"}, '
     '{"name": "a", "command": "y"}]}', "job 'a' appears twice"),
])
def test_bad_files_name_the_file_and_the_key(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / APPLIED_FILE).write_text(content)
    with pytest.raises(StateFileError) as info:
        read_applied(tmp_path)
    assert str(tmp_path / APPLIED_FILE) in str(info.value)
    assert message in str(info.value)
