"""Prometheus metrics of one worker, and the HTTP server for ``/metrics`` and ``/healthz``.

The worker loop feeds a ``WorkerMetrics`` (all calls are cheap: a clock read, a dict
lookup, a few locked float updates), and ``MetricsServer`` serves it from a daemon thread:

    m = WorkerMetrics(worker="gpu0-1234", model="smollm2-135m-instruct")
    MetricsServer(m, port=9400).start()
    m.job_started(job.id, enqueued_ms=job.submitted_ms)    # admitted to the engine
    m.step_tokens((o.request_id, len(o.new_token_ids)) for o in outs)   # every step
    stats = m.job_finished(job.id, "length", prompt_tokens=n)  # -> logs.JobStats
    m.set_engine(engine.stats()); m.loop_tick()                 # every loop iteration
    m.set_queue(stream_len, pending)                            # every maintenance tick

Every metric lives in the instance's own ``CollectorRegistry``, so several workers (or
tests) in one process never collide.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import prometheus_client as prom
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from qworker.logs import JobStats

FINISH_REASONS = ("stop", "length", "cancelled", "expired", "error")
_LATENCY = (.001, .0025, .005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56, 5.0)
_TTFT = (.01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_QUEUE = (.01, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class CountedHistogram:
    """A Prometheus histogram that records one value ``n`` times in one call.

    prometheus_client's ``Histogram.observe`` takes one value under a lock (~3 us); the
    engine loop records an inter-token latency for every running job every step, and
    the jobs that emitted in the previous step share one value, so one call per distinct
    value keeps that off the loop (256 jobs: ~1 ms a step before). Scraped like any
    histogram: ``{name}_bucket{le=...}``, ``{name}_count``, ``{name}_sum``.
    """

    def __init__(self, name: str, doc: str, buckets: Iterable[float],
                 registry: prom.CollectorRegistry) -> None:
        self.name, self.doc = name, doc
        self.bounds = [*sorted(buckets), float("inf")]
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float, n: int = 1) -> None:
        i = bisect.bisect_left(self.bounds, value)     # buckets are "<= le"
        with self._lock:
            self._counts[i] += n
            self._sum += value * n

    def collect(self):
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, acc = [], 0
        for bound, c in zip(self.bounds, counts, strict=True):
            acc += c
            cumulative.append((floatToGoString(bound), acc))
        yield HistogramMetricFamily(self.name, self.doc, buckets=cumulative, sum_value=total)

    def describe(self):
        return list(self.collect())


class WorkerMetrics:
    """Counters, gauges and histograms of one worker, plus its liveness for ``/healthz``.

    ``stale_after_s``: ``/healthz`` answers 503 when the loop's last ``loop_tick()`` is
    older than this. ``rate_window_s``: the window of the tokens-per-second gauge.
    """

    def __init__(self, worker: str = "", model: str = "", stale_after_s: float = 30.0,
                 rate_window_s: float = 10.0, registry: prom.CollectorRegistry | None = None):
        self.worker, self.stale_after_s, self.rate_window_s = worker, stale_after_s, rate_window_s
        self.registry = r = registry or prom.CollectorRegistry(auto_describe=True)
        g = lambda name, doc, **kw: prom.Gauge(f"qworker_{name}", doc, registry=r, **kw)  # noqa: E731
        c = lambda name, doc, **kw: prom.Counter(f"qworker_{name}", doc, registry=r, **kw)  # noqa: E731
        h = lambda name, doc, b: prom.Histogram(f"qworker_{name}", doc, registry=r, buckets=b)  # noqa: E731
        prom.Info("qworker_worker", "This worker's name and model.", registry=r).info(
            {"worker": worker, "model": model})
        self.stream_length = g("stream_length", "Entries in the jobs stream (XLEN).")
        self.pending = g("pending_jobs", "Jobs delivered to a worker and not yet acked, "
                         "all workers of the group (XPENDING).")
        self.running = g("running_requests", "Requests running in this worker's engine.")
        self.waiting = g("waiting_requests", "Requests admitted and waiting for a slot.")
        self.kv_usage = g("kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.")
        self.prefix_hit = g("prefix_cache_hit_ratio", "Prompt tokens served from the prefix cache.")
        self.active_jobs = g("active_jobs", "Jobs this worker holds (admitted, not finished).")
        self.tokens_per_s = g("tokens_per_second", "Output tokens per second over the last "
                              f"{rate_window_s:g} s.")
        self.preemptions = c("preemptions", "Requests preempted for lack of KV blocks.")
        self.reclaims = c("reclaims", "Stale jobs reclaimed from other workers.")
        self.dead_letters = c("dead_letters", "Jobs sent to the dead-letter stream.",
                              labelnames=("code",))
        self.jobs = c("jobs_finished", "Jobs finished, by finish reason.",
                      labelnames=("reason",))
        self.output_tokens = c("output_tokens", "Output tokens generated.")
        self.prompt_tokens = c("prompt_tokens", "Prompt tokens of finished jobs.")
        self.ttft = h("time_to_first_token_seconds", "Admission to first token.", _TTFT)
        self.tpot = h("time_per_output_token_seconds", "Mean time per output token after "
                      "the first, per job.", _LATENCY)
        self.itl = CountedHistogram("qworker_inter_token_latency_seconds",
                                    "Time between successive tokens of a job.", _LATENCY, r)
        self.queue_time = h("queue_time_seconds", "Enqueued to admitted to the engine.", _QUEUE)
        self.duration = h("job_duration_seconds", "Admitted to finished.", _QUEUE)
        for reason in FINISH_REASONS:
            self.jobs.labels(reason)
        # job id -> [admitted, first token or None, last token, tokens, queue_s or None]
        self._jobs: dict[str, list[Any]] = {}
        self._lock = threading.Lock()
        self._window: deque[tuple[float, int]] = deque()
        self._window_sum = 0
        self._last_tick: float | None = None
        self._t0 = time.monotonic()
        self._preemptions_seen = 0
        self.tokens_per_s.set_function(self._rate)
        self.active_jobs.set_function(lambda: len(self._jobs))
        g("last_step_age_seconds", "Seconds since the worker loop last ran.").set_function(
            lambda: -1.0 if self._last_tick is None else time.monotonic() - self._last_tick)

    # ---- per job ---------------------------------------------------------------------
    def job_started(self, job_id: str, enqueued_ms: int | None = None,
                    now: float | None = None) -> None:
        """A job was admitted to the engine. ``enqueued_ms``: Unix ms when it entered the
        queue (``job.submitted_ms``, else the stream entry id's time); None skips the
        queue-time histogram (e.g. a resumed job)."""
        now = time.monotonic() if now is None else now
        queue_s = None
        if enqueued_ms is not None:
            queue_s = max(0.0, time.time() - enqueued_ms / 1000.0)
            self.queue_time.observe(queue_s)
        self._jobs[job_id] = [now, None, now, 0, queue_s]

    def tokens(self, job_id: str, n: int = 1, now: float | None = None) -> None:
        """``n`` new tokens of one job arrived (first one: TTFT; later ones: ITL)."""
        self.step_tokens(((job_id, n),), now)

    def step_tokens(self, counts: Iterable[tuple[str, int]], now: float | None = None) -> None:
        """One engine step's new tokens, as (job id, count) pairs: one clock read for all."""
        now = time.monotonic() if now is None else now
        total = 0
        gaps: dict[float, int] = {}         # previous emission time -> jobs (ITL batched)
        for job_id, n in counts:
            if n <= 0:
                continue
            total += n
            st = self._jobs.get(job_id)
            if st is None:
                continue
            if st[1] is None:
                st[1] = now
                self.ttft.observe(now - st[0])
            else:
                gaps[st[2]] = gaps.get(st[2], 0) + 1
            st[2] = now
            st[3] += n
        for last, jobs in gaps.items():
            self.itl.observe(now - last, jobs)
        if total:
            self.output_tokens.inc(total)
            with self._lock:
                self._window.append((now, total))
                self._window_sum += total
                self._trim(now)

    def job_finished(self, job_id: str, finish_reason: str, prompt_tokens: int = 0,
                     now: float | None = None) -> JobStats:
        """A job reached its terminal state; returns its timings for ``logs.job_summary``.
        Works for jobs never admitted too (rejected, expired): they only count."""
        now = time.monotonic() if now is None else now
        st = self._jobs.pop(job_id, None)
        self.jobs.labels(finish_reason if finish_reason in FINISH_REASONS else "error").inc()
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if st is None:
            return JobStats(job_id, finish_reason, prompt_tokens)
        started, first, _, n, queue_s = st
        stats = JobStats(job_id, finish_reason, prompt_tokens, n, queue_s,
                         None if first is None else first - started, now - started)
        self.duration.observe(stats.duration_s)
        if stats.tpot_s is not None:
            self.tpot.observe(stats.tpot_s)
        return stats

    def forget(self, job_id: str) -> None:
        """Drop a job without counting it (lease lost, handed off at shutdown)."""
        self._jobs.pop(job_id, None)

    # ---- worker level ------------------------------------------------------------------
    def set_engine(self, stats: Mapping[str, float]) -> None:
        """Gauges from ``Engine.stats()`` (running, waiting, kv_usage, preemptions, ...)."""
        self.running.set(stats.get("running", 0))
        self.waiting.set(stats.get("waiting", 0))
        self.kv_usage.set(stats.get("kv_usage", 0.0))
        self.prefix_hit.set(stats.get("prefix_hit_rate", 0.0))
        total = int(stats.get("preemptions", 0))   # cumulative in the engine
        if total > self._preemptions_seen:
            self.preemptions.inc(total - self._preemptions_seen)
        self._preemptions_seen = total

    def set_queue(self, stream_length: int, pending: int) -> None:
        """The jobs stream's length (XLEN) and the group's pending count (XPENDING)."""
        self.stream_length.set(stream_length)
        self.pending.set(pending)

    def reclaimed(self, n: int = 1) -> None:
        """``n`` stale jobs were reclaimed (XAUTOCLAIM) by this worker."""
        if n > 0:
            self.reclaims.inc(n)

    def dead_lettered(self, code: str) -> None:
        """A job went to the dead-letter stream; ``code`` is its JobError code."""
        self.dead_letters.labels(code).inc()

    def loop_tick(self, now: float | None = None) -> None:
        """The worker loop is alive: call once per iteration (idle ones included)."""
        self._last_tick = time.monotonic() if now is None else now

    # ---- reading -------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, body): healthy while the loop ticked within ``stale_after_s``."""
        age = None if self._last_tick is None else time.monotonic() - self._last_tick
        status = "starting" if age is None else "ok" if age <= self.stale_after_s else "stalled"
        return status == "ok", {"status": status, "worker": self.worker,
                                "running": len(self._jobs),
                                "last_step_age_s": None if age is None else round(age, 3)}

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return prom.generate_latest(self.registry)

    def _trim(self, now: float) -> None:
        w = self._window
        while w and w[0][0] < now - self.rate_window_s:
            self._window_sum -= w.popleft()[1]

    def _rate(self) -> float:
        with self._lock:
            now = time.monotonic()
            self._trim(now)
            # young worker: divide by its age (at least 1 s), not by the whole window
            return self._window_sum / min(self.rate_window_s, max(1.0, now - self._t0))


class MetricsServer:
    """``/metrics`` (Prometheus text) and ``/healthz`` (JSON; 200 or 503) on a daemon
    thread. ``port=0`` picks a free port; ``start()`` returns the bound port."""

    def __init__(self, metrics: WorkerMetrics, port: int = 9400, host: str = "0.0.0.0"):
        self.metrics, self.host, self.port = metrics, host, port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        metrics = self.metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, prom.CONTENT_TYPE_LATEST, metrics.render())
                elif path in ("/healthz", "/health"):
                    ok, body = metrics.health()
                    self._reply(200 if ok else 503, "application/json",
                                json.dumps(body).encode())
                else:
                    self._reply(404, "text/plain; charset=utf-8", b"try /metrics or /healthz\n")

            def _reply(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # a scrape every few seconds is not worth a log line

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="qworker-metrics", daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
