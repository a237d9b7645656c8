"""The worker end to end against a real redis-server, in one process (the engine can be
inspected): streaming, exactly-once results, late subscribers, cancel, deadlines, lease
renewal, concurrent reclaimers, hostile payloads (RELIABILITY.md rows 4, 5, 8-10, 12)."""

from __future__ import annotations

import threading
import time

import pytest
from redis_support import InProcessWorker, wait_for
from test_protocol import HOSTILE

from qworker.config import EngineConfig
from qworker.sampling_params import SamplingParams
from qworker.worker.client import Client
from qworker.worker.intake import Intake
from qworker.worker.keys import Keys
from qworker.worker.protocol import pack, unpack

LEASE_MS = 1000


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return str(tiny_checkpoint("llama"))


@pytest.fixture(scope="module")
def engine(tiny):
    from qworker.engine.engine import Engine

    return Engine(tiny, EngineConfig(max_num_seqs=16, num_kv_blocks=512), device="cpu",
                  dtype="float32")


@pytest.fixture(scope="module")
def worker(engine, server):
    w = InProcessWorker(engine, server.url, "w-e2e", lease_ms=LEASE_MS)
    yield w.worker
    w.stop()


@pytest.fixture(scope="module")
def client(server, worker):
    c = Client(server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def offline(tiny):
    from qworker import LLM

    return LLM(tiny, device="cpu", dtype="float32", max_num_seqs=4, num_kv_blocks=256)


def drained(server) -> bool:
    r = server.client()
    return r.xlen("qworker:jobs") == 0 and r.xpending("qworker:jobs", "workers")["pending"] == 0


def test_streamed_tokens_equal_the_offline_engine_and_the_stored_result(client, offline):
    prompts = ["The capital of France is", "1, 2, 3,", "Once upon a time"]
    ids = [client.submit(prompt=p, max_tokens=12, temperature=0.0, ignore_eos=True)
           for p in prompts]
    seeded = client.submit(prompt="Hello", max_tokens=12, temperature=1.0, seed=7,
                           ignore_eos=True)
    want = offline.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0,
                                                    ignore_eos=True))
    want.append(offline.generate("Hello", SamplingParams(max_tokens=12, temperature=1.0, seed=7,
                                                         ignore_eos=True))[0])
    for jid, ref in zip(ids + [seeded], want, strict=True):
        events = list(client.stream(jid, timeout=30))
        assert [e.seq for e in events] == list(range(len(events)))
        assert [t for e in events for t in e.token_ids] == ref.token_ids
        assert "".join(e.text for e in events) == ref.text
        assert events[-1].finished and events[-1].finish_reason == "length"
        assert events[-1].usage == {"prompt_tokens": len(ref.prompt_token_ids),
                                    "completion_tokens": 12}
        res = client.result(jid, timeout=5)
        assert (res.token_ids, res.text, res.finish_reason) == (ref.token_ids, ref.text, "length")


def test_chat_messages_and_token_ids_are_accepted(client):
    a = client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=3, timeout=30)
    b = client.generate(prompt_token_ids=[1, 2, 3], max_tokens=3, timeout=30)
    assert a.finish_reason in ("stop", "length") and b.usage["prompt_tokens"] == 3


def test_late_subscriber_and_reconnecting_client_rebuild_the_whole_stream(client):
    jid = client.submit(prompt="late", max_tokens=20, temperature=0.0, ignore_eos=True)
    partial = []
    for ev in client.stream(jid, timeout=30):        # a client that drops after 3 events
        partial.append(ev)
        if len(partial) == 3:
            break
    res = client.result(jid, timeout=30)
    replay = list(client.stream(jid, timeout=10))     # subscribes after the job finished
    assert [e.seq for e in replay] == list(range(len(replay)))
    assert [t for e in replay for t in e.token_ids] == res.token_ids
    assert replay[:3] == partial


def test_asyncio_client_streams_and_gets_the_result(server, worker):
    import asyncio

    from qworker import AsyncClient

    async def go():
        async with AsyncClient(server.url) as ac:
            jid = await ac.submit(prompt="async", max_tokens=6, temperature=0.0, ignore_eos=True)
            events = [ev async for ev in ac.stream(jid, timeout=30)]
            res = await ac.result(jid, timeout=10)
            return events, res

    events, res = asyncio.run(go())
    assert [e.seq for e in events] == list(range(len(events)))
    assert [t for e in events for t in e.token_ids] == res.token_ids and len(res.token_ids) == 6


