"""The states a row goes through, one StrEnum per table (the values are what the database and
the API hold: a member compares equal to its string, so ``Photo.state == PhotoState.ANONYMISED``
and ``row.state == "anonymised"`` agree)."""

from __future__ import annotations

from enum import StrEnum


class PhotoState(StrEnum):
    """uploading -> quarantined (sealed original, waiting for the gate) -> anonymising (claimed by
    a process, with a lease) -> anonymised or rejected."""

    UPLOADING = "uploading"
    QUARANTINED = "quarantined"
    ANONYMISING = "anonymising"
    ANONYMISED = "anonymised"
    REJECTED = "rejected"


class JobState(StrEnum):
    """queued -> running (claimed, with a lease) -> done, failed or cancelled; a running job whose
    holder died goes back to queued (it resumes from its last finished stage)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class ContractState(StrEnum):
    """active -> terminating (a termination under way, resumable) -> ended."""

    ACTIVE = "active"
    TERMINATING = "terminating"
    ENDED = "ended"
