"""``cronfile next``: when jobs fire next, in their own zone and in UTC."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from cronfile.schedules.firetimes import to_datetime
from cronfile.schedules.jobtimes import job_timer, times
from cronfile.schedules.model import DesiredState, Job, JobKind


class UsageError(ValueError):
    """Bad arguments (exit 2)."""


def parse_time(text: str) -> float:
    """ISO-8601 to epoch seconds; a time without an offset is UTC (never the host's zone)."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        if not 1900 <= value.astimezone(UTC).year <= 9000:
            raise ValueError("out of range")
        return value.timestamp()
    except (ValueError, OverflowError):
        raise UsageError(f"--after {text!r} is not an ISO-8601 time between the years 1900 and 9000 "
                         "(e.g. 2026-10-25T00:00:00Z)") from None


@dataclass
class JobFires:
    job: Job
    times: list[float]
    note: str = ""

    def skipped(self) -> dict[float, str]:
        """The times a calendar of the job skips, with the reason."""
        if not self.job.skip:
            return {}
        return {t: why for t in self.times if (why := self.job.skipped_because(t)) is not None}


def next_fires(state: DesiredState, job: str | None, count: int, after: float) -> list[JobFires]:
    if job is not None and job not in state.jobs:
        from cronfile.schedules.problems import did_you_mean
        raise UsageError(f"no job named {job!r}{did_you_mean(job, state.jobs)}")
    names = [job] if job else sorted(state.jobs)
    out = []
    for name in names:
        j = state.jobs[name]
        if j.kind is JobKind.DAEMON:
            out.append(JobFires(j, [], "daemon: runs all the time"))
        elif j.suspend:
            out.append(JobFires(j, [], "suspended: never fires"))
        elif j.trigger is not None:
            out.append(JobFires(j, [], f"runs on `cronfile trigger {j.trigger.event}`"))
        elif j.after:
            out.append(JobFires(j, [], f"runs after {', '.join(j.after)} succeed"))
        else:
            timer = job_timer(j)
            found = times(timer, after, count) if timer is not None else []
            note = "one-shot: its time has passed" if j.run_at is not None and not found else ""
            out.append(JobFires(j, found, note))
    return out


def iso(ts: float, zone: str) -> str:
    return to_datetime(ts, zone).isoformat()


def _fires_json(f: JobFires) -> dict[str, object]:
    out: dict[str, object] = {
        "job": f.job.name, "timezone": f.job.timezone, "note": f.note or None,
        "times": [iso(t, f.job.timezone) for t in f.times],
        "utc": [iso(t, "UTC").replace("+00:00", "Z") for t in f.times]}
    if f.job.skip:  # only for jobs with calendars: the other jobs' output stays as it was
        out["skipped"] = [{"time": iso(t, f.job.timezone), "reason": why}
                          for t, why in f.skipped().items()]
    return out


def render(fires: list[JobFires], single: bool, fmt: str) -> str:
    if fmt == "json":
        if single:
            return json.dumps([iso(t, fires[0].job.timezone) for t in fires[0].times]) + "\n"
        return json.dumps([_fires_json(f) for f in fires], indent=2) + "\n"
    lines = []
    for f in fires:
        schedule = " | ".join(f.job.schedules) or (
            f"run_at {iso(f.job.run_at, f.job.timezone)}" if f.job.run_at is not None else "-")
        lines.append(f"{f.job.name}  {schedule}  ({f.job.timezone})")
        if f.note:
            lines.append(f"  {f.note}")
        skipped = f.skipped()
        for t in f.times:
            local = to_datetime(t, f.job.timezone)
            utc = to_datetime(t, "UTC")
            mark = f"   skipped: {skipped[t]}" if t in skipped else ""
            lines.append(f"  {local:%Y-%m-%d %H:%M:%S} {local.tzname():<6} ({local:%z})   "
                         f"{utc:%Y-%m-%dT%H:%M:%S}Z{mark}")
    return "\n".join(lines) + "\n"