def test_duplicate_delivery_of_a_finished_job_only_acks(client, server):
    jid = client.submit(prompt="once", max_tokens=4, job_id="dup-1")
    first = client.result(jid, timeout=30)
    r = server.client()
    log_len = r.xlen(client.keys.log(jid))
    from qworker.worker.streaming import build_job
    r.xadd(client.keys.jobs, {"job": build_job(prompt="once", max_tokens=4, job_id=jid)[1]})
    wait_for(lambda: drained(server), 10, what="duplicate to be acked")
    assert r.xlen(client.keys.log(jid)) == log_len
    assert client.result(jid, timeout=1) == first


def test_cancel_ends_a_running_job_within_250ms_frees_blocks_and_is_not_retried(
        client, server, engine):
    free_before = engine.block_manager.num_free_blocks
    jid = client.submit(prompt="cancel me", max_tokens=400, ignore_eos=True, temperature=0.0)
    stream = client.stream(jid, timeout=30)
    for ev in stream:
        if ev.seq >= 3:
            break
    t0 = time.monotonic()
    client.cancel(jid)
    last = list(stream)[-1]
    elapsed = time.monotonic() - t0
    assert last.finished and last.finish_reason == "cancelled"
    assert elapsed < 0.25, f"cancel took {elapsed * 1000:.0f} ms"
    assert len(client.result(jid, timeout=1).token_ids) < 400
    wait_for(lambda: drained(server), 5, what="cancelled entry acked")
    wait_for(lambda: engine.block_manager.num_free_blocks >= free_before, 5,
             what="KV blocks freed")
    assert not engine.has_unfinished()


def test_cancel_before_start_ends_the_job_without_generating(client, server):
    jid = "cancel-early"
    client.cancel(jid)
    client.submit(prompt="never", job_id=jid, max_tokens=50)
    res = client.result(jid, timeout=10)
    assert (res.finish_reason, res.token_ids) == ("cancelled", [])


def test_job_past_its_deadline_expires_without_gpu_work(client, worker, monkeypatch):
    calls = []
    real = worker.engine.add_request
    monkeypatch.setattr(worker.engine, "add_request",
                        lambda rid, *a, **k: (calls.append(rid), real(rid, *a, **k)))
    jid = client.submit(prompt="too late", max_tokens=5, deadline=0)
    res = client.result(jid, timeout=10)
    assert (res.finish_reason, res.token_ids) == ("expired", [])
    assert jid not in calls


def test_running_job_is_stopped_at_its_deadline(client, worker, monkeypatch):
    real_step = worker.engine.step
    monkeypatch.setattr(worker.engine, "step", lambda: (time.sleep(0.01), real_step())[1])
    jid = client.submit(prompt="slow", max_tokens=450, ignore_eos=True, deadline=0.5)
    res = client.result(jid, timeout=10)          # 450 steps would take > 4.5 s
    assert res.finish_reason == "expired" and 0 < len(res.token_ids) < 450
    assert not worker.engine.has_unfinished()


def test_drain_finishes_short_jobs_and_hands_back_long_ones_with_their_progress(
        server, tiny, offline):
    from qworker.engine.engine import Engine

    def slow_engine():
        engine = Engine(tiny, EngineConfig(max_num_seqs=4, num_kv_blocks=128), device="cpu",
                        dtype="float32")
        real_step = engine.step
        engine.step = lambda: (time.sleep(0.01), real_step())[1]
        return engine

    keys, r = Keys("drain"), server.client()
    w = InProcessWorker(slow_engine(), server.url, "drainer", keys=keys)
    c = Client(server.url, prefix="drain")
    short = c.submit(prompt="first", max_tokens=20, ignore_eos=True, temperature=0.0)
    long = c.submit(prompt="second", max_tokens=300, ignore_eos=True, temperature=0.0)
    wait_for(lambda: r.xlen(keys.log(long)) >= 2, 20, what="the long job to start")
    w.worker.stop(drain_timeout=1.0)
    w.thread.join(30)
    assert c.get_result(short).finish_reason == "length"      # finished while draining
    assert c.get_result(long) is None
    (_, entry), = r.xrange(keys.jobs)                            # handed back, old entry acked
    assert unpack(entry[b"job"])["id"] == long and entry[b"handoff_from"] == b"drainer"
    assert r.xpending(keys.jobs, keys.group)["pending"] == 0
    progress = r.xlen(keys.log(long))
    assert 2 <= progress < 300
    w2 = InProcessWorker(slow_engine(), server.url, "successor", keys=keys)
    try:
        res = c.result(long, timeout=30)
        want = offline.generate("second", SamplingParams(max_tokens=300, temperature=0.0,
                                                         ignore_eos=True))[0]
        assert res.token_ids == want.token_ids and res.text == want.text
        events = list(c.stream(long, timeout=5))
        assert [e.seq for e in events] == list(range(len(events)))
    finally:
        w2.stop()
        c.close()


