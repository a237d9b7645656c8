"""Client-side pieces shared by Client and AsyncClient (no I/O): building a job map and
putting a job's events in order across the replay log and the live channel."""

from __future__ import annotations

import time
import uuid
from typing import Any

from qworker.sampling_params import SamplingParams
from qworker.worker.protocol import ID_PATTERN, VERSION, Event, log_entry_id, pack, unpack


def build_job(prompt: str | None = None, *, messages: list[dict] | None = None,
              prompt_token_ids: list[int] | None = None, job_id: str | None = None,
              priority: int = 0, deadline: float | None = None, tenant: str | None = None,
              **params: Any) -> tuple[str, bytes]:
    """Validate and encode one job; returns (job id, msgpack bytes).

    ``deadline`` is seconds from now (sent as absolute ``deadline_ms``); ``params`` are
    SamplingParams fields (max_tokens, temperature, ...). Raises ValueError on bad input.
    """
    given = [n for n, v in (("prompt", prompt), ("messages", messages),
                            ("prompt_token_ids", prompt_token_ids)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, messages, prompt_token_ids; got {given}")
    job_id = job_id or uuid.uuid4().hex
    if not ID_PATTERN.fullmatch(job_id):
        raise ValueError(f"job_id must match [A-Za-z0-9._:-]{{1,128}}, got {job_id!r}")
    SamplingParams.from_dict(params)          # fail here, not on a worker
    now = int(time.time() * 1000)
    job: dict[str, Any] = {"v": VERSION, "id": job_id, given[0]: prompt if prompt is not None
                           else messages if messages is not None else list(prompt_token_ids),
                           "params": params, "priority": priority, "submitted_ms": now}
    if deadline is not None:
        job["deadline_ms"] = now + int(deadline * 1000)
    if tenant is not None:
        job["tenant"] = tenant
    return job_id, pack(job)


def decode_event(raw: bytes) -> Event:
    return Event.from_map(unpack(raw))


class StreamCursor:
    """Yields each seq exactly once, in order, whichever source (log or live) brings it."""

    def __init__(self, start_seq: int = 0) -> None:
        self.next_seq = start_seq
        self.finished = False

    @property
    def log_start(self) -> str:
        """XRANGE start for the events not seen yet."""
        return log_entry_id(self.next_seq)

    def accept(self, ev: Event) -> str:
        """'take' the event (it is the next seq), 'skip' it (seen), or 'gap' (read the log)."""
        if ev.seq < self.next_seq or self.finished:
            return "skip"
        if ev.seq > self.next_seq:
            return "gap"
        self.next_seq += 1
        self.finished = ev.finished
        return "take"
