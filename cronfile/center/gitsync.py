"""GitOps (SPEC §7): the center follows a branch of a git repository by itself.

The center keeps its own clone in ``<state>/git/checkout`` and reads the schedules from it.
On every poll (and on ``POST /api/v1/sync`` / ``cronfile apply``) it fetches the ref with
``--force`` (so a force-push or a rollback to an older commit is just another commit),
checks the commit out detached, and reloads: the usual reload path validates it and applies
the difference, or rejects it and keeps running the last good revision. The loader reads
the checked-out commit into ``revision.git_commit``, so every record carries it.

What is running, what was seen last and why they differ is kept in ``<state>/git.json`` for
``cronfile status`` and the dashboard. Credentials come from git's own configuration (SSH
keys, credential helpers) of the user running the center, never from schedule files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cronfile.center.options import GitOptions
from cronfile.state.gitstate import GIT_STATE_FILE, read_git_state
from cronfile.state.ledger import utc_ts

log = logging.getLogger("cronfile.git")

GIT_DIR = "git"
GIT_TIMEOUT_S = 120.0
GIT_ENV = {"GIT_TERMINAL_PROMPT": "0"}  # never wait for a password on a terminal
COMMIT_ID = re.compile(r"[0-9a-fA-F]{4,64}")
"""What ``apply --revision`` accepts: a (possibly abbreviated) commit id, never a ref name or
anything git could read as an option."""


class GitError(Exception):
    """A git command failed: its stderr, in one line."""


class NotOnBranch(Exception):
    """``apply --revision SHA`` named no commit of the branch the center follows."""


def checkout_dir(state_dir: Path) -> Path:
    return state_dir / GIT_DIR / "checkout"


def schedules_dir(state_dir: Path, options: GitOptions) -> Path:
    return checkout_dir(state_dir) / options.subdir


def _git(args: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, env={**os.environ, **GIT_ENV})
    except FileNotFoundError:
        raise GitError("--git needs git, which is not installed") from None
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]} took longer than {GIT_TIMEOUT_S:g}s") from None
    if proc.returncode != 0:
        message = " ".join(proc.stderr.split()) or f"exit {proc.returncode}"
        raise GitError(f"git {args[0]}: {message}")
    return proc.stdout.strip()


class GitFollower:
    """Fetch, check out, reload; one at a time."""

    def __init__(self, options: GitOptions, state_dir: Path,
                 reload: Callable[[], Awaitable[dict[str, Any]]],
                 running_commit: Callable[[], str | None],
                 event: Callable[..., None]) -> None:
        self.options = options
        self.state_dir = state_dir
        self.dir = checkout_dir(state_dir)
        self._reload = reload
        self._running_commit = running_commit
        self._event = event
        self._lock = asyncio.Lock()
        previous = read_git_state(state_dir) or {}
        self.seen: str | None = previous.get("seen") if previous.get("url") == options.url else None
        self.rejected: dict[str, Any] | None = None
        self.fetch_error: str | None = None
        self.pinned: dict[str, str] | None = None
        """``apply --revision``: the older commit to run (``commit``) while the branch stays at
        ``head``; dropped as soon as the branch moves, so the next push is followed again."""

    # ------------------------------------------------------------------ blocking git work

    def _fetch(self) -> str:
        """Clone on first use; fetch the ref (forced); the commit it points at."""
        if not (self.dir / ".git").is_dir():
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            _git(["clone", "--quiet", "--no-checkout", "--", self.options.url, str(self.dir)])
        elif _git(["remote", "get-url", "origin"], self.dir) != self.options.url:
            _git(["remote", "set-url", "origin", self.options.url], self.dir)
        _git(["fetch", "--quiet", "--force", "--prune", "origin", "--", self.options.ref],
             self.dir)
        return _git(["rev-parse", "--verify", "FETCH_HEAD^{commit}"], self.dir)

    def _checkout(self, commit: str) -> None:
        _git(["checkout", "--quiet", "--force", "--detach", commit], self.dir)
        _git(["clean", "--quiet", "-ffdx"], self.dir)

    def _commit_on_branch(self, revision: str, head: str) -> str:
        """The full id of ``revision``, which must be ``head`` or one of its ancestors."""
        refusal = NotOnBranch(f"{revision} is not a commit on {self.options.ref} of "
                              f"{self.options.url}")
        if not COMMIT_ID.fullmatch(revision):
            raise NotOnBranch(f"{revision!r} is not a commit id (expected hex digits)")
        try:
            commit = _git(["rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"], self.dir)
        except GitError:
            raise refusal from None
        ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", commit, head],
                                  cwd=self.dir, capture_output=True, timeout=GIT_TIMEOUT_S,
                                  env={**os.environ, **GIT_ENV})
        if ancestor.returncode != 0:
            raise refusal
        return commit

    def prepare(self) -> str:
        """Before the center's first load: a checkout of the ref (or of the last commit
        seen, when the remote cannot be reached and a clone exists). Raises GitError."""
        try:
            commit = self._fetch()
        except GitError as exc:
            if not (self.dir / ".git").is_dir():
                raise
            self.fetch_error = str(exc)
            log.error("cannot fetch %s (%s): starting on the last commit checked out",
                      self.options.url, exc)
            return _git(["rev-parse", "HEAD"], self.dir)
        self._checkout(commit)
        self.seen = commit
        return commit

    # ------------------------------------------------------------------ on the loop

    async def sync(self, revision: str | None = None) -> dict[str, Any]:
        """Fetch now; when the ref moved, check it out and reload (the reload's answer,
        with ``git``). With ``revision`` (``apply --revision``): run that commit of the
        branch instead, until the branch moves; one not on the branch is refused and
        nothing changes."""
        async with self._lock:
            try:
                commit = await asyncio.to_thread(self._fetch)
            except GitError as exc:
                self.fetch_error = str(exc)
                log.error("git: %s", exc)
                self._store()
                return {"applied": False, "errors": [str(exc)], "git": self.state()}
            self.fetch_error = None
            if commit != self.seen:
                log.info("git: %s %s is now %s", self.options.url, self.options.ref, commit[:12])
                self._event("git_fetched", url=self.options.url, ref=self.options.ref,
                            commit=commit, previous=self.seen)
            self.seen = commit
            if revision is not None:
                try:
                    target = await asyncio.to_thread(self._commit_on_branch, revision, commit)
                except NotOnBranch as exc:
                    log.error("git: apply --revision refused: %s", exc)
                    self._store()
                    return {"applied": False, "refused": "not_on_branch", "errors": [str(exc)],
                            "git": self.state()}
                self.pinned = {"commit": target, "head": commit} if target != commit else None
            elif self.pinned is not None and self.pinned["head"] != commit:
                log.info("git: %s moved; following it again", self.options.ref)
                self.pinned = None
            target = self.pinned["commit"] if self.pinned else commit
            running = self._running_commit()
            known_bad = self.rejected is not None and self.rejected["commit"] == target
            if (target == running and self.rejected is None) or known_bad:
                self._store()
                return {"applied": False, "unchanged": True, "git": self.state()}
            await asyncio.to_thread(self._checkout, target)
            answer = await self._reload()
            if answer.get("applied") or answer.get("unchanged"):
                self.rejected = None
            else:
                self.rejected = {"commit": target, "errors": list(answer.get("errors") or [])}
                self.pinned = None
            self._store()
            return {**answer, "git": self.state()}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.options.poll_s)
            if stop.is_set():
                return
            try:
                await self.sync()
            except Exception:
                log.exception("git sync failed; keeping the current revision")

    def state(self) -> dict[str, Any]:
        running = self._running_commit()
        why = None
        if self.fetch_error:
            why = f"cannot fetch: {self.fetch_error}"
        elif self.rejected is not None and self.rejected["commit"] == self.seen:
            why = "rejected: " + "; ".join(self.rejected["errors"][:5])
        elif self.pinned is not None and running == self.pinned["commit"]:
            why = (f"pinned by `cronfile apply --revision` until {self.options.ref} moves")
        elif self.seen and running != self.seen:
            why = "not applied yet"
        return {"url": self.options.url, "ref": self.options.ref, "poll_s": self.options.poll_s,
                "seen": self.seen, "running": running, "why": why,
                "rejected": self.rejected, "fetch_error": self.fetch_error,
                "pinned": self.pinned["commit"] if self.pinned else None, "ts": utc_ts()}

    def _store(self) -> None:
        path = self.state_dir / GIT_STATE_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.state(), indent=1) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            log.error("cannot write %s: %s", path, exc)


__all__ = ["GitError", "GitFollower", "schedules_dir"]
