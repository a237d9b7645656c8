"""Failure modes against real processes (RELIABILITY.md rows 1-3, 6, 7, 11): workers run
through the CLI as subprocesses so they can be killed, stopped and signalled for real;
every redis-server is a throwaway one on a free port."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from redis_support import InProcessWorker, RedisServer, WorkerProc, wait_for, wait_ready

from qworker.sampling_params import SamplingParams
from qworker.worker.client import Client
from qworker.worker.keys import Keys
from qworker.worker.protocol import unpack
from qworker.worker.streaming import build_job

KEYS = Keys()
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "The three primary colors are", "Water boils at", "1, 2, 3, 4,",
           "Translate to French:", "The best way to learn"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return str(tiny_checkpoint("llama"))


@pytest.fixture(scope="module")
def offline(tiny):
    from qworker import LLM

    return LLM(tiny, device="cpu", dtype="float32", max_num_seqs=8, num_kv_blocks=512)


@pytest.fixture
def server():
    """A fresh redis-server per test (conftest's is per module): these tests fault it."""
    srv = RedisServer()
    yield srv
    srv.close()


@pytest.fixture
def procs():
    started: list[WorkerProc] = []
    yield started
    for p in started:
        p.stop()


def reference(offline, n: int, max_tokens: int) -> list[list[int]]:
    """Greedy for even jobs, seeded sampling for odd ones, as an uninterrupted run."""
    outs = []
    for i in range(n):
        p = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                           temperature=0.0 if i % 2 == 0 else 0.8, seed=None if i % 2 == 0 else i)
        outs.append(offline.generate(PROMPTS[i % len(PROMPTS)], p)[0].token_ids)
    return outs


def submit_all(c: Client, n: int, max_tokens: int, prefix: str, gap: float = 0.02) -> list[str]:
    ids = []
    for i in range(n):
        ids.append(c.submit(prompt=PROMPTS[i % len(PROMPTS)], job_id=f"{prefix}{i}",
                            max_tokens=max_tokens, ignore_eos=True,
                            temperature=0.0 if i % 2 == 0 else 0.8,
                            seed=None if i % 2 == 0 else i))
        time.sleep(gap)
    return ids


class Collector:
    """One streaming client thread per job, recording (arrival time, event)."""

    def __init__(self, url: str, ids: list[str], timeout: float = 90):
        self.events: dict[str, list] = {j: [] for j in ids}
        self.threads = [threading.Thread(target=self._run, args=(url, j, timeout), daemon=True)
                        for j in ids]
        for t in self.threads:
            t.start()

    def _run(self, url, jid, timeout):
        c = Client(url)
        for ev in c.stream(jid, timeout=timeout):
            self.events[jid].append((time.monotonic(), ev))

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self.threads), "a stream did not finish"

    def check(self, jid: str, want_tokens: list[int] | None = None) -> list[int]:
        evs = [e for _, e in self.events[jid]]
        assert [e.seq for e in evs] == list(range(len(evs))), f"{jid}: gap or duplicate"
        tokens = [t for e in evs for t in e.token_ids]
        if want_tokens is not None:
            assert tokens == want_tokens, f"{jid}: output differs from an uninterrupted run"
        return tokens

    def seen(self, jid: str) -> int:
        return len(self.events[jid])


def held_by(r, consumer: str) -> list[str]:
    """Job ids pending for ``consumer`` right now."""
    out = []
    for p in r.xpending_range(KEYS.jobs, KEYS.group, "-", "+", 1000, consumername=consumer):
        for _, f in r.xrange(KEYS.jobs, p["message_id"], p["message_id"]):
            out.append(unpack(f[b"job"])["id"])
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def queue_is_empty(r) -> bool:
    return r.xlen(KEYS.jobs) == 0 and r.xpending(KEYS.jobs, KEYS.group)["pending"] == 0


def first_event_after(col: Collector, jid: str, t: float) -> float | None:
    return next((at for at, _ in col.events[jid] if at > t), None)


