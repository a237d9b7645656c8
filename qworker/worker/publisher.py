"""The publisher thread: every step's events for all jobs in one pipelined round trip.

The engine loop hands over a batch of ops per step and never waits for Redis. Ops run in
order, each a fenced Lua script (see ``scripts.py``): PUBLISH + XADD to the replay log,
and on a final event SET NX the result, XACK + XDEL. A step's non-final events travel as
one ``deltas`` op of plain rows, and the PUBLISH script builds their event maps inside
redis-server: the engine loop and this thread share one GIL, and a map plus an encode per
running job per step was the largest share of the worker's own Python. While Redis is
unreachable, batches queue up and are flushed in order once it is back (the scripts are
idempotent, so a batch cut off half-way is simply sent again). A refused password or a
missing ACL permission is not retried: the batch is dropped (its entries stay pending in
Redis and are reclaimed after their lease) and ``on_fatal`` stops the worker. So does
``on_crash`` when this thread dies of a bug: a worker that can no longer publish must not
keep holding (and renewing) its jobs, which then resume elsewhere after their lease.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import redis
import structlog

from qworker.worker.connection import (
    REDIS_ERRORS,
    Backoff,
    RedisAccessError,
    RedisSettings,
    access_error,
)
from qworker.worker.keys import Keys
from qworker.worker.scripts import ACK, DEAD_LETTER, HANDOFF, PUBLISH

log = structlog.get_logger("qworker.publisher")
RETRYABLE = ("NOSCRIPT", "LOADING", "BUSY", "OOM", "READONLY", "TRYAGAIN", "MASTERDOWN")


class Holdings:
    """The stream entries this worker holds (read, not yet acked): renewed by the lease
    loop, released when the publisher acks, hands off or loses them. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, str | None] = {}   # entry id -> job id

    def add(self, entry_id: str, job_id: str | None) -> None:
        with self._lock:
            self._jobs[entry_id] = job_id

    def release(self, entry_id: str) -> None:
        with self._lock:
            self._jobs.pop(entry_id, None)

    def snapshot(self) -> dict[str, str | None]:
        with self._lock:
            return dict(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)


@dataclass(slots=True)
class Op:
    """One fenced write for one stream entry (``kind``: publish | dead | handoff | ack), or
    one step's non-final events for many (``kind`` deltas: ``rows`` of (entry id, job id,
    seq, token ids, text), encoded by the PUBLISH script)."""

    kind: str
    entry_id: str
    job_id: str | None = None
    log_id: str = ""
    event: dict | None = None         # encoded here, off the engine loop
    final: bool = False
    result: dict | None = None
    fields: tuple = ()
    raw: bytes = b""
    rows: list[tuple] | None = None

    @property
    def releases(self) -> bool:
        """Whether this op ends our hold on the entry when it succeeds."""
        return self.final or self.kind in ("handoff", "ack") or (self.kind == "dead" and
                                                                  self.job_id is None)

    @property
    def events(self) -> int:
        """How many events (script items) this op writes: a batch is capped on these."""
        return 1 if self.rows is None else len(self.rows)


_PUBLISH_STATUS = {"o": "ok", "l": "lost", "d": "dup"}   # the PUBLISH script's reply chars
_EVENTS = ("publish", "deltas")                            # the PUBLISH script's ops


