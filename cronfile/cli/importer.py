"""The body of ``cronfile import crontab``: read the crontabs, write (or print) the result."""

from __future__ import annotations

from pathlib import Path

from cronfile.schedules.crontab import ImportNote, Severity, import_crontabs
from cronfile.schedules.loader import find_schedule_files, load_schedules


def run_import_crontab(files: list[Path], system: bool, out: Path | None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr). Nothing is written when a crontab cannot be read or an
    output file exists already: an import never overwrites schedules."""
    texts: list[tuple[str, str]] = []
    errors: list[str] = []
    for path in files:
        try:
            texts.append((str(path), path.read_bytes().decode("utf-8")))
        except UnicodeDecodeError as exc:
            errors.append(f"{path}: error: not UTF-8 (byte {exc.start}); not imported\n")
        except OSError as exc:
            errors.append(f"{path}: error: cannot read: {exc.strerror}\n")
    if errors:
        return 1, "", "".join(errors)
    result = import_crontabs(texts, system=system, one_file=None if out else "-",
                             taken=_job_names(out) if out else ())
    notes = "".join(f"{note}\n" for note in result.notes)
    summary = _summary(result.jobs, result.notes)
    if out is None:
        return result.exit_code, result.outputs["-"], notes + summary
    existing = [name for name in result.outputs if (out / name).exists()]
    if existing:
        return 1, "", notes + "".join(f"{out / name}: error: exists already; nothing written\n"
                                      for name in existing)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in result.outputs.items():
        (out / name).write_text(text, encoding="utf-8")
        written.append(f"wrote {out / name}\n")
    return result.exit_code, "".join(written), notes + summary


def _job_names(out: Path) -> set[str]:
    """Job names already used by schedule files in ``out`` (names are unique across files)."""
    if not out.is_dir() or not find_schedule_files(out)[0]:
        return set()
    state = load_schedules(out).state
    return set(state.jobs) if state is not None else set()


def _summary(jobs: int, notes: tuple[ImportNote, ...]) -> str:
    skipped = sum(n.severity is Severity.NOT_IMPORTED for n in notes)
    close = sum(n.severity is Severity.APPROXIMATED for n in notes)
    return (f"{jobs} job(s) imported, {skipped} line(s) not imported, "
            f"{close} translation(s) to check\n")
