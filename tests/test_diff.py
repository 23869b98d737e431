"""diff_states: what changed between two desired states, field by field."""

from __future__ import annotations

from dataclasses import replace

from cronfile.schedules.diff import Changed, FieldChange, diff_states
from cronfile.schedules.model import (
    Agent,
    DesiredState,
    Job,
    Retries,
    Revision,
    SecretRef,
    Source,
    Strategy,
    Targets,
    Trigger,
)


def state(*items: Job | Agent, rev: str = "sha256:0") -> DesiredState:
    return DesiredState(
        jobs={i.name: i for i in items if isinstance(i, Job)},
        agents={i.name: i for i in items if isinstance(i, Agent)},
        revision=Revision(rev),
    )


def job(name: str, **kw: object) -> Job:
    kw.setdefault("schedules", ("0 2 * * *",))
    return Job(name=name, command=("/bin/true",), **kw)  # type: ignore[arg-type]


def test_nothing_before_means_everything_added() -> None:
    new = state(job("b"), job("a"), Agent("web-1"))
    d = diff_states(None, new)
    assert d.jobs.added == ("a", "b")
    assert d.agents.added == ("web-1",)
    assert d.jobs.changed == d.jobs.removed == ()
    assert not d.is_empty
    assert d.summary() == {"jobs": {"add": 2, "change": 0, "remove": 0},
                           "agents": {"add": 1, "change": 0, "remove": 0}}


def test_add_change_remove_and_unchanged() -> None:
    old = state(job("keep"), job("edit"), job("gone"))
    new = state(job("keep"), job("edit", schedules=("0 3 * * *",)), job("fresh"))
    d = diff_states(old, new)
    assert d.jobs.added == ("fresh",)
    assert d.jobs.removed == ("gone",)
    assert d.jobs.unchanged == ("keep",)
    assert d.jobs.changed == (
        Changed("edit", (FieldChange("schedules", ["0 2 * * *"], ["0 3 * * *"]),)),
    )
    assert d.jobs.changed_names == ("edit",)
    assert d.jobs.counts() == {"add": 1, "change": 1, "remove": 1}


def test_identical_states_are_empty() -> None:
    old = state(job("a"), Agent("web-1", (("role", "web"),)))
    new = state(job("a"), Agent("web-1", (("role", "web"),)), rev="sha256:1")
    d = diff_states(old, new)
    assert d.is_empty
    assert d.jobs.unchanged == ("a",) and d.agents.unchanged == ("web-1",)


def test_nested_fields_are_compared_per_sub_field() -> None:
    old = state(job("a", retries=Retries(max=1), timeout_s=600.0,
                    targets=Targets(labels=(("role", "web"),), strategy=Strategy.ONE)))
    new = state(job("a", retries=Retries(max=3), timeout_s=900.0,
                    targets=Targets(labels=(("role", "db"),), strategy=Strategy.ALL)))
    (change,) = diff_states(old, new).jobs.changed
    assert change.changes == (
        FieldChange("timeout_s", 600.0, 900.0),
        FieldChange("retries.max", 1, 3),
        FieldChange("targets.labels.role", "web", "db"),
        FieldChange("targets.strategy", "one", "all"),
    )


def test_env_keys_added_and_removed() -> None:
    old = state(job("a"))
    new = state(job("a", env=(("PGHOST", "db"), ("TOKEN", SecretRef(from_env="T")))))
    (change,) = diff_states(old, new).jobs.changed
    # an empty env is [] in plain data; the first variable still reads per key
    assert change.changes == (
        FieldChange("env.PGHOST", None, "db"),
        FieldChange("env.TOKEN", None, {"from_env": "T"}),
    )
    (back,) = diff_states(new, old).jobs.changed
    assert back.changes == (
        FieldChange("env.PGHOST", "db", None),
        FieldChange("env.TOKEN", {"from_env": "T"}, None),
    )


def test_optional_nested_value_is_one_change() -> None:
    old = state(job("a"))
    new = state(job("a", schedules=(), trigger=Trigger("deploy", 30.0)))
    (change,) = diff_states(old, new).jobs.changed
    assert change.changes == (
        FieldChange("schedules", ["0 2 * * *"], []),
        FieldChange("trigger", None, {"event": "deploy", "delay_s": 30.0}),
    )


def test_moving_a_job_to_another_file_is_no_change() -> None:
    here = job("a", source=Source("schedules/one.yaml", 3, 3))
    there = replace(here, source=Source("schedules/two.yaml", 40, 3))
    d = diff_states(state(here), state(there))
    assert d.is_empty
    assert d.jobs.unchanged == ("a",)


def test_env_in_another_order_is_no_change() -> None:
    a = job("a", env=(("A", "1"), ("B", "2")))
    b = job("a", env=(("B", "2"), ("A", "1")))
    assert a != b  # different as objects...
    assert diff_states(state(a), state(b)).is_empty  # ...equal as definitions


def test_agents_changed_per_label_and_ssh() -> None:
    old = state(Agent("web-1", (("dc", "fra"), ("role", "web"))))
    new = state(Agent("web-1", (("dc", "ams"), ("role", "web"))), Agent("web-2"))
    d = diff_states(old, new)
    assert d.agents.added == ("web-2",)
    assert d.agents.changed == (Changed("web-1", (FieldChange("labels.dc", "fra", "ams"),)),)
    assert d.jobs.is_empty and not d.agents.is_empty and not d.is_empty


def test_many_unchanged_jobs() -> None:
    """The center's common case: thousands of jobs, one changed (speed is not asserted)."""
    jobs = [job(f"job-{i}", source=Source("a.yaml", i)) for i in range(10_000)]
    moved = [replace(j, source=Source("b.yaml", 1)) for j in jobs]
    moved[5000] = replace(moved[5000], suspend=True)
    d = diff_states(state(*jobs), state(*moved))
    assert d.jobs.changed == (Changed("job-5000", (FieldChange("suspend", False, True),)),)
    assert len(d.jobs.unchanged) == 9_999