def test_kill_9_of_workers_mid_generation_loses_nothing_and_resumes_exactly(
        tiny, offline, server, procs):
    lease = 1500
    env = {"QWTEST_STEP_DELAY": "0.03"}
    for name in ("ka", "kb", "kc"):
        procs.append(WorkerProc(tiny, server.url, name, lease_ms=lease, env=env,
                                extra=["--max-num-seqs", "16"]))   # room for 12 jobs
    r = server.client()
    wait_ready(r, ["ka", "kb", "kc"])
    want = reference(offline, 12, 60)
    c = Client(server.url)
    ids = submit_all(c, 12, 60, "k")
    col = Collector(server.url, ids)
    for victim in procs[:2]:                         # kill one worker, then another
        mine = wait_for(lambda v=victim: [j for j in held_by(r, v.name) if col.seen(j) >= 3],
                        30, what=f"{victim.name} to be mid-generation")
        victim.signal(signal.SIGKILL)
        t_kill = time.monotonic()
        victim.wait(10)
        for j in mine:
            at = wait_for(lambda j=j, t=t_kill: first_event_after(col, j, t) or
                          c.get_result(j), 4 * lease / 1000, what=f"{j} to resume")
            if isinstance(at, float):
                assert at - t_kill <= 2 * lease / 1000 + 0.5, \
                    (f"{j} resumed after {at - t_kill} s", [p.output()[-3000:] for p in procs])
    col.join(60)
    for jid, tokens in zip(ids, want, strict=True):
        col.check(jid, tokens)
        res = c.result(jid, timeout=5)
        assert res.token_ids == tokens and res.finish_reason == "length"
    wait_for(lambda: queue_is_empty(r), 10, what="every entry acked")


def test_sigterm_hands_unfinished_jobs_to_another_worker_within_seconds(
        tiny, offline, server, procs):
    env = {"QWTEST_STEP_DELAY": "0.03"}
    for name in ("ta", "tb"):   # the lease is long: only the handoff can explain a fast pickup
        procs.append(WorkerProc(tiny, server.url, name, lease_ms=20_000, env=env,
                                extra=["--max-num-seqs", "8", "--drain-timeout", "0.3"]))
    r = server.client()
    wait_ready(r, ["ta", "tb"])
    want = reference(offline, 8, 80)
    c = Client(server.url)
    ids = submit_all(c, 8, 80, "t")
    col = Collector(server.url, ids)
    victim = procs[0]
    mine = wait_for(lambda: [j for j in held_by(r, "ta") if col.seen(j) >= 2], 30,
                    what="ta to be mid-generation")
    victim.signal(signal.SIGTERM)
    t_term = time.monotonic()
    assert victim.wait(15) == 0
    col.join(60)
    for j in mine:
        at = first_event_after(col, j, t_term + 0.3)
        assert at is None or at - t_term < 5, f"{j} picked up {at - t_term:.1f} s after SIGTERM"
    for jid, tokens in zip(ids, want, strict=True):
        col.check(jid, tokens)
        assert c.result(jid, timeout=5).token_ids == tokens
    assert "job handed back" in victim.output()
    wait_for(lambda: queue_is_empty(r), 10, what="every entry acked")


def test_poison_job_is_dead_lettered_after_max_deliveries_without_a_crash_loop(
        tiny, server, procs):
    names = ["pa", "pb", "pc", "pd"]
    for name in names:
        procs.append(WorkerProc(tiny, server.url, name, lease_ms=1000,
                                env={"QWTEST_POISON": "poison"}, extra=["--max-deliveries", "3"]))
    r = server.client()
    wait_ready(r, names)
    c = Client(server.url)
    c.submit(prompt="boom", job_id="poison-1", max_tokens=5)
    res = c.result("poison-1", timeout=40)
    assert res.finish_reason == "error" and res.error["code"] == "too_many_deliveries"
    events = list(c.stream("poison-1", timeout=5))
    assert events[-1].error == res.error
    (_, letter), = r.xrange(KEYS.dead)
    assert letter[b"reason"] == b"too_many_deliveries" and letter[b"deliveries"] == b"4"
    assert letter[b"id"] == b"poison-1" and unpack(letter[b"job"])["id"] == "poison-1"
    assert [p.proc.poll() for p in procs].count(77) == 3   # three died, one serves on
    ok = c.generate(prompt="after the poison", max_tokens=4, timeout=30)
    assert ok.finish_reason == "length"
    wait_for(lambda: queue_is_empty(r), 10, what="every entry acked")


