"""Background threads that keep Redis I/O off the engine loop.

``Feeder``: every tick renews the leases of held entries, writes the heartbeat, re-checks
cancel markers, reclaims stale entries; in between it pulls new entries, never more than
the engine's capacity allows (``Budget``), blocking on the stream only briefly.
``CancelListener``: follows the cancel channel, and acts only on ids whose cancel
marker exists (the channel is shared: a stray publish must not cancel anyone's job). Both
reconnect with backoff and put what they learn on the engine loop's inbox as ``(kind,
payload)`` tuples: ("admit", Admission), ("lost", entry_id), ("cancel", job_id). A refused
password or a missing ACL permission is not retried: ``on_fatal(RedisAccessError)``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog

from qworker.worker.connection import (
    REDIS_ERRORS,
    Backoff,
    RedisAccessError,
    RedisSettings,
    access_error,
)
from qworker.worker.intake import Intake
from qworker.worker.keys import Keys
from qworker.worker.protocol import pack
from qworker.worker.publisher import Holdings

log = structlog.get_logger("qworker.feeder")


class Budget:
    """How many more entries the worker may pull: the engine's last reported capacity
    minus the admissions handed over since then, and never past ``limit`` entries held
    at once (``held()``: read and not yet acked, finished jobs awaiting their ack
    included), so a backlog stays in Redis. Thread-safe."""

    def __init__(self, held: Callable[[], int] = lambda: 0, limit: int = 1 << 30) -> None:
        self._cond = threading.Condition()
        self._capacity = 0
        self._queued = 0
        self._held, self.limit = held, limit

    def report(self, capacity: int, consumed: int) -> None:
        """From the engine loop: current capacity, and how many admissions it took."""
        with self._cond:
            self._capacity = capacity
            self._queued = max(0, self._queued - consumed)
            if self.want() > 0:
                self._cond.notify_all()

    def take(self, n: int) -> None:
        with self._cond:
            self._queued += n

    def want(self) -> int:
        return max(0, min(self._capacity - self._queued, self.limit - self._held()))

    def wait(self, timeout: float) -> None:
        with self._cond:
            if self.want() == 0:
                self._cond.wait(timeout)


class Feeder(threading.Thread):
    """Intake and lease maintenance on its own connection."""

    def __init__(self, settings: RedisSettings, intake: Intake, holdings: Holdings,
                 inbox: queue.Queue, budget: Budget, lease_ms: int,
                 heartbeat: Callable[[], dict], metrics: Any = None,
                 on_fatal: Callable[[RedisAccessError], None] | None = None):
        super().__init__(name="qworker-feeder", daemon=True)
        self.settings, self.intake, self.holdings = settings, intake, holdings
        self.inbox, self.budget, self.lease_ms = inbox, budget, lease_ms
        self.heartbeat, self.metrics, self.on_fatal = heartbeat, metrics, on_fatal
        self.tick = min(lease_ms / 3000, 1.0)   # renew well inside the lease
        self.block_ms = max(10, int(self.tick * 500))
        self.intake_open = threading.Event()
        self.intake_open.set()
        self.done = threading.Event()
        self.keys: Keys = intake.keys

    def run(self) -> None:
        backoff, next_tick, connected = Backoff(), 0.0, False
        while not self.done.is_set():
            try:
                if not connected:
                    self.intake.bind(self.settings.connect())
                    connected = True
                    log.info("feeder connected")
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self.tick
                    self._maintain()
                if not self.intake_open.is_set():
                    self.done.wait(max(0.0, next_tick - time.monotonic()))
                elif self.budget.want() == 0:
                    self.budget.wait(max(0.0, next_tick - time.monotonic()))
                else:
                    self._pull()
                backoff.reset()
            except Exception as e:  # never let a bug kill intake silently
                fatal = access_error(e, self.settings.url)
                if fatal is not None:
                    if self.on_fatal is not None:
                        self.on_fatal(fatal)
                    break
                if isinstance(e, REDIS_ERRORS):
                    connected = False
                    delay = backoff.next()
                    log.warning("redis unreachable; retrying", error=str(e),
                                retry_in_s=round(delay, 2))
                    self.done.wait(delay)
                else:
                    log.exception("feeder error")
                    self.done.wait(backoff.next())
        self._say_goodbye()

    def _maintain(self) -> None:
        held = self.holdings.snapshot()
        for entry_id in self.intake.renew(list(held)):
            self.holdings.release(entry_id)
            self.inbox.put(("lost", entry_id))
        ids = [j for j in held.values() if j]
        if ids:
            r = self.intake.r
            flags = r.pipeline(transaction=False)
            for j in ids:
                flags.exists(self.keys.cancelled(j))
            for j, flag in zip(ids, flags.execute(), strict=True):
                if flag:
                    self.inbox.put(("cancel", j))
        beat = self.heartbeat()
        beat["jobs"] = pack(ids)
        key = self.keys.worker(self.intake.consumer)
        pipe = self.intake.r.pipeline(transaction=False)
        pipe.hset(key, mapping=beat)
        pipe.expire(key, max(5, int(self.tick * 5) + 1))
        pipe.xlen(self.keys.jobs)
        pipe.xpending(self.keys.jobs, self.keys.group)
        *_, length, pending = pipe.execute()
        if self.metrics is not None:
            self.metrics.set_queue(length, pending["pending"])
        if self.intake_open.is_set() and self.budget.want() > 0:
            claimed = self.intake.reclaim(self.budget.want(), self.lease_ms, set(held))
            # Our own entries come back if a renewal was late (e.g. Redis was away): they
            # are still running here, so they are not admitted twice.
            claimed = [c for c in claimed if c[0] not in held]
            if claimed and self.metrics is not None:
                self.metrics.reclaimed(len(claimed))
            if claimed:
                log.info("reclaimed stale entries", entries=[c[0] for c in claimed],
                         deliveries=[c[2] for c in claimed])
            self._admit(claimed)

    def _pull(self) -> None:
        entries = self.intake.read(self.budget.want(), self.block_ms)
        self._admit([(i, f, 1) for i, f in entries])

    def _admit(self, entries: list) -> None:
        if not entries:
            return
        for entry_id, _, _ in entries:
            self.holdings.add(entry_id, None)
        self.budget.take(len(entries))
        for adm in self.intake.admit(entries):
            self.holdings.add(adm.entry_id, adm.job_id)
            self.inbox.put(("admit", adm))

    def _say_goodbye(self) -> None:
        try:
            if self.intake.r is not None:
                self.intake.r.delete(self.keys.worker(self.intake.consumer))
        except redis.RedisError:
            pass


class CancelListener(threading.Thread):
    """Follows the cancel channel; a cancel for a job we hold goes to the inbox, but only
    once its ``cancelled:{id}`` marker is seen (producers SET it before they PUBLISH)."""

    def __init__(self, settings: RedisSettings, keys: Keys, holdings: Holdings,
                 inbox: queue.Queue,
                 on_fatal: Callable[[RedisAccessError], None] | None = None):
        super().__init__(name="qworker-cancel", daemon=True)
        self.settings, self.keys, self.holdings, self.inbox = settings, keys, holdings, inbox
        self.on_fatal = on_fatal
        self.done = threading.Event()

    def run(self) -> None:
        backoff = Backoff()
        while not self.done.is_set():
            r = self.settings.connect()
            ps = r.pubsub(ignore_subscribe_messages=True)
            try:
                ps.subscribe(self.keys.cancel)
                backoff.reset()
                while not self.done.is_set():
                    msg = ps.get_message(timeout=0.2)
                    if msg and msg["type"] == "message":
                        job_id = msg["data"].decode(errors="replace")
                        if job_id not in self.holdings.snapshot().values():
                            continue
                        if r.exists(self.keys.cancelled(job_id)):
                            self.inbox.put(("cancel", job_id))
                        else:
                            log.warning("cancel without its marker ignored", job_id=job_id)
            except Exception as e:
                fatal = access_error(e, self.settings.url)
                if fatal is not None:
                    if self.on_fatal is not None:
                        self.on_fatal(fatal)
                    return
                if not isinstance(e, REDIS_ERRORS):
                    log.exception("cancel listener error")
                self.done.wait(backoff.next())
            finally:
                _close(ps, r)


def _close(*clients: Any) -> None:
    for c in clients:
        try:
            c.close()
        except Exception:  # noqa: BLE001 (a broken connection may fail to close)
            pass
