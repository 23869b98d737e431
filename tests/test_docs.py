"""The reference docs in ``docs/`` stay true: every job field of the JSON Schema is
documented (with each of its sub-fields and allowed values), every example validates, every
option of every command is documented, and every relative link resolves to a file in the
repository (nobody needs a file from outside it)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
from centerlib import cronfile_command

from cronfile.cli.app import cli
from cronfile.schedules.model import RunStatus

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SCHEMA: dict[str, Any] = json.loads((REPO / "schema/cronfile-v1.json").read_text())
DEFS: dict[str, Any] = SCHEMA["$defs"]
FORMAT_DOC = (DOCS / "schedule-format.md").read_text()
COMMANDS_DOC = (DOCS / "commands.md").read_text()


def _sections(text: str, level: str) -> dict[str, str]:
    """``{heading: body}`` for the headings of one level (``"##"`` or ``"###"``)."""
    parts = re.split(rf"(?m)^{level} (.+)$", text)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _resolve(prop: dict[str, Any]) -> dict[str, Any]:
    ref = prop.get("$ref")
    return DEFS[ref.rsplit("/", 1)[1]] if ref else prop


def _words(prop: dict[str, Any]) -> list[str]:
    """The sub-field names and enum values a field's documentation must mention."""
    target = _resolve(prop)
    words = list(target.get("properties", {}))
    words += [str(v) for v in target.get("enum", [])]
    for sub in target.get("properties", {}).values():
        words += [str(v) for v in _resolve(sub).get("enum", [])]
        items = _resolve(sub).get("items", {})
        words += [str(v) for v in items.get("enum", [])]
    return words


JOB_FIELDS = sorted(DEFS["job"]["properties"])


@pytest.mark.parametrize("field", JOB_FIELDS)
def test_every_job_field_is_documented(field: str) -> None:
    sections = _sections(FORMAT_DOC, "###")
    body = sections.get(f"`{field}`")
    assert body is not None, f"docs/schedule-format.md has no '### `{field}`' section"
    missing = [w for w in _words(DEFS["job"]["properties"][field]) if f"`{w}`" not in body
               and f"{w}:" not in body]
    assert not missing, f"### `{field}` does not mention {missing}"
    assert "```yaml" in body, f"### `{field}` has no example"


def test_every_other_key_is_documented() -> None:
    for key in SCHEMA["properties"]:
        assert f"`{key}`" in FORMAT_DOC, key
    for key in DEFS["defaults"]["properties"]:
        assert f"`{key}`" in _sections(FORMAT_DOC, "##")["Defaults"], key
    agents = _sections(FORMAT_DOC, "##")["Agents"]
    for key in [*DEFS["agent"]["properties"], *DEFS["ssh"]["properties"]]:
        assert f"`{key}`" in agents, key


def _yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len([b for b in _yaml_blocks(FORMAT_DOC)
                                            if b.lstrip().startswith(("#", "apiVersion"))])))
