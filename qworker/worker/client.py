"""Producer-side API: submit jobs, stream their tokens, wait for results, cancel.

    c = Client("redis://localhost:6379/0")
    job_id = c.submit(prompt="Hello", max_tokens=32, temperature=0.0)
    for ev in c.stream(job_id):
        print(ev.text, end="")
    res = c.result(job_id, timeout=60)

``stream()`` subscribes to the live channel first, then replays the log, so a caller that
starts late (or reconnects) misses nothing and sees no seq twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import redis

from qworker.worker.aclient import AsyncClient
from qworker.worker.connection import REDIS_ERRORS, Backoff, RedisSettings
from qworker.worker.keys import Keys
from qworker.worker.protocol import Event, Result, unpack
from qworker.worker.streaming import StreamCursor, build_job, decode_event

__all__ = ["Client", "AsyncClient", "Event", "Result"]
CANCEL_TTL_S = 86_400


class Client:
    """Synchronous client. ``prefix`` must match the workers' ``--prefix``."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "qworker",
                 r: redis.Redis | None = None):
        self.settings = RedisSettings.from_url(url)
        self.keys = Keys(prefix)
        self.r = r or self.settings.connect()

    def submit(self, prompt: str | None = None, **kw: Any) -> str:
        """Enqueue one job; returns its id. Keywords: messages, prompt_token_ids, job_id,
        priority, deadline (seconds from now), tenant, and any SamplingParams field."""
        job_id, raw = build_job(prompt, **kw)
        self.r.xadd(self.keys.jobs, {"job": raw})
        return job_id

    def cancel(self, job_id: str) -> None:
        """Ask the workers to stop ``job_id``; it ends ``cancelled`` and is not retried."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.keys.cancelled(job_id), 1, ex=CANCEL_TTL_S)
        pipe.publish(self.keys.cancel, job_id)
        pipe.execute()

    def get_result(self, job_id: str) -> Result | None:
        """The stored result, or None if the job has not finished."""
        raw = self.r.get(self.keys.result(job_id))
        return Result.from_map(unpack(raw)) if raw is not None else None

    def result(self, job_id: str, timeout: float | None = 60.0) -> Result:
        """Wait for the final result; TimeoutError after ``timeout`` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        backoff = Backoff()
        while True:
            try:
                ps = self.r.pubsub(ignore_subscribe_messages=True)
                ps.subscribe(self.keys.out(job_id))
                try:
                    while True:
                        res = self.get_result(job_id)
                        if res is not None:
                            return res
                        left = 1.0 if end is None else min(1.0, end - time.monotonic())
                        if left <= 0:
                            raise TimeoutError(f"job {job_id} has no result after {timeout} s")
                        ps.get_message(timeout=left)
                finally:
                    ps.close()
            except REDIS_ERRORS:
                _outage_pause(job_id, end, backoff)

    def stream(self, job_id: str, timeout: float | None = None) -> Iterator[Event]:
        """Every event of ``job_id`` in seq order, from the replay log then live; ends
        after the finished event. Survives Redis reconnects. TimeoutError after
        ``timeout`` seconds without the end."""
        end = None if timeout is None else time.monotonic() + timeout
        cur, backoff = StreamCursor(), Backoff()
        while not cur.finished:
            try:
                ps = self.r.pubsub(ignore_subscribe_messages=True)
                ps.subscribe(self.keys.out(job_id))
                try:
                    yield from self._backfill(job_id, cur)
                    while not cur.finished:
                        left = 1.0 if end is None else min(1.0, end - time.monotonic())
                        if left <= 0:
                            raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
                        msg = ps.get_message(timeout=left)
                        ev = decode_event(msg["data"]) if msg else None
                        verdict = cur.accept(ev) if ev else "gap"  # idle: look in the log
                        if verdict == "take":
                            yield ev
                        elif verdict == "gap":
                            yield from self._backfill(job_id, cur)
                        backoff.reset()
                finally:
                    ps.close()
            except REDIS_ERRORS:
                _outage_pause(job_id, end, backoff)

    def _backfill(self, job_id: str, cur: StreamCursor) -> Iterator[Event]:
        for _, fields in self.r.xrange(self.keys.log(job_id), min=cur.log_start):
            ev = decode_event(fields[b"event"])
            if cur.accept(ev) == "take":
                yield ev
        if not cur.finished and cur.next_seq == 0:  # log expired or never written
            res = self.get_result(job_id)
            if res is not None:
                cur.finished = True
                yield Event(job_id, 0, res.token_ids, res.text, True, res.finish_reason,
                            res.error, res.usage, res.timings)

    def generate(self, prompt: str | None = None, timeout: float | None = 600.0,
                 **kw: Any) -> Result:
        """Submit and wait for the result."""
        return self.result(self.submit(prompt, **kw), timeout=timeout)

    def close(self) -> None:
        self.r.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _outage_pause(job_id: str, end: float | None, backoff: Backoff) -> None:
    """Redis is unreachable: wait the next backoff delay, or give up at the deadline."""
    if end is not None and time.monotonic() >= end:
        raise TimeoutError(f"job {job_id}: Redis unreachable until the timeout") from None
    time.sleep(backoff.next())
