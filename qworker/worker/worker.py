"""The worker: one engine loop fed by a Redis stream.

    bootstrap -> signal handlers -> loop {inbox (admissions, cancels, lost leases),
    deadlines, engine step, publish} -> drain -> teardown

The loop itself never touches Redis: the Feeder thread pulls and renews leases, the
Publisher thread writes events and results, the CancelListener follows cancellations.
So generation goes on while Redis is away, and nothing the loop produced is dropped.
A refused password or a missing ACL permission is different: nothing will fix it by
retrying, so the worker stops and ``run()`` raises ``RedisAccessError``. If the publisher
thread dies of a bug, the worker stops at once too (``run()`` raises ``WorkerCrashed``):
its jobs stay pending in Redis and resume on another worker after their lease.

Observability: the loop feeds a ``WorkerMetrics`` (qworker/metrics.py; served by the CLI's
``--metrics-port``) and writes one ``job finished`` line per job (``logs.job_summary``);
every per-job line is written through a logger with the job id bound.
"""

from __future__ import annotations

import gc
import os
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from qworker.logs import job_logger, job_summary, redact_url
from qworker.metrics import WorkerMetrics
from qworker.worker.connection import REDIS_ERRORS, RedisAccessError, RedisSettings, access_error
from qworker.worker.feeder import Budget, CancelListener, Feeder
from qworker.worker.intake import Admission, Intake
from qworker.worker.jobs import ActiveJob, dead_letter, now_ms
from qworker.worker.keys import Keys
from qworker.worker.protocol import MAX_JOB_BYTES, JobError
from qworker.worker.publisher import Holdings, Op, Publisher
from qworker.worker.scripts import ACK, DEAD_LETTER, HANDOFF, PUBLISH, RENEW

log = structlog.get_logger("qworker.worker")


class WorkerCrashed(RuntimeError):
    """A thread the loop depends on died of a bug; the worker stopped without draining."""


@dataclass(slots=True)
class WorkerSettings:
    """Knobs of one worker (the CLI maps ``--lease-ms`` etc. onto these)."""

    redis: RedisSettings
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    keys: Keys = Keys()
    lease_ms: int = 30_000
    max_deliveries: int = 3
    drain_timeout: float = 30.0
    result_ttl_s: int = 86_400
    max_job_bytes: int = MAX_JOB_BYTES
    dead_maxlen: int = 100_000


def check_redis_access(settings: WorkerSettings) -> str | None:
    """Try the worker's credentials and a few of its commands once, before the model loads.

    Raises ``RedisAccessError`` when Redis refuses the password or a command (ACL); returns
    the error text when Redis is merely unreachable (the worker then keeps retrying with
    backoff), None when all is well. Creates the consumer group (as the worker would)."""
    keys, r = settings.keys, settings.redis.connect()
    try:
        r.ping()
        try:
            r.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        r.xpending(keys.jobs, keys.group)
        for script in (PUBLISH, DEAD_LETTER, HANDOFF, RENEW, ACK):
            r.script_load(script)
        return None
    except (*REDIS_ERRORS, redis.RedisError) as e:
        fatal = access_error(e, settings.redis.url)
        if fatal is not None:
            raise fatal from None
        if not isinstance(e, REDIS_ERRORS):
            raise
        return str(e)
    finally:
        r.close()


