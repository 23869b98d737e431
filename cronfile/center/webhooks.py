"""The bodies ``notify.webhook`` POSTs, one shape per ``notify.format``, and the POST itself.

Chat services do not read arbitrary JSON: a Slack incoming webhook answers 400 to a body
without ``text``, and a Microsoft Teams incoming webhook wants a MessageCard (or at least
``text``). ``json`` stays cronfile's own flat object, for receivers people write themselves.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from cronfile.schedules.model import NotifyFormat

WEBHOOK_TIMEOUT_S = 10.0

# MessageCard colours: red for bad news, green for a recovery.
_TEAMS_COLOUR = {"failure": "D70000", "missed": "E8A317", "recovered": "2EB886"}


class WebhookRejected(Exception):
    """The receiver answered with an HTTP error status (its body says why, if anything)."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(f"HTTP {status_code} {reason}".rstrip())
        self.status_code = status_code


def headline(payload: dict[str, Any]) -> str:
    """One line a person reads first: which job, what happened."""
    job = payload.get("job")
    kind = payload.get("kind")
    if payload.get("expectation"):
        return f"cronfile: job {job} broke its expectation {payload['expectation']}"
    if kind == "recovered":
        return f"cronfile: job {job} recovered"
    if kind == "missed":
        return f"cronfile: job {job} missed a slot"
    status = payload.get("status") or "failed"
    exit_code = payload.get("exit_code")
    return f"cronfile: job {job} {status}" + (f" (exit {exit_code})" if exit_code is not None else "")


def message_text(payload: dict[str, Any]) -> str:
    """The headline and the run's facts, one per line (what a chat message shows)."""
    lines = [headline(payload)]
    for label, key in (("detail", "detail"), ("reason", "reason"), ("slot", "scheduled_at"),
                       ("agent", "agent"), ("run", "run_id"), ("owner", "owner")):
        value = payload.get(key)
        if value not in (None, ""):
            lines.append(f"{label}: {value}")
    return "\n".join(lines)


def webhook_body(fmt: NotifyFormat, payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON object to POST for ``payload`` in ``fmt``."""
    if fmt is NotifyFormat.SLACK:
        return {"text": message_text(payload)}
    if fmt is NotifyFormat.TEAMS:
        return {"@type": "MessageCard", "@context": "https://schema.org/extensions",
                "summary": headline(payload), "title": headline(payload),
                "themeColor": _TEAMS_COLOUR.get(str(payload.get("kind")), "D70000"),
                "text": message_text(payload).replace("\n", "\n\n")}  # Teams markdown paragraphs
    return payload


def post_webhook(url: str, body: dict[str, Any], timeout_s: float = WEBHOOK_TIMEOUT_S) -> None:
    """POST ``body`` as JSON; :class:`WebhookRejected` on an HTTP error status."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "User-Agent": "cronfile"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            response.read(1024)
    except urllib.error.HTTPError as exc:
        raise WebhookRejected(exc.code, str(exc.reason or "")) from None