def test_every_example_validates(index: int, tmp_path: Path) -> None:
    block = [b for b in _yaml_blocks(FORMAT_DOC) if b.lstrip().startswith(("#", "apiVersion"))][index]
    schedules = tmp_path / "schedules"
    schedules.mkdir()
    (schedules / "example.yaml").write_text(block)
    result = subprocess.run([*cronfile_command(), "validate", "--strict", str(schedules)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{block}\n{result.stdout}{result.stderr}"


def test_all_examples_are_complete_files() -> None:
    blocks = _yaml_blocks(FORMAT_DOC)
    assert len(blocks) > len(JOB_FIELDS)
    assert all(b.lstrip().startswith(("#", "apiVersion")) for b in blocks)


def _commands(group: click.Group, prefix: str = "cronfile") -> list[tuple[str, click.Command]]:
    out: list[tuple[str, click.Command]] = []
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            out += _commands(command, f"{prefix} {name}")
        else:
            out.append((f"{prefix} {name}", command))
    return out


COMMANDS = _commands(cli)


@pytest.mark.parametrize("name,command", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_option_of_every_command_is_documented(name: str, command: click.Command) -> None:
    sections = _sections(COMMANDS_DOC, "##")
    body = sections.get(f"`{name}`")
    assert body is not None, f"docs/commands.md has no '## `{name}`' section"
    body = body.replace("\\|", "|")  # a | inside a table cell is written \|
    for param in command.params:
        if isinstance(param, click.Argument):
            assert param.human_readable_name.upper() in body, (name, param.name)
            continue
        for opt in [*param.opts, *param.secondary_opts]:
            assert re.search(rf"`{re.escape(opt)}[` =]", body), f"{name}: {opt} is not documented"
        choices = getattr(param.type, "choices", None)
        for choice in choices or ():
            assert f"`{choice}`" in body or f"|{choice}" in body or f"{choice}|" in body, \
                f"{name} {param.opts[0]}: value {choice} is not documented"


def test_the_documented_commands_exist() -> None:
    documented = {h.strip("`") for h in _sections(COMMANDS_DOC, "##") if h.startswith("`cronfile ")}
    assert documented == {n for n, _ in COMMANDS}


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(path: Path) -> list[str]:
    links = LINK.findall(path.read_text())
    return [link for link in links if not re.match(r"^[a-z]+:", link) and not link.startswith("#")]


@pytest.mark.parametrize("doc", [REPO / "README.md", *sorted(DOCS.glob("*.md")),
                                 *sorted(REPO.glob("examples/*/README.md")), REPO / "CHANGELOG.md"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve_inside_the_repository(doc: Path) -> None:
    for link in _relative_links(doc):
        target = (doc.parent / link.split("#", 1)[0]).resolve()
        assert target.is_relative_to(REPO), f"{doc.name}: {link} leaves the repository"
        assert target.exists(), f"{doc.name}: {link} does not exist"
        anchor = link.split("#", 1)[1] if "#" in link else None
        if anchor and target.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"(?m)^#+ (.+)$", target.read_text())}
            assert anchor in slugs, f"{doc.name}: #{anchor} is not a heading of {link}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_links_the_docs_and_says_how_to_get_the_schema() -> None:
    readme = (REPO / "README.md").read_text()
    links = _relative_links(REPO / "README.md")
    for doc in ("docs/schedule-format.md", "docs/commands.md", "docs/records.md",
                "docs/guarantees.md", "docs/install.md"):
        assert doc in links, doc
    assert "cronfile schema > schema/cronfile-v1.json" in readme
    assert '"yaml.yamlVersion": "1.1"' in readme or "`yaml.yamlVersion`" in readme
    assert "../shared" not in readme


RECORD_FIELDS = ["v", "ts", "record", "run_id", "job", "agent", "transport", "scheduled_at",
                 "attempt", "revision", "status", "exit_code", "signal", "started_at",
                 "finished_at", "duration_s", "output_tail", "reason", "trigger", "route"]


def test_records_doc_has_every_field_status_and_event() -> None:
    doc = (DOCS / "records.md").read_text()
    for name in RECORD_FIELDS:
        assert f"`{name}`" in doc, name
    for status in RunStatus:
        assert f"`{status.value}`" in doc, status
    emitted = set()
    for source in (REPO / "cronfile").rglob("*.py"):
        emitted |= set(re.findall(r'(?:_event|record_event)\(\s*"([a-z_]+)"', source.read_text()))
    assert emitted, "no event names found in the sources"
    events = _sections(doc, "##")["Event records (`events.jsonl`)"]
    missing = sorted(e for e in emitted if f"`{e}`" not in events)
    assert not missing, f"events not documented in docs/records.md: {missing}"


def test_every_schema_modeline_in_the_repository_resolves() -> None:
    files = [*REPO.glob("schedules/**/*.y*ml"), *REPO.glob("examples/*/schedules/**/*.y*ml")]
    assert files
    for path in files:
        first = path.read_text().splitlines()[0]
        match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
        assert match, f"{path}: no schema modeline"
        assert (path.parent / match.group(1)).resolve() == REPO / "schema/cronfile-v1.json", path