class Worker:
    """Drives ``engine`` (the Engine API of docs/design.md) from the job stream.
    ``metrics``: where the loop reports (a fresh ``WorkerMetrics`` if not given)."""

    def __init__(self, engine: Any, settings: WorkerSettings, model_name: str = "",
                 metrics: WorkerMetrics | None = None):
        self.engine, self.s, self.model_name = engine, settings, model_name
        self.metrics = metrics or WorkerMetrics(worker=settings.name, model=model_name)
        self.fatal: RedisAccessError | WorkerCrashed | None = None
        self.inbox: queue.Queue = queue.Queue()
        self.holdings = Holdings()
        limit = getattr(getattr(engine, "config", None), "max_num_seqs", 1 << 30)
        self.budget = Budget(held=lambda: len(self.holdings), limit=limit)
        self.active: dict[str, ActiveJob] = {}          # job id -> state
        self.cancels: dict[str, float] = {}               # cancel seen before admission
        self.ops: list[Op] = []                           # this iteration's writes
        self.stopping = threading.Event()
        self.drain_deadline: float | None = None
        self.next_deadline: float = float("inf")          # earliest job deadline (ms)
        self.tokens_out, self._beat = 0, {}

        intake = Intake(settings.keys, settings.name, engine.tokenizer, engine.vocab_size,
                        engine.max_model_len, settings.max_deliveries, settings.max_job_bytes)
        on_fatal = lambda e: self.inbox.put(("fatal", e))  # noqa: E731
        self.feeder = Feeder(settings.redis, intake, self.holdings, self.inbox, self.budget,
                             settings.lease_ms, self.heartbeat, self.metrics, on_fatal)
        self.publisher = Publisher(settings.redis, settings.keys, settings.name, self.holdings,
                                   lambda e: self.inbox.put(("lost", e)), settings.result_ttl_s,
                                   settings.dead_maxlen, on_fatal=on_fatal,
                                   on_crash=lambda e: self.inbox.put(("crash", e)))
        self.cancel_listener = CancelListener(settings.redis, settings.keys, self.holdings,
                                              self.inbox, on_fatal)

    # ---- lifecycle -----------------------------------------------------------------
    def run(self, install_signals: bool = True) -> None:
        """Serve until stopped (SIGTERM/SIGINT or ``stop()``), then drain and return.
        Raises ``RedisAccessError`` (after stopping) when Redis refuses the credentials or
        a command the worker needs."""
        if install_signals:
            signal.signal(signal.SIGTERM, lambda *_: self.stop())
            signal.signal(signal.SIGINT, lambda *_: self.stop())
            # The engine loop gets the GIL back soon after a GPU sync even while a Redis
            # thread is busy (the default 5 ms switch interval would stall each step).
            sys.setswitchinterval(0.0005)
        log.info("worker starting", name=self.s.name, model=self.model_name,
                 redis=redact_url(self.s.redis.url), lease_ms=self.s.lease_ms,
                 max_deliveries=self.s.max_deliveries)
        self._report_capacity(0)
        for t in (self.publisher, self.cancel_listener, self.feeder):
            t.start()
        # What is alive now (model, tokenizer, graphs, modules: ~300k objects) is never
        # garbage: freeze it out of the collector's sight. Otherwise each full collection
        # rescans it all (>100 ms with a model loaded), a stall of the loop feeding the GPU.
        gc.collect()
        gc.freeze()
        try:
            while self._iterate():
                pass
        finally:
            gc.unfreeze()
            self._teardown()
        if self.fatal is not None:
            raise self.fatal

    def stop(self, drain_timeout: float | None = None) -> None:
        """Stop pulling; finish running jobs within the drain timeout; hand back the rest.
        A second call hands everything back at once."""
        timeout = self.s.drain_timeout if drain_timeout is None else drain_timeout
        if self.stopping.is_set():
            timeout = 0.0
        self.drain_deadline = time.monotonic() + timeout
        self.feeder.intake_open.clear()
        self.stopping.set()   # flags only: this may run inside a signal handler

    def _teardown(self) -> None:
        self.feeder.done.set()
        self.feeder.join(5)
        self.stopping.set()
        self._drain_inbox(block=False)    # entries read at the last moment: handed back
        self._flush()
        flushed = self.publisher.close(timeout=2.0 if self.fatal else
                                       max(5.0, self.s.lease_ms / 1000))
        self.cancel_listener.done.set()
        log.info("worker stopped", name=self.s.name, flushed=flushed,
                 unflushed_batches=self.publisher.pending())

    # ---- the loop ------------------------------------------------------------------
    def _iterate(self) -> bool:
        self.metrics.loop_tick()
        busy = self.engine.has_unfinished()
        consumed = self._drain_inbox(block=not busy)
        self._expire()
        if self.stopping.is_set() and not self._drain():
            self._flush()
            return False
        if self.engine.has_unfinished():
            rows, counts, done = [], [], []
            for out in self.engine.step():
                job = self.active.get(out.request_id)
                if job is None:
                    continue
                ids = out.new_token_ids
                if out.finished:
                    self.ops.append(job.finish(ids, out.text, out.finish_reason))
                    done.append((job, out.finish_reason))
                else:
                    rows.append(job.delta(ids, out.text))
                self.tokens_out += len(ids)
                counts.append((job.id, len(ids)))
            if rows:        # one op for the step's deltas, encoded by the PUBLISH script
                self.ops.append(Op("deltas", "", rows=rows))
            self.metrics.step_tokens(counts)      # before the finishes: a 1-token job's TTFT
            for job, reason in done:
                self._forget(job, reason)
        self._flush()
        self._report_capacity(consumed)
        return True

    def _drain_inbox(self, block: bool) -> int:
        consumed = 0
        try:
            item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
            while True:
                kind, payload = item
                if kind == "admit":
                    consumed += 1
                    self._admit(payload)
                elif kind == "cancel":
                    self._cancel(payload)
                elif kind == "lost":
                    self._lost(payload)
                elif kind == "fatal":
                    self._fatal(payload)
                elif kind == "crash":
                    self._crash(payload)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return consumed

    def _admit(self, adm: Admission) -> None:
        if adm.outcome == "duplicate":
            self.ops.append(Op("ack", adm.entry_id, adm.job_id))
            return
        if adm.job_id is not None and adm.job_id in self.active:
            self.ops.append(Op("ack", adm.entry_id, adm.job_id))   # a second copy: drop it
            _job_log(adm).warning("duplicate job id already running here", entry=adm.entry_id)
            return
        job = ActiveJob.from_admission(adm)
        if adm.outcome is None and self.stopping.is_set():
            self.ops.append(Op("handoff", adm.entry_id, adm.job_id, raw=adm.raw))
            return
        if adm.outcome is None and adm.job_id in self.cancels:
            adm.outcome = "cancelled"
        if adm.outcome is None:
            resumed = adm.resumed_token_ids
            try:
                # the text already emitted primes the detokenizer: text an earlier run held
                # back (a possible stop string) is neither lost nor sent twice
                self.engine.add_request(adm.job_id, adm.prompt_token_ids, adm.job.params,
                                        adm.job.priority, resumed or None,
                                        emitted_text=adm.resumed_text if resumed else None)
            except ValueError as e:
                adm.outcome, adm.error = "error", JobError("invalid_prompt", str(e))
            except Exception as e:  # the engine refused it in a way we did not foresee
                _job_log(adm).exception("engine refused a job")
                adm.outcome, adm.error = "error", JobError("internal", f"{type(e).__name__}: {e}")
        if adm.outcome is None:
            self.active[adm.job_id] = job
            self.metrics.job_started(adm.job_id, enqueued_ms=_enqueued_ms(adm))
            if job.deadline_ms:
                self.next_deadline = min(self.next_deadline, job.deadline_ms)
        elif adm.outcome == "error":
            self.ops.append(dead_letter(adm, adm.error, self.s.name))
            self.metrics.dead_lettered(adm.error.code)
            if adm.job_id is not None:
                self.ops.append(job.end("error", adm.error))
            job_summary(_job_log(adm), self.metrics.job_finished(adm.job_id, "error"),
                        error_code=adm.error.code, error=adm.error.message,
                        entry=adm.entry_id, deliveries=adm.deliveries)
        else:
            self.ops.append(job.end(adm.outcome))
            job_summary(_job_log(adm), self.metrics.job_finished(adm.job_id, adm.outcome),
                        deliveries=adm.deliveries)

    def _cancel(self, job_id: str) -> None:
        job = self.active.get(job_id)
        if job is None:   # its admission may still be on the way (or it just finished)
            self.cancels[job_id] = time.monotonic()
            return
        self.engine.abort(job_id)
        self.ops.append(job.end("cancelled"))
        self._forget(job, "cancelled")

    def _lost(self, entry_id: str) -> None:
        for job in list(self.active.values()):
            if job.adm.entry_id == entry_id:
                self.engine.abort(job.id)
                del self.active[job.id]
                self.metrics.forget(job.id)
                _job_log(job.adm).warning("lease lost; job dropped here", entry=entry_id)

    def _fatal(self, err: RedisAccessError) -> None:
        """Redis refuses us for good: stop at once (running jobs stay pending in Redis and
        another worker reclaims them after the lease)."""
        if self.fatal is None:
            self.fatal = err
            log.error("stopping: redis refused access", error=str(err))
            self.stop(drain_timeout=0)

    def _crash(self, err: Exception) -> None:
        """The publisher died: nothing this loop makes can reach Redis any more. Stop at
        once (hand-offs cannot be sent either); the jobs held here stay pending and
        another worker resumes them from their replay logs after the lease."""
        if self.fatal is None:
            self.fatal = WorkerCrashed(f"the publisher thread crashed: {type(err).__name__}: "
                                       f"{err}")
            log.error("stopping: the publisher thread crashed", error=str(self.fatal))
            self.stop(drain_timeout=0)

    def _expire(self) -> None:
        now = now_ms()
        if now < self.next_deadline:
            return
        self.next_deadline = min((j.deadline_ms for j in self.active.values() if j.deadline_ms),
                                 default=float("inf"))
        for job in [j for j in self.active.values() if j.deadline_ms and j.deadline_ms <= now]:
            self.engine.abort(job.id)
            self.ops.append(job.end("expired"))
            self._forget(job, "expired")

    def _drain(self) -> bool:
        """One drain decision; False when nothing is left to run here."""
        late = time.monotonic() >= self.drain_deadline
        for job in list(self.active.values()):
            if late or job.emitted_here == 0:   # not started here, or out of time
                self.engine.abort(job.id)
                self.ops.append(Op("handoff", job.adm.entry_id, job.id, raw=job.adm.raw))
                del self.active[job.id]
                self.metrics.forget(job.id)
                _job_log(job.adm).info("job handed back", tokens=len(job.token_ids))
        return bool(self.active)

    def _forget(self, job: ActiveJob, finish_reason: str | None) -> None:
        """A running job reached its end: its one summary line, and its metrics."""
        self.active.pop(job.id, None)
        self.cancels.pop(job.id, None)
        stats = self.metrics.job_finished(job.id, finish_reason or "error",
                                          prompt_tokens=job.num_prompt_tokens)
        job_summary(_job_log(job.adm), stats, completion_tokens=len(job.token_ids),
                    resumed_tokens=len(job.adm.resumed_token_ids),
                    deliveries=job.adm.deliveries)

    def _flush(self) -> None:
        if self.ops:
            self.publisher.submit(self.ops)
            self.ops = []

    def _report_capacity(self, consumed: int) -> None:
        cap = 0 if self.stopping.is_set() else self.engine.capacity()
        self.budget.report(cap, consumed)
        if time.monotonic() - self._beat.get("_t", 0.0) >= 0.25:
            self._beat = self._stats()
            stale = time.monotonic() - 60
            for job_id in [j for j, t in self.cancels.items() if t < stale]:
                del self.cancels[job_id]

    def _stats(self) -> dict:
        st = self.engine.stats() if hasattr(self.engine, "stats") else {}
        self.metrics.set_engine(st)
        t, last = time.monotonic(), self._beat
        rate = (self.tokens_out - last.get("tokens_out", 0)) / max(1e-3, t - last.get("_t", t))
        return {"_t": t, "tok_s": round(rate, 1), "model": self.model_name, "pid": os.getpid(), "host": socket.gethostname(),
                "running": st.get("running", len(self.active)),
                "waiting": st.get("waiting", 0), "kv_usage": st.get("kv_usage", 0.0),
                "held": len(self.active), "tokens_out": self.tokens_out,
                "steps": st.get("steps", 0), "preemptions": st.get("preemptions", 0),
                "gpu_wait_s": st.get("gpu_wait_s", 0.0),
                "draining": int(self.stopping.is_set()), "ts_ms": now_ms()}

    def heartbeat(self) -> dict:
        """The heartbeat hash fields (read by the feeder thread)."""
        return {k: v for k, v in self._beat.items() if k != "_t"}


def _job_log(adm: Admission) -> Any:
    """The logger of one job: its id (and tenant) on every line."""
    tenant = adm.job.tenant if adm.job is not None else None
    return job_logger(adm.job_id, log, **({"tenant": tenant} if tenant else {}))


def _enqueued_ms(adm: Admission) -> int | None:
    """When the job entered the queue (Unix ms), for the queue-time histogram: its
    ``submitted_ms``, else its stream entry's time; None for a resumed job (its wait
    was counted where it first started)."""
    if adm.next_seq > 0:
        return None
    if adm.job is not None and adm.job.submitted_ms is not None:
        return adm.job.submitted_ms
    try:
        return int(adm.entry_id.split("-", 1)[0])
    except ValueError:
        return None
