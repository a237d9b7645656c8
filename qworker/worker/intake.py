"""Reading jobs from the stream: XREADGROUP, XAUTOCLAIM reclaim, lease renewal, admission.

``Intake`` only talks to Redis and turns stream entries into ``Admission`` records that
the engine loop can act on without any further I/O: the job is decoded and validated,
tokenized, checked against its result / cancel marker / deadline, and, when it was
delivered before, its replay log is read so it resumes at the next ``seq``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from qworker.worker.keys import Keys
from qworker.worker.protocol import (
    MAX_JOB_BYTES,
    Event,
    Job,
    JobError,
    peek_id,
    seq_of_entry_id,
    unpack,
    validate_job,
)
from qworker.worker.scripts import RENEW


@dataclass(slots=True)
class Admission:
    """One stream entry, ready for the engine loop.

    ``outcome`` is None to run the job, or "duplicate" (already finished: ack only),
    "cancelled", "expired", "error" (see ``error``) to end it without GPU work.
    """

    entry_id: str
    raw: bytes | None
    deliveries: int = 1
    job: Job | None = None
    job_id: str | None = None
    outcome: str | None = None
    error: JobError | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    resumed_token_ids: list[int] = field(default_factory=list)
    resumed_text: str = ""
    next_seq: int = 0


def derived_seed(job_id: str) -> int:
    """The sampling seed of a sampled job that gave none: fixed per job id, so a resumed
    job continues exactly as the interrupted run would have."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") >> 1


def parse_autoclaim(reply: list[Any]) -> tuple[str, list[tuple[str | None, Any]], list[str]]:
    """XAUTOCLAIM reply -> (next cursor, [(entry id, fields)], deleted ids).

    Redis 7 replies [cursor, entries, deleted ids] and drops deleted entries from the
    PEL; Redis 6.2 replies [cursor, entries] with a nil (here ``(None, None)``) for an
    entry deleted while pending, which stays pending until acked.
    """
    cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    entries = [(None if i is None else (i.decode() if isinstance(i, bytes) else i), f)
               for i, f in (reply[1] or [])]
    deleted = [d.decode() if isinstance(d, bytes) else d for d in (reply[2] or [])] \
        if len(reply) > 2 else []
    return cursor, entries, deleted