def test_hostile_payloads_are_rejected_one_by_one_and_the_worker_keeps_serving(
        client, server):
    r = server.client()
    dead_before = r.xlen(client.keys.dead)
    extra = [  # checks that need the model: vocabulary, context length, chat template
        (pack({"v": 1, "id": "h-vocab", "prompt_token_ids": [1, 10**9]}), "invalid_prompt",
         "h-vocab"),
        (pack({"v": 1, "id": "h-long", "prompt_token_ids": [5] * 600}), "prompt_too_long",
         "h-long"),
        (pack({"v": 1, "id": "h-longtext", "prompt": "word " * 40000}), "prompt_too_long",
         "h-longtext"),
    ]
    cases = []
    for i, (raw, code, jid) in enumerate(HOSTILE):  # give each usable id its own name
        if jid:
            jid = f"{i:02d}"
            raw = raw.replace(b"\xa2j1", b"\xa2" + jid.encode())
        cases.append((raw, code, jid))
    cases += extra
    pipe = r.pipeline()
    for raw, _, _ in cases:
        pipe.xadd(client.keys.jobs, {"job": raw})
    pipe.xadd(client.keys.jobs, {"no_job_field": b"x"})
    pipe.execute()
    good = client.generate(prompt="still alive", max_tokens=3, timeout=30)
    assert good.finish_reason in ("stop", "length")
    wait_for(lambda: drained(server), 20, what="all hostile entries acked")
    assert r.xlen(client.keys.dead) - dead_before == len(cases) + 1
    for _, code, jid in cases:
        if jid is None:
            continue
        res = client.result(jid, timeout=5)
        assert res.finish_reason == "error" and res.error["code"] == code, (jid, res.error)
        events = list(client.stream(jid, timeout=5))
        assert events[-1].error == res.error and events[-1].finish_reason == "error"
    letters = r.xrange(client.keys.dead, count=len(cases) + dead_before + 1)
    assert all(f[b"reason"] and f[b"message"] and f[b"worker"] == b"w-e2e" for _, f in letters)


def test_a_job_longer_than_its_lease_is_never_reclaimed(client, server, worker, monkeypatch):
    real_step = worker.engine.step

    def slow_step():
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(worker.engine, "step", slow_step)
    jid = client.submit(prompt="long", max_tokens=120, ignore_eos=True)  # ~2.5 x the lease
    keys, r = Keys(), server.client()
    rival = Intake(keys, "rival", worker.engine.tokenizer, 49152, 512)
    rival.bind(server.client())
    stolen, deliveries = [], set()
    t0 = time.monotonic()
    while client.get_result(jid) is None and time.monotonic() - t0 < 30:
        stolen += rival.reclaim(10, LEASE_MS, set())
        deliveries |= {p["times_delivered"] for p in r.xpending_range(keys.jobs, keys.group,
                                                                       "-", "+", 10)}
        time.sleep(0.1)
    assert time.monotonic() - t0 > 1.5 * LEASE_MS / 1000
    assert stolen == [] and deliveries <= {1}
    assert len(client.result(jid, timeout=5).token_ids) == 120