class Publisher(threading.Thread):
    """Runs ops in order on its own connection. ``on_lost(entry_id)`` is called for each
    entry that turned out not to be ours any more (fenced), from this thread."""

    def __init__(self, settings: RedisSettings, keys: Keys, consumer: str, holdings: Holdings,
                 on_lost: Callable[[str], None], ttl_s: int, dead_maxlen: int = 100_000,
                 max_batch: int = 512,
                 on_fatal: Callable[[RedisAccessError], None] | None = None,
                 on_crash: Callable[[Exception], None] | None = None):
        super().__init__(name="qworker-publisher", daemon=True)
        self.settings, self.keys, self.consumer = settings, keys, consumer
        self.holdings, self.on_lost, self.on_fatal = holdings, on_lost, on_fatal
        self.on_crash = on_crash
        self.crashed: Exception | None = None
        self.ttl_s, self.dead_maxlen, self.max_batch = ttl_s, dead_maxlen, max_batch
        self.q: queue.Queue[list[Op] | None] = queue.Queue()
        self.r: redis.Redis | None = None
        self.connected = threading.Event()
        self.sha: dict[str, str] = {}
        self.packb = msgpack.Packer(use_bin_type=True).pack   # reused: cheaper than packb()

    def submit(self, ops: list[Op]) -> None:
        """Queue one step's ops (never blocks)."""
        if ops:
            self.q.put(ops)

    def close(self, timeout: float) -> bool:
        """Flush what is queued (up to ``timeout`` s) and stop; True if all was sent."""
        self.q.put(None)
        self.join(timeout)
        return not self.is_alive() and self.crashed is None

    def pending(self) -> int:
        return self.q.qsize()

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:   # a bug (Redis errors are retried inside): stop the worker
            self.crashed = e
            log.exception("publisher crashed; the worker stops, its jobs resume elsewhere "
                          "after their lease", queued_batches=self.q.qsize())
            if self.on_crash is not None:
                self.on_crash(e)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = self.q.get()
            if batch is None:
                break
            ops = list(batch)
            events = sum(op.events for op in ops)
            while events < self.max_batch:  # catch up: several steps in one round trip
                try:
                    more = self.q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                ops.extend(more)
                events += sum(op.events for op in more)
            self._send(ops)

    def _send(self, ops: list[Op]) -> None:
        backoff = Backoff()
        while ops:
            try:
                if self.r is None:
                    self.r = self.settings.connect()
                    self.sha = {n: self.r.script_load(s) for n, s in
                                (("publish", PUBLISH), ("dead", DEAD_LETTER),
                                 ("handoff", HANDOFF), ("ack", ACK))}
                    self.connected.set()
                pipe = self.r.pipeline(transaction=False)
                calls = self._calls(ops)
                for call in calls:
                    self._add(pipe, call)
                replies = pipe.execute(raise_on_error=False)
            except (*REDIS_ERRORS, redis.RedisError) as e:   # incl. a refused SCRIPT LOAD
                if self._fatal(e):
                    return
                self.connected.clear()
                self.r = None
                log.warning("redis unreachable; publishing later", error=str(e),
                            queued_ops=len(ops))
                threading.Event().wait(backoff.next())
                continue
            retry = []
            for call, reply in zip(calls, replies, strict=True):
                if isinstance(reply, Exception):
                    if self._fatal(reply):
                        return
                    if isinstance(reply, REDIS_ERRORS) or str(reply).startswith(RETRYABLE):
                        retry += call
                    else:
                        log.error("publish op failed", op=call[0].kind, entry=call[0].entry_id,
                                  job_id=call[0].job_id, events=sum(o.events for o in call),
                                  error=str(reply))
                    continue
                if call[0].kind not in _EVENTS:
                    self._done(call[0], reply.decode() if isinstance(reply, bytes) else reply)
                    continue
                statuses = reply.decode() if isinstance(reply, bytes) else reply
                if statuses.count("o") == len(statuses):  # the usual case: all published
                    for op in call:
                        if op.releases:
                            self.holdings.release(op.entry_id)
                    continue
                it = iter(statuses)
                for op in call:
                    if op.rows is None:
                        self._done(op, _PUBLISH_STATUS[next(it)])
                        continue
                    for row in op.rows:                   # deltas never release an entry
                        status = next(it)
                        if status != "o":
                            self._done(Op("publish", row[0], row[1]), _PUBLISH_STATUS[status])
            if retry:
                if any(str(r).startswith("NOSCRIPT") for r in replies if isinstance(r, Exception)):
                    self.r = None  # Redis restarted without our scripts: reload them
                threading.Event().wait(backoff.next())
            ops = retry

    def _fatal(self, e: BaseException) -> bool:
        """True (and ``on_fatal`` told) when ``e`` means Redis refuses us for good."""
        fatal = access_error(e, self.settings.url)
        if fatal is None:
            return False
        self.r = None
        log.error("redis refused access; dropping queued ops", error=str(fatal))
        if self.on_fatal is not None:
            self.on_fatal(fatal)
        return True

    @staticmethod
    def _calls(ops: list[Op]) -> list[list[Op]]:
        """Consecutive publish and deltas ops become one script call; others go one by one
        (in order)."""
        calls: list[list[Op]] = []
        for op in ops:
            if op.kind in _EVENTS and calls and calls[-1][0].kind in _EVENTS:
                calls[-1].append(op)
            else:
                calls.append([op])
        return calls

    def _add(self, pipe: redis.client.Pipeline, call: list[Op]) -> None:
        k, op = self.keys, call[0]
        base = (k.group, self.consumer, op.entry_id)
        if op.kind in _EVENTS:
            packb, items = self.packb, []
            for o in call:
                if o.rows is not None:
                    items += o.rows
                else:
                    items.append((o.entry_id, o.job_id, o.log_id, packb(o.event), int(o.final),
                                  packb(o.result) if o.final else b""))
            pipe.evalsha(self.sha["publish"], 0, k.prefix, k.group, self.consumer, self.ttl_s,
                         msgpack.packb(items, use_bin_type=False))   # Lua's cmsgpack: no bin
        elif op.kind == "dead":
            pipe.evalsha(self.sha["dead"], 2, k.jobs, k.dead, *base,
                         int(op.job_id is None), self.dead_maxlen, *op.fields)
        elif op.kind == "handoff":
            pipe.evalsha(self.sha["handoff"], 1, k.jobs, *base, op.raw, self.consumer)
        else:
            pipe.evalsha(self.sha["ack"], 1, k.jobs, *base)

    def _done(self, op: Op, reply: object) -> None:
        if reply in ("lost", 0, "dup"):
            self.holdings.release(op.entry_id)
            if reply != 0 or op.kind not in ("handoff", "ack"):
                log.warning("entry no longer ours; not publishing for it", entry=op.entry_id,
                            job_id=op.job_id, reason=reply)
                self.on_lost(op.entry_id)
        elif op.releases:
            self.holdings.release(op.entry_id)
