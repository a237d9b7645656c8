"""AsyncClient: the asyncio twin of ``Client`` (same methods, awaited)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio

from qworker.worker.connection import REDIS_ERRORS, Backoff, RedisSettings
from qworker.worker.keys import Keys
from qworker.worker.protocol import Event, Result, unpack
from qworker.worker.streaming import StreamCursor, build_job, decode_event

CANCEL_TTL_S = 86_400


class AsyncClient:
    """asyncio client: ``await submit(...)``, ``async for ev in stream(id)``, ..."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "qworker",
                 r: redis.asyncio.Redis | None = None):
        self.settings = RedisSettings.from_url(url)
        self.keys = Keys(prefix)
        self.r = r or self.settings.connect_async()

    async def submit(self, prompt: str | None = None, **kw: Any) -> str:
        """Enqueue one job; returns its id (keywords as ``Client.submit``)."""
        job_id, raw = build_job(prompt, **kw)
        await self.r.xadd(self.keys.jobs, {"job": raw})
        return job_id

    async def cancel(self, job_id: str) -> None:
        """Ask the workers to stop ``job_id``."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.cancelled(job_id), 1, ex=CANCEL_TTL_S)
            pipe.publish(self.keys.cancel, job_id)
            await pipe.execute()

    async def get_result(self, job_id: str) -> Result | None:
        raw = await self.r.get(self.keys.result(job_id))
        return Result.from_map(unpack(raw)) if raw is not None else None

    async def result(self, job_id: str, timeout: float | None = 60.0) -> Result:
        """Wait for the final result (it is the last event of the stream)."""
        res = await self.get_result(job_id)
        if res is not None:
            return res
        async for _ in self.stream(job_id, timeout=timeout):
            pass
        end = time.monotonic() + 5
        while (res := await self.get_result(job_id)) is None:
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} finished but its result is missing")
            await asyncio.sleep(0.05)
        return res

    async def stream(self, job_id: str, timeout: float | None = None) -> AsyncIterator[Event]:
        """Every event of ``job_id`` in seq order, log first then live (see Client.stream)."""
        end = None if timeout is None else time.monotonic() + timeout
        cur, backoff = StreamCursor(), Backoff()
        while not cur.finished:
            try:
                ps = self.r.pubsub(ignore_subscribe_messages=True)
                await ps.subscribe(self.keys.out(job_id))
                try:
                    for ev in await self._backfill(job_id, cur):
                        yield ev
                    while not cur.finished:
                        left = 1.0 if end is None else min(1.0, end - time.monotonic())
                        if left <= 0:
                            raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
                        msg = await ps.get_message(timeout=left)
                        ev = decode_event(msg["data"]) if msg else None
                        verdict = cur.accept(ev) if ev else "gap"
                        if verdict == "take":
                            yield ev
                        elif verdict == "gap":
                            for e in await self._backfill(job_id, cur):
                                yield e
                        backoff.reset()
                finally:
                    await ps.aclose()
            except REDIS_ERRORS:
                if end is not None and time.monotonic() >= end:
                    raise TimeoutError(f"job {job_id}: Redis unreachable until the timeout") \
                        from None
                await asyncio.sleep(backoff.next())

    async def _backfill(self, job_id: str, cur: StreamCursor) -> list[Event]:
        out = []
        for _, fields in await self.r.xrange(self.keys.log(job_id), min=cur.log_start):
            ev = decode_event(fields[b"event"])
            if cur.accept(ev) == "take":
                out.append(ev)
        if not cur.finished and cur.next_seq == 0:
            res = await self.get_result(job_id)
            if res is not None:
                cur.finished = True
                out.append(Event(job_id, 0, res.token_ids, res.text, True, res.finish_reason,
                                 res.error, res.usage, res.timings))
        return out

    async def generate(self, prompt: str | None = None, timeout: float | None = 600.0,
                       **kw: Any) -> Result:
        """Submit and wait for the result."""
        return await self.result(await self.submit(prompt, **kw), timeout=timeout)

    async def aclose(self) -> None:
        await self.r.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
