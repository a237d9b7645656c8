"""Every Redis key, channel and group name of wire protocol v1, in one place.

The prefix is configurable (default ``qworker``) so that several deployments can share
one Redis. Job-scoped keys take the job id verbatim; ids are restricted to
``[A-Za-z0-9._:-]{1,128}`` by the protocol, so they never need escaping.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "qworker"
DEFAULT_GROUP = "workers"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names for one prefix. ``Keys().jobs == "qworker:jobs"``."""

    prefix: str = DEFAULT_PREFIX
    group: str = DEFAULT_GROUP

    def __post_init__(self) -> None:
        if not self.prefix or any(c.isspace() for c in self.prefix):
            raise ValueError(f"key prefix must be non-empty without spaces, got {self.prefix!r}")
        if not self.group or any(c.isspace() for c in self.group):
            raise ValueError(f"consumer group must be non-empty without spaces, got {self.group!r}")

    @property
    def jobs(self) -> str:
        """Stream of jobs (field ``job`` = msgpack map), read by group ``group``."""
        return f"{self.prefix}:jobs"

    @property
    def dead(self) -> str:
        """Stream of dead letters: original bytes, reason, deliveries, worker."""
        return f"{self.prefix}:dead"

    @property
    def cancel(self) -> str:
        """Pub/sub channel on which a job id asks for cancellation."""
        return f"{self.prefix}:cancel"

    @property
    def worker_pattern(self) -> str:
        """SCAN pattern matching every heartbeat hash."""
        return f"{self.prefix}:worker:*"

    def out(self, job_id: str) -> str:
        """Pub/sub channel of one job's live events."""
        return f"{self.prefix}:out:{job_id}"

    def log(self, job_id: str) -> str:
        """Replay stream of one job's events; entry id ``0-(seq+1)``, field ``event``."""
        return f"{self.prefix}:log:{job_id}"

    def result(self, job_id: str) -> str:
        """String holding one job's final result (msgpack), written once."""
        return f"{self.prefix}:result:{job_id}"

    def cancelled(self, job_id: str) -> str:
        """Marker key set when a job is cancelled (survives a missed pub/sub message)."""
        return f"{self.prefix}:cancelled:{job_id}"

    def worker(self, name: str) -> str:
        """Heartbeat hash of one worker (expires when the worker stops beating)."""
        return f"{self.prefix}:worker:{name}"
