"""The loader's per-file cache: a reload reads only the files whose stat changed, and a
rewrite too quick for the file system's timestamps is still seen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cronfile.schedules import loader as loader_mod
from cronfile.schedules.loader import ScheduleLoader


def job_file(name: str, schedule: str = "0 1 * * *") -> str:
    return (f"apiVersion: cronfile/v1\njobs:\n  {name}:\n    schedule: \"{schedule}\"\n"
            "    command: [\"/bin/true\"]\n")


def test_unchanged_files_are_not_read_again(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        (tmp_path / f"f{i}.yaml").write_text(job_file(f"j{i}"))
    monkeypatch.setattr(loader_mod, "_RACY_NS", -10**12)  # every stat is trusted at once
    ld = ScheduleLoader(tmp_path)
    first = ld.load()
    assert first.state is not None and sorted(first.state.jobs) == ["j0", "j1", "j2"]
    reads: list[str] = []
    real_read = loader_mod._read

    def counting(shown: str, path: str) -> tuple[bytes | None, object]:
        reads.append(shown)
        return real_read(shown, path)

    monkeypatch.setattr(loader_mod, "_read", counting)
    again = ld.load()
    assert reads == []
    assert again.state is not None and again.state.revision == first.state.revision
    (tmp_path / "f1.yaml").write_text(job_file("j1", "0 12 * * *"))  # another size
    changed = ld.load()
    assert [os.path.basename(r) for r in reads] == ["f1.yaml"]
    assert changed.state is not None
    assert changed.state.jobs["j1"].schedules == ("0 12 * * *",)
    assert changed.state.revision != first.state.revision
    assert changed.state.jobs["j0"] is first.state.jobs["j0"]


def test_same_size_rewrite_within_one_tick_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(job_file("a", "0 1 * * *"))
    ld = ScheduleLoader(tmp_path)
    first = ld.load()
    st = path.stat()
    path.write_text(job_file("a", "0 2 * * *"))  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    second = ld.load()
    assert second.state is not None and first.state is not None
    assert second.state.jobs["a"].schedules == ("0 2 * * *",)
    assert second.state.revision != first.state.revision


def test_revision_hash_is_the_same_for_a_fresh_loader(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(job_file("a"))
    (tmp_path / "sub" / "b.yml").write_text(job_file("b"))
    monkeypatch.setattr(loader_mod, "_RACY_NS", -10**12)
    ld = ScheduleLoader(tmp_path)
    one = ld.load()
    two = ld.load()  # from the cache
    fresh = ScheduleLoader(str(tmp_path) + "/./").load()
    assert one.state is not None and two.state is not None and fresh.state is not None
    assert one.state.revision == two.state.revision == fresh.state.revision
    assert one.files == [str(tmp_path / "a.yaml"), str(tmp_path / "sub" / "b.yml")]