def test_concurrent_reclaimers_each_stale_entry_goes_to_exactly_one(server):
    keys = Keys("reclaim")
    r = server.client()
    ids = [r.xadd(keys.jobs, {"job": pack({"v": 1, "id": f"s{i}", "prompt": "x"})}).decode()
           for i in range(40)]
    r.xgroup_create(keys.jobs, keys.group, id="0")
    r.xreadgroup(keys.group, "ghost", {keys.jobs: ">"}, count=100)   # then the ghost dies
    time.sleep(0.25)
    claims: dict[str, list[str]] = {}
    start = threading.Barrier(4)       # all four race from the same moment (a thread that
                                       # started early could otherwise take every entry)

    def reclaimer(name):
        it = Intake(keys, name, None, 49152, 512)
        it.bind(server.client())
        got = claims.setdefault(name, [])
        start.wait(10)
        for _ in range(50):
            got += [e for e, _, _ in it.reclaim(2, 200, set())]

    threads = [threading.Thread(target=reclaimer, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    everything = [e for got in claims.values() for e in got]
    assert sorted(everything) == sorted(ids)          # every stale entry, each exactly once
    assert sum(1 for got in claims.values() if got) >= 2
    assert {p["times_delivered"] for p in r.xpending_range(keys.jobs, keys.group, "-", "+",
                                                           100)} == {2}


def test_reclaiming_an_entry_deleted_while_pending_acks_it(server):
    keys = Keys("deleted")
    r = server.client()
    entry = r.xadd(keys.jobs, {"job": pack({"v": 1, "id": "gone", "prompt": "x"})})
    r.xgroup_create(keys.jobs, keys.group, id="0")
    r.xreadgroup(keys.group, "ghost", {keys.jobs: ">"})
    r.xdel(keys.jobs, entry)                                   # gone, but still pending
    time.sleep(0.15)
    it = Intake(keys, "heir", None, 49152, 512)
    it.bind(server.client())
    assert it.reclaim(10, 100, set()) == []
    assert r.xpending(keys.jobs, keys.group)["pending"] == 0


def test_heartbeat_says_what_the_worker_holds(client, server):
    jid = client.submit(prompt="beat", max_tokens=300, ignore_eos=True)
    r = server.client()
    wait_for(lambda: jid in unpack(r.hget("qworker:worker:w-e2e", "jobs") or pack([])), 10,
             what="heartbeat to list the job")
    assert 0 < r.ttl("qworker:worker:w-e2e") <= 10
    wait_for(lambda: int(r.hget("qworker:worker:w-e2e", "steps") or 0) > 0, 10,
             what="heartbeat to count the engine's steps")
    client.cancel(jid)
    client.result(jid, timeout=10)


def test_a_cancel_published_without_its_marker_cancels_nothing(client, server):
    jid = client.submit(prompt="not yours to cancel", max_tokens=60, ignore_eos=True)
    r = server.client()
    wait_for(lambda: r.xlen(client.keys.log(jid)) >= 2, 20, what="the job to start")
    r.publish(client.keys.cancel, jid)                 # a stray publish: no cancelled:{id}
    res = client.result(jid, timeout=30)
    assert res.finish_reason == "length" and len(res.token_ids) == 60


def test_resume_continues_from_the_text_the_log_holds(client, server, offline):
    """The replay log of an earlier run that sent all its text (it did not hold back the
    tail that this run's stop string could still start): the resumed job sends the rest,
    nothing twice."""
    from qworker.engine.output import OutputProcessor
    from qworker.worker.protocol import Event, log_entry_id

    prompt, k, n = "Resume after a crash", 10, 24
    plain = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    ids = offline.generate(prompt, plain)[0].token_ids
    proc = OutputProcessor(offline.engine.tokenizer)
    proc.add_request("x", [1], plain)
    sent = proc.process("x", ids[:k], False)[0]         # what the first run streamed
    assert len(sent) >= 3
    stop = [sent[-3:] + "\x00"]                          # its tail could start a stop string
    want = offline.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0,
                                                   ignore_eos=True, stop=stop))[0]
    assert want.token_ids == ids and want.finish_reason == "length"
    jid = "resume-emitted"
    r = server.client()
    r.xadd(client.keys.log(jid), {"event": pack(Event(jid, 0, ids[:k], sent).to_map())},
           id=log_entry_id(0))
    client.submit(prompt=prompt, job_id=jid, max_tokens=n, temperature=0.0, ignore_eos=True,
                  stop=stop)
    res = client.result(jid, timeout=30)
    events = list(client.stream(jid, timeout=5))
    assert (res.token_ids, res.text) == (ids, want.text)
    assert "".join(e.text for e in events) == want.text and events[0].seq == 0


def test_an_async_scheduling_worker_streams_the_offline_tokens_and_cancels(tiny, offline):
    """The worker over an engine that launches each step before reading the last (CUDA's
    default, forced on here): the same streamed tokens, a cancel mid-stream frees every
    block, and nothing of the cancelled job's in-flight step is published."""
    from redis_support import RedisServer

    from qworker.engine.engine import Engine

    eng = Engine(tiny, EngineConfig(max_num_seqs=16, num_kv_blocks=512,
                                    async_scheduling=True), device="cpu", dtype="float32")
    srv = RedisServer()
    w = InProcessWorker(eng, srv.url, "w-async", lease_ms=LEASE_MS)
    c = Client(srv.url)
    try:
        prompts = ["The capital of France is", "1, 2, 3,"]
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        ids = [c.submit(prompt=p, max_tokens=12, temperature=0.0, ignore_eos=True)
               for p in prompts]
        long = c.submit(prompt="cancel me", max_tokens=400, ignore_eos=True, temperature=0.0)
        for jid, ref in zip(ids, offline.generate(prompts, params), strict=True):
            events = list(c.stream(jid, timeout=30))
            assert [t for e in events for t in e.token_ids] == ref.token_ids
            assert "".join(e.text for e in events) == ref.text
        stream = c.stream(long, timeout=30)
        for ev in stream:
            if ev.seq >= 3:
                break
        c.cancel(long)
        rest = list(stream)
        assert rest[-1].finished and rest[-1].finish_reason == "cancelled"
        assert [e.seq for e in rest] == list(range(ev.seq + 1, ev.seq + 1 + len(rest)))
        res = c.result(long, timeout=5)
        assert len(res.token_ids) < 400
        wait_for(lambda: not eng.has_unfinished(), 5, what="engine idle")
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    finally:
        c.close()
        w.stop()
        srv.close()
