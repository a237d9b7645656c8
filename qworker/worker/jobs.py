"""Per-job state inside the worker loop and the ops that end or advance a job (no I/O)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from qworker.worker.intake import Admission
from qworker.worker.protocol import Event, JobError, Result, log_entry_id
from qworker.worker.publisher import Op


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class ActiveJob:
    """A job this worker is generating (or about to end). Output so far includes the
    tokens resumed from the replay log; ``next_seq`` is the seq of the next event."""

    adm: Admission
    num_prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    # the text so far, in pieces: joined once at the end (appending to one str copies it
    # all, every step: O(n^2) over a long job)
    text_parts: list[str] = field(default_factory=list)
    next_seq: int = 0
    emitted_here: int = 0
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None

    @classmethod
    def from_admission(cls, adm: Admission) -> ActiveJob:
        return cls(adm, len(adm.prompt_token_ids), list(adm.resumed_token_ids),
                   [adm.resumed_text], adm.next_seq)

    @property
    def id(self) -> str:
        return self.adm.job_id

    @property
    def text(self) -> str:
        """The whole output text so far."""
        return "".join(self.text_parts)

    @property
    def deadline_ms(self) -> int | None:
        return self.adm.job.deadline_ms if self.adm.job else None

    def delta(self, token_ids: list[int], text: str) -> tuple:
        """One step's non-final event, as the row the PUBLISH script encodes into the
        event map: (entry id, job id, seq, token ids, text). Hot path (once per running
        job per step, on the loop feeding the GPU): no map, no Op, no encoding here."""
        self._record(token_ids, text)
        seq = self.next_seq
        self.next_seq = seq + 1
        return (self.adm.entry_id, self.adm.job_id, seq, token_ids, text)

    def finish(self, token_ids: list[int], text: str, finish_reason: str) -> Op:
        """The final op of a job that ends with this step's tokens (length, stop)."""
        self._record(token_ids, text)
        return self._op(Event(self.id, self.next_seq, token_ids, text, True,
                              finish_reason).to_map())

    def _record(self, token_ids: list[int], text: str) -> None:
        """This step's tokens and text join the output (the first ones set the TTFT)."""
        if self.first_token is None and token_ids:
            self.first_token = time.monotonic()
        self.token_ids += token_ids
        self.text_parts.append(text)
        self.emitted_here += len(token_ids)

    def end(self, finish_reason: str, error: JobError | None = None) -> Op:
        """The final op of a job ended without (more) tokens: cancelled, expired, error."""
        return self._op(Event(self.id, self.next_seq, [], "", True, finish_reason,
                              error.to_map() if error else None).to_map())

    def _op(self, ev: dict) -> Op:
        self.next_seq += 1
        result = None
        if ev["finished"]:
            ev["usage"] = {"prompt_tokens": self.num_prompt_tokens,
                           "completion_tokens": len(self.token_ids)}
            ev["timings"] = self.timings()
            result = Result(self.id, self.token_ids, self.text, ev["finish_reason"],
                            ev["error"], ev["usage"], ev["timings"]).to_map()
        return Op("publish", self.adm.entry_id, self.id, log_entry_id(ev["seq"]), ev,
                  ev["finished"], result)

    def timings(self) -> dict[str, float]:
        """queue_ms (submission to start here), ttft_ms and total_ms (on this worker)."""
        t = {"total_ms": round((time.monotonic() - self.started) * 1000, 2)}
        if self.first_token is not None:
            t["ttft_ms"] = round((self.first_token - self.started) * 1000, 2)
        job = self.adm.job
        if job is not None and job.submitted_ms is not None:
            t["queue_ms"] = max(0, now_ms() - int(t["total_ms"]) - job.submitted_ms)
        return t


def dead_letter(adm: Admission, error: JobError, worker: str) -> Op:
    """The dead-letter op of an entry (acks it too when no usable id can carry an event)."""
    fields = ("job", adm.raw or b"", "reason", error.code, "message", error.message,
              "deliveries", adm.deliveries, "worker", worker, "id", adm.job_id or "",
              "entry", adm.entry_id, "ts_ms", now_ms())
    return Op("dead", adm.entry_id, adm.job_id, fields=fields)
