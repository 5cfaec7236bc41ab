"""What the router learns about one request (which instances served it), for the frontend's access log.

The frontend opens the notes in the request's task (``open_notes``) before it asks its backend; the router,
running in that task (or in tasks started from it, which share the notes object), writes to them. Without open
notes (another caller, a test) writing does nothing.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

_NOTES: ContextVar[RequestNotes | None] = ContextVar("dynamo_lite_request_notes", default=None)


@dataclass(slots=True)
class RequestNotes:
    instances: dict[str, str] = field(
        default_factory=dict
    )  # role ("prefill", "decode", "agg") -> instance id


def open_notes() -> RequestNotes:
    """Fresh notes for the current task's request."""
    notes = RequestNotes()
    _NOTES.set(notes)
    return notes


def note_instance(role: str, instance_id: str) -> None:
    """The ``role`` part of the current request runs on ``instance_id`` (the last one, after a migration)."""
    notes = _NOTES.get()
    if notes is not None:
        notes.instances[role] = instance_id
