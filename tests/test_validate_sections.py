"""A top-level section of the wrong shape is a schema error at its line, never an internal
error, and the file's other sections are still checked (found by the line-soup property)."""

from __future__ import annotations

import pytest

from cronfile.schedules.loader import load_file

GOOD_JOB = 'jobs:\n  tick:\n    schedule: "* * * * *"\n    command: ["true"]\n'


@pytest.mark.parametrize("section", ["jobs", "agents", "calendars", "pools"])
@pytest.mark.parametrize("value", ["\n- a\n- b\n", " 3\n", " just text\n"])
def test_a_section_that_is_not_a_mapping_is_an_error_at_its_line(section: str, value: str
                                                                  ) -> None:
    others = "" if section == "jobs" else GOOD_JOB
    text = f"apiVersion: cronfile/v1\n{others}{section}:{value}"
    result = load_file("a.yaml", text.encode(), "digest")
    line = text.splitlines().index(next(x for x in text.splitlines()
                                        if x.startswith(f"{section}:"))) + 1
    errors = [p for p in result.problems if p.severity.value == "error"]
    assert errors, text
    assert {p.path.split(".")[0].split("[")[0] for p in errors} == {section}
    assert all(p.line in (line, line + 1) for p in errors), [p.render() for p in errors]