class Intake:
    """The Redis side of pulling jobs for one consumer (not thread-safe: one thread)."""

    def __init__(self, keys: Keys, consumer: str, tokenizer: Any, vocab_size: int,
                 max_model_len: int, max_deliveries: int = 3, max_job_bytes: int = MAX_JOB_BYTES):
        self.keys, self.consumer, self.tokenizer = keys, consumer, tokenizer
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.max_deliveries, self.max_job_bytes = max_deliveries, max_job_bytes
        self.cursor = "0-0"
        self.r: redis.Redis | None = None
        self._renew = None

    def bind(self, r: redis.Redis) -> None:
        """Use a (new) connection; creates the consumer group if it is missing."""
        self.r = r
        self._renew = r.register_script(RENEW)
        try:  # from id 0: jobs queued before the first worker started are served too
            r.xgroup_create(self.keys.jobs, self.keys.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def read(self, count: int, block_ms: int) -> list[tuple[str, dict]]:
        """New entries for this consumer, at most ``count``; blocks up to ``block_ms``."""
        reply = self.r.xreadgroup(self.keys.group, self.consumer, {self.keys.jobs: ">"},
                                  count=count, block=block_ms)
        return [(i.decode(), f) for _, entries in (reply or []) for i, f in entries]

    def reclaim(self, count: int, min_idle_ms: int, held: set[str]) -> list[tuple[str, dict, int]]:
        """Claim up to ``count`` entries idle longer than ``min_idle_ms`` (stale leases).
        Returns (entry id, fields, deliveries); entries deleted while pending are acked."""
        reply = self.r.xautoclaim(self.keys.jobs, self.keys.group, self.consumer,
                                  min_idle_ms, self.cursor, count=count)
        self.cursor, entries, deleted = parse_autoclaim(reply)
        if deleted:
            self.r.xack(self.keys.jobs, self.keys.group, *deleted)
        live = [(i, f) for i, f in entries if i is not None and f is not None]
        if len(live) < len(entries):  # Redis 6.2: find the ids of the deleted entries
            mine = self.r.xpending_range(self.keys.jobs, self.keys.group, "-", "+", 1000,
                                         consumername=self.consumer)
            keep = held | {i for i, _ in live}
            gone = [p["message_id"] for p in mine if p["message_id"].decode() not in keep]
            if gone:
                self.r.xack(self.keys.jobs, self.keys.group, *gone)
        if not live:
            return []
        pipe = self.r.pipeline(transaction=False)
        for i, _ in live:
            pipe.xpending_range(self.keys.jobs, self.keys.group, i, i, 1)
        counts = [p[0]["times_delivered"] if p else 1 for p in pipe.execute()]
        return [(i, f, n) for (i, f), n in zip(live, counts, strict=True)]

    def renew(self, entry_ids: list[str]) -> list[str]:
        """Reset the idle time of our entries; returns the ones we no longer own."""
        if not entry_ids:
            return []
        lost = self._renew(keys=[self.keys.jobs],
                           args=[self.keys.group, self.consumer, *entry_ids])
        return [i.decode() if isinstance(i, bytes) else i for i in lost]

    # ---- admission -----------------------------------------------------------------
    def admit(self, entries: list[tuple[str, dict, int]]) -> list[Admission]:
        """Decode, validate and tokenize entries; read result, cancel marker and replay
        log of each usable job in one round trip."""
        adms = [self._decode(i, f, n) for i, f, n in entries]
        usable = [a for a in adms if a.job is not None]
        if usable:
            pipe = self.r.pipeline(transaction=False)
            for a in usable:
                pipe.exists(self.keys.result(a.job_id))
                pipe.exists(self.keys.cancelled(a.job_id))
                pipe.xrange(self.keys.log(a.job_id))
            replies = pipe.execute()
            for k, a in enumerate(usable):
                self._classify(a, *replies[3 * k: 3 * k + 3])
        return adms

    def _decode(self, entry_id: str, fields: dict, deliveries: int) -> Admission:
        raw = fields.get(b"job") if isinstance(fields, dict) else None
        adm = Admission(entry_id, raw, deliveries)
        try:
            if raw is None:
                raise JobError("invalid_payload", "the stream entry has no 'job' field")
            obj = unpack(raw, self.max_job_bytes)
            adm.job_id = peek_id(obj)
            adm.job = validate_job(obj)
        except JobError as e:
            adm.outcome, adm.error, adm.job = "error", e, None
        return adm

    def _classify(self, a: Admission, has_result: int, cancelled: int, log: list) -> None:
        for entry_id, fields in log:
            ev = Event.from_map(unpack(fields[b"event"]))
            a.resumed_token_ids += ev.token_ids
            a.resumed_text += ev.text
            a.next_seq = seq_of_entry_id(entry_id) + 1
            if ev.finished:
                has_result = 1
        job = a.job
        if has_result:
            a.outcome = "duplicate"
        elif cancelled:
            a.outcome = "cancelled"
        elif job.deadline_ms is not None and job.deadline_ms <= time.time() * 1000:
            a.outcome = "expired"
        elif a.deliveries > self.max_deliveries:
            a.outcome, a.error = "error", JobError(
                "too_many_deliveries", f"the job was delivered {a.deliveries - 1} times "
                f"(max_deliveries={self.max_deliveries}) without finishing: every worker "
                "that took it crashed or lost it; it is dead-lettered")
        else:
            try:
                a.prompt_token_ids = self._tokenize(job)
            except JobError as e:
                a.outcome, a.error = "error", e
            if job.params.seed is None and not job.params.greedy:
                job.params.seed = derived_seed(job.id)

    def _tokenize(self, job: Job) -> list[int]:
        if job.prompt_token_ids is not None:
            ids = job.prompt_token_ids
        elif self.tokenizer is None:
            raise JobError("invalid_prompt", "this worker's model has no tokenizer: send "
                           "prompt_token_ids instead of prompt or messages")
        else:
            # A prompt far longer than the context cannot fit: refuse before tokenizing.
            text = job.prompt if job.prompt is not None else "".join(
                m["content"] for m in job.messages)
            if len(text) > 64 * self.max_model_len:
                raise JobError("prompt_too_long", f"the prompt has {len(text)} characters; "
                               f"this worker takes at most {self.max_model_len - 1} tokens")
            try:
                if job.messages is not None:
                    text = self.tokenizer.apply_chat_template(
                        job.messages, add_generation_prompt=True, tokenize=False)
                    ids = self.tokenizer.encode(text, add_special_tokens=False)
                else:
                    ids = self.tokenizer.encode(job.prompt)
            except Exception as e:  # a chat template may reject roles or orderings
                raise JobError("invalid_prompt", f"cannot render/tokenize the prompt: "
                               f"{type(e).__name__}: {str(e)[:200]}") from None
        bad = max(ids, default=None)          # C speed; the message names the largest
        if bad is not None and bad >= self.vocab_size:
            raise JobError("invalid_prompt", f"token id {bad} is outside the vocabulary "
                           f"[0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise JobError("prompt_too_long", f"the prompt has {len(ids)} tokens; this worker "
                           f"takes at most {self.max_model_len - 1} (max_model_len "
                           f"{self.max_model_len} includes the output)")
        return list(ids)
