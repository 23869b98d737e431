"""GitOps (SPEC §7) against a real local bare repository: the center follows a branch by
itself — a good commit, a bad one (rejected, the last good keeps running), a force-push
rollback — and records the commit in every record's ``revision.git_commit``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from centerlib import cronfile_command, finished
from httplib import HttpCenter

GOOD = """\
apiVersion: cronfile/v1
jobs:
  tick:
    schedule: "* * * * * *"
    command: ["true"]
"""
BETTER = GOOD + """\
  report:
    trigger: {event: report}
    command: ["echo", "report"]
"""
BAD = GOOD + """\
  broken:
    schedule: "0 0 30 2 *"
    command: ["true"]
"""


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com",
                           "-c", "init.defaultBranch=main", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


class Repo:
    """A bare repository (the "remote") and a clone that commits and pushes to it."""

    def __init__(self, root: Path) -> None:
        self.bare = root / "remote.git"
        self.work = root / "work"
        git("init", "--bare", "--quiet", str(self.bare), cwd=root)
        git("clone", "--quiet", str(self.bare), str(self.work), cwd=root)
        git("checkout", "--quiet", "-b", "main", cwd=self.work)

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def commit(self, text: str, message: str) -> str:
        (self.work / "schedules").mkdir(exist_ok=True)
        (self.work / "schedules" / "jobs.yaml").write_text(text)
        git("add", "-A", cwd=self.work)
        git("commit", "--quiet", "-m", message, cwd=self.work)
        git("push", "--quiet", "origin", "main", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def force_push(self, commit: str) -> None:
        git("push", "--quiet", "--force", "origin", f"{commit}:refs/heads/main", cwd=self.work)


class GitCenter(HttpCenter):
    def __init__(self, root: Path, repo: Repo, poll: str) -> None:
        super().__init__(root)
        self.repo = repo
        self.poll = poll

    def argv(self) -> list[str]:
        argv = super().argv()
        argv[argv.index("--schedules") + 1] = "schedules"  # inside the repository
        return [*argv, "--git", self.repo.url, "--git-ref", "main", "--git-poll", self.poll]

    def applied(self, commit: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == "revision_applied"
                and (e.get("revision") or {}).get("git_commit") == commit]

    def rejected(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == "revision_rejected"]

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--format", "json").stdout))


def test_the_center_follows_a_branch_good_bad_and_rollback(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    first = repo.commit(GOOD, "first")
    center = GitCenter(tmp_path, repo, "1s")
    center.start()
    try:
        assert center.applied(first)
        runs = center.wait_runs(lambda rs: finished(rs, "tick"), 10)
        assert all(r["revision"]["git_commit"] == first for r in runs)

        good = repo.commit(BETTER, "add report")
        center.wait_events(lambda _: center.applied(good), 1 + 1 + 5, "the good commit")
        status = center.status()
        assert (status["git"]["seen"], status["git"]["running"], status["git"]["why"]) == \
            (good, good, None)
        assert status["revision"]["git_commit"] == good
        assert center.post("/api/v1/events/report").json()["jobs"] == ["report"]

        bad = repo.commit(BAD, "break it")
        center.wait_events(lambda _: center.rejected(), 1 + 1 + 5, "the bad commit rejected")
        errors = center.rejected()[0]["errors"]
        assert any("jobs.yaml:" in e and "never fires" in e for e in errors), errors
        center.wait_runs(lambda rs: center.status()["git"]["seen"] == bad, 5, "git.json")
        status = center.status()
        assert status["git"]["running"] == good
        assert status["git"]["why"].startswith("rejected: ")
        assert "never fires" in status["git"]["why"]
        assert status["revision"]["git_commit"] == good
        assert "git: " in center.cli("status").stdout
        after_bad = len(center.runs())
        center.wait_runs(lambda rs: len(rs) > after_bad + 2, 10, "more ticks")
        new = center.runs()[after_bad:]
        assert new and all(r["revision"]["git_commit"] == good for r in new)
        # a sync now does not apply or reject the known-bad commit again
        assert center.post("/api/v1/sync").json()["git"]["seen"] == bad
        assert len(center.rejected()) == 1

        repo.force_push(first)  # rollback to an older commit: applied like any other change
        center.wait_events(lambda _: len(center.applied(first)) >= 2, 1 + 1 + 5, "the rollback")
        center.wait_runs(lambda rs: center.status()["git"]["running"] == first, 5, "git.json")
        status = center.status()
        assert (status["git"]["seen"], status["git"]["why"]) == (first, None)
        assert "report" not in [j["job"] for j in status["jobs"]]
    finally:
        center.stop()


def test_sync_fetches_at_once_and_metrics_show_the_commit(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.commit(GOOD, "first")
    center = GitCenter(tmp_path, repo, "1h")
    center.start()
    try:
        second = repo.commit(BETTER, "second")
        answer = center.post("/api/v1/sync").json()
        assert answer["applied"] is True
        assert answer["git"]["running"] == second
        center.wait_events(lambda _: center.applied(second), 5, "the applied event")
        metrics = center.get("/metrics").body.decode()
        assert f'git_commit="{second}"' in metrics
    finally:
        center.stop()


def test_an_unreachable_repository_at_start_is_an_error(tmp_path: Path) -> None:
    center = GitCenter(tmp_path, Repo(tmp_path), "1s")
    center.repo.bare = tmp_path / "nowhere.git"
    center.launch(center.argv(), center.env)
    assert center.proc is not None
    assert center.proc.wait(timeout=60) == 1
    assert "--git file://" in center.log_text() and "git clone" in center.log_text()


def remote_cli(center: HttpCenter, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cronfile_command(), *args, "--center", center.url, "--token-file",
                           str(center.token_path)], capture_output=True, text=True, timeout=60)


def test_apply_revision_syncs_to_an_older_commit_of_the_branch(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    first = repo.commit(GOOD, "first")
    git("checkout", "--quiet", "-b", "side", cwd=repo.work)
    side = repo.commit(BETTER, "on another branch")  # `commit` pushes main: still first
    git("push", "--quiet", "origin", "side", cwd=repo.work)
    git("checkout", "--quiet", "main", cwd=repo.work)
    second = repo.commit(BETTER, "second")
    center = GitCenter(tmp_path, repo, "1s")
    center.start()
    try:
        assert center.applied(second)

        # back to the older commit of the branch, through the control socket
        done = center.cli("apply", "--revision", first[:10])
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"Applied commit {first} (revision ")
        center.wait_events(lambda _: center.applied(first), 5, "the older commit applied")
        before = len(center.runs())
        center.wait_runs(lambda rs: len(rs) > before + 4, 10, "ticks after the sync")
        new = center.runs()[before:]
        assert all(r["revision"]["git_commit"] == first for r in new)
        status = center.status()  # polls since then did not move it back to the branch's head
        assert (status["git"]["running"], status["git"]["seen"], status["git"]["pinned"]) == \
            (first, second, first)
        assert status["git"]["why"].startswith("pinned by `cronfile apply --revision`")
        assert "report" not in [j["job"] for j in status["jobs"]]

        # a commit not on the branch (nor one of its ancestors), over HTTP: refused, no change
        events = len(center.events())
        for wrong in (side, "0123456789abcdef"):
            refused = remote_cli(center, "apply", "--revision", wrong)
            assert (refused.returncode, refused.stdout) == (1, (
                "refused by the center, nothing changed:\n"
                f"{wrong} is not a commit on main of {repo.url}\n")), refused.stderr
        not_an_id = remote_cli(center, "apply", "--revision", "--upload-pack=touch x")
        assert not_an_id.returncode == 1
        assert "is not a commit id (expected hex digits)" in not_an_id.stdout
        assert [e for e in center.events()[events:] if e.get("event", "").startswith("revision_")] \
            == []
        assert center.status()["git"]["running"] == first

        # the next push is followed again
        third = repo.commit(GOOD + "# third\n", "third")
        center.wait_events(lambda _: center.applied(third), 1 + 1 + 5, "the next push")
        center.wait_runs(lambda rs: center.status()["git"]["running"] == third, 5, "git.json")
        status = center.status()
        assert (status["git"]["pinned"], status["git"]["why"]) == (None, None)
    finally:
        center.stop()


def test_apply_revision_without_git_is_a_usage_error(tmp_path: Path) -> None:
    center = HttpCenter(tmp_path, watch=False)
    center.write("jobs.yaml", GOOD)
    center.start()
    try:
        for result in (center.cli("apply", "--revision", "abc1234"),
                       remote_cli(center, "apply", "--revision", "abc1234")):
            assert result.returncode == 2, result
            assert "follows no git branch (it was started without --git URL)" in result.stderr
            assert result.stdout == ""
        assert len([e for e in center.events() if e.get("event") == "revision_applied"]) == 1
    finally:
        center.stop()