def test_worker_cut_off_past_its_lease_never_publishes_for_the_lost_job(
        tiny, offline, server, procs):
    env = {"QWTEST_STEP_DELAY": "0.02"}
    for name in ("fa", "fb"):
        procs.append(WorkerProc(tiny, server.url, name, lease_ms=1000, env=env))
    r = server.client()
    wait_ready(r, ["fa", "fb"])
    want = offline.generate(PROMPTS[0], SamplingParams(max_tokens=150, ignore_eos=True,
                                                       temperature=0.0))[0].token_ids
    live: list[int] = []
    ps = r.pubsub(ignore_subscribe_messages=True)
    ps.subscribe(KEYS.out("fence"))
    c = Client(server.url)
    c.submit(prompt=PROMPTS[0], job_id="fence", max_tokens=150, ignore_eos=True,
             temperature=0.0)
    col = Collector(server.url, ["fence"])
    wait_for(lambda: col.seen("fence") >= 3, 30, what="generation to start")
    victim = next(p for p in procs if "fence" in held_by(r, p.name))
    victim.signal(signal.SIGSTOP)                    # cut off: no renewals, no publishing
    wait_for(lambda: "fence" not in held_by(r, victim.name), 10, what="the job to be reclaimed")
    victim.signal(signal.SIGCONT)
    col.join(60)
    deadline = time.monotonic() + 2                  # give the woken worker time to misbehave
    while time.monotonic() < deadline:
        m = ps.get_message(timeout=0.1)
        if m:
            live.append(unpack(m["data"])["seq"])
    col.check("fence", want)
    assert c.result("fence", timeout=5).token_ids == want
    assert len(live) == len(set(live)), "a seq was published twice"
    out = victim.output()
    assert "lease lost" in out or "no longer ours" in out
    assert victim.proc.poll() is None, "the fenced worker must keep running"


def test_backlog_of_10000_jobs_keeps_worker_memory_flat(tiny, server, procs):
    w = WorkerProc(tiny, server.url, "bw", lease_ms=5000, extra=["--max-num-seqs", "16"])
    procs.append(w)
    r = server.client()
    wait_ready(r, ["bw"])
    pipe = r.pipeline(transaction=False)
    for i in range(10_000):
        pipe.xadd(KEYS.jobs, {"job": build_job(prompt_token_ids=[1 + i % 500, 7, 9],
                                               job_id=f"b{i}", max_tokens=1)[1]})
    pipe.execute()
    # Sample (jobs done, RSS, pending) all along. RSS swings by tens of MiB from one
    # moment to the next (allocator arenas taken and given back), so one reading per
    # point is noise; a leak shows as a rising floor, the lowest RSS over a window.
    samples: list[tuple[int, int, int]] = []
    deadline = time.monotonic() + 120
    while True:
        done = 10_000 - r.xlen(KEYS.jobs)
        samples.append((done, rss_bytes(w.proc.pid), r.xpending(KEYS.jobs, KEYS.group)["pending"]))
        if done >= 2200:
            break
        assert w.proc.poll() is None, w.output()
        assert time.monotonic() < deadline, f"too slow: {done} jobs done in 120 s"
        time.sleep(0.01)
    pending = [p for _, _, p in samples]
    assert max(pending) <= 16, f"pulled more than it can run: {max(pending)}"
    assert r.xlen(KEYS.jobs) >= 10_000 - 3_000, "the backlog stays in Redis"

    def floor(lo: int, hi: int) -> int:
        window = [rss for done, rss, _ in samples if lo <= done < hi]
        assert len(window) >= 3, f"{len(window)} samples between {lo} and {hi} jobs done"
        return min(window)

    early, late = floor(400, 1000), floor(1600, 2200)
    growth = (late - early) / 2**20
    assert growth < 20, f"worker RSS floor grew {growth:.1f} MiB over 1200 jobs: {early} -> {late}"


def test_redis_restart_with_aof_loses_no_job_and_no_token(tiny, offline, monkeypatch):
    from qworker.config import EngineConfig
    from qworker.engine.engine import Engine

    srv = RedisServer(aof=True)
    engine = Engine(tiny, EngineConfig(max_num_seqs=8, num_kv_blocks=512), device="cpu",
                    dtype="float32")
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), real_step())[1])
    w = InProcessWorker(engine, srv.url, "aof", lease_ms=1500)
    try:
        want = reference(offline, 6, 100)
        c = Client(srv.url)
        ids = submit_all(c, 6, 100, "a", gap=0)
        col = Collector(srv.url, ids)
        wait_for(lambda: all(col.seen(j) >= 2 for j in ids), 30, what="generation to start")
        srv.kill()
        before = w.worker.tokens_out
        time.sleep(1.5)
        assert w.worker.tokens_out > before, "generation must go on while Redis is away"
        srv.start()
        col.join(60)
        for jid, tokens in zip(ids, want, strict=True):
            col.check(jid, tokens)
            assert c.result(jid, timeout=10).token_ids == tokens
        wait_for(lambda: queue_is_empty(srv.client()), 10, what="every entry acked")
    finally:
        w.stop()
        srv.close()
