"""The publisher against a real redis-server: a step's deltas are encoded by the PUBLISH
script, byte for byte as the worker encodes an event, and fenced per job; a publisher
that dies of a bug stops its worker, whose job then finishes on another."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_support import InProcessWorker, wait_for

from qworker.worker.connection import RedisSettings
from qworker.worker.keys import Keys
from qworker.worker.protocol import Event, log_entry_id
from qworker.worker.publisher import Holdings, Op, Publisher

CONSUMER = "w-pub"


@pytest.fixture()
def pub(server):
    """A publisher over a fresh prefix, with ``own(job_id)`` putting one entry in its hands."""
    r = server.client()
    r.flushall()
    keys = Keys()
    r.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
    holdings, lost = Holdings(), []
    p = Publisher(RedisSettings.from_url(server.url), keys, CONSUMER, holdings, lost.append,
                  ttl_s=600)

    def own(job_id: str) -> str:
        entry = r.xadd(keys.jobs, {"job": b"x"}).decode()
        r.xreadgroup(keys.group, CONSUMER, {keys.jobs: ">"}, count=1)
        holdings.add(entry, job_id)
        return entry

    p.own, p.lost, p.redis = own, lost, r
    return p


def logged(pub: Publisher, job_id: str) -> list[bytes]:
    return [f[b"event"] for _, f in pub.redis.xrange(pub.keys.log(job_id))]


def wire(job_id: str, seq: int, token_ids: list[int], text: str) -> bytes:
    """What a client receives for this event when the worker encodes it in Python."""
    return msgpack.packb(Event(job_id, seq, token_ids, text).to_map(), use_bin_type=True)


# what a step may carry: ids of any vocabulary, text of any length (fixstr, str8, str16,
# str32 headers) and script, seqs past every small-int form
EDGE = [("job-1", 0, [5], " the"), ("j", 1, [], ""), ("j2", 127, [0, 127, 128], "a" * 31),
        ("job:é/✓", 128, [255, 256, 65535, 65536], "é" * 20),
        ("j3", 65536, [151_935, 2**32 - 1], "x" * 300), ("j4", 2**32, [2**32], "🙂" * 20_000)]


@pytest.mark.parametrize("job_id,seq,token_ids,text", EDGE)
def test_a_delta_is_published_and_logged_as_the_worker_encodes_its_event(
        pub, job_id, seq, token_ids, text):
    entry = pub.own(job_id)
    ps = pub.redis.pubsub()
    ps.subscribe(pub.keys.out(job_id))
    wait_for(lambda: (ps.get_message(timeout=0.1) or {}).get("type") == "subscribe", 10,
             what="the subscription")
    pub._send([Op("deltas", "", rows=[(entry, job_id, seq, token_ids, text)])])
    want = wire(job_id, seq, token_ids, text)
    assert logged(pub, job_id) == [want]
    assert pub.redis.xrange(pub.keys.log(job_id))[0][0].decode() == log_entry_id(seq)
    live = wait_for(lambda: ps.get_message(timeout=0.1), 10, what="the live event")
    assert live["type"] == "message" and live["data"] == want
    assert Event.from_map(msgpack.unpackb(live["data"])) == Event(job_id, seq, token_ids, text)
    assert pub.lost == [] and entry in pub.holdings.snapshot()   # a delta keeps the entry


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job_id=st.text(min_size=1, max_size=40), seq=st.integers(0, 2**40),
       token_ids=st.lists(st.integers(0, 2**32), max_size=8), text=st.text(max_size=300))
def test_any_delta_matches_the_python_encoding_byte_for_byte(pub, job_id, seq, token_ids, text):
    pub.redis.delete(pub.keys.log(job_id))          # the fixture is shared by the examples
    entry = pub.own(job_id)
    pub._send([Op("deltas", "", rows=[(entry, job_id, seq, token_ids, text)])])
    assert logged(pub, job_id)[-1] == wire(job_id, seq, token_ids, text)


def test_resending_a_delta_or_its_python_encoded_twin_is_a_no_op(pub):
    """A batch cut off half-way is sent again; so is an event another encoder wrote."""
    entry = pub.own("a")
    event = Event("a", 0, [7], "hi").to_map()
    pub._send([Op("publish", entry, "a", log_entry_id(0), event)])          # Python-encoded
    pub._send([Op("deltas", "", rows=[(entry, "a", 0, [7], "hi")])])        # script-encoded
    pub._send([Op("deltas", "", rows=[(entry, "a", 0, [7], "hi")])])
    assert logged(pub, "a") == [wire("a", 0, [7], "hi")]
    assert pub.lost == [] and entry in pub.holdings.snapshot()


def test_deltas_beside_finals_are_fenced_per_job(pub):
    """One script call for a step: a job whose entry was taken is dropped (and reported)
    alone; a different event at a logged seq means the job is served elsewhere."""
    a, b, c, d = (pub.own(j) for j in "abcd")
    pub.redis.xack(pub.keys.jobs, pub.keys.group, a)                  # a: acked elsewhere
    pub._send([Op("deltas", "", rows=[(d, "d", 0, [1], "x")])])
    final = Event("c", 0, [9], "!", True, "length").to_map()
    result = {"id": "c", "token_ids": [9], "text": "!", "finish_reason": "length"}
    pub._send([Op("deltas", "", rows=[(a, "a", 0, [1], "x"), (b, "b", 0, [2], "y")]),
               Op("publish", c, "c", log_entry_id(0), final, True, result),
               Op("deltas", "", rows=[(d, "d", 0, [2], "other")])])           # d: a conflict
    assert sorted(pub.lost) == sorted([a, d])
    assert logged(pub, "a") == [] and logged(pub, "b") == [wire("b", 0, [2], "y")]
    assert logged(pub, "d") == [wire("d", 0, [1], "x")]
    assert msgpack.unpackb(pub.redis.get(pub.keys.result("c")))["text"] == "!"
    assert set(pub.holdings.snapshot()) == {b}           # a, d: not ours; c: finished
    assert pub.redis.xpending(pub.keys.jobs, pub.keys.group)["pending"] == 1


def test_a_backlog_is_sent_in_batches_capped_on_events(server):
    """After an outage the queued steps go out merged, but no call carries much more than
    ``max_batch`` events (one Lua call blocks Redis while it runs)."""
    r = server.client()
    r.flushall()
    keys = Keys()
    r.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
    entry = r.xadd(keys.jobs, {"job": b"x"}).decode()
    r.xreadgroup(keys.group, CONSUMER, {keys.jobs: ">"}, count=1)
    holdings = Holdings()
    holdings.add(entry, "j")
    p = Publisher(RedisSettings.from_url(server.url), keys, CONSUMER, holdings, print,
                  ttl_s=600, max_batch=8)
    sent: list[int] = []
    send = p._send
    p._send = lambda ops: (sent.append(sum(o.events for o in ops)), send(ops))[1]
    for step in range(10):                                  # queued before the thread runs
        p.submit([Op("deltas", "", rows=[(entry, "j", step * 3 + i, [i], "t") for i in range(3)])])
    p.start()
    assert p.close(timeout=10)
    assert sum(sent) == 30 and max(sent) <= 8 + 2 and len(sent) >= 4
    assert r.xlen(keys.log("j")) == 30


def test_a_publisher_that_dies_of_a_bug_says_so(server):
    """A batch that cannot be encoded (a lone surrogate in a text) is a bug, not a Redis
    outage: the thread reports it through ``on_crash`` instead of dying silently."""
    r = server.client()
    r.flushall()
    crashes: list[Exception] = []
    p = Publisher(RedisSettings.from_url(server.url), Keys(), CONSUMER, Holdings(), print,
                  ttl_s=600, on_crash=crashes.append)
    p.start()
    p.submit([Op("deltas", "", rows=[("1-0", "j", 0, [1], "\ud800")])])
    p.join(10)
    assert not p.is_alive() and len(crashes) == 1
    assert isinstance(crashes[0], UnicodeEncodeError) and p.crashed is crashes[0]
    assert p.close(timeout=1) is False                  # nothing more was sent


def test_a_worker_whose_publisher_crashes_stops_and_its_job_finishes_elsewhere(
        server, tiny_checkpoint):
    """Fault injected into a real worker's publisher: the worker stops at once (it must not
    keep renewing leases of jobs it can no longer publish), the job stays pending, and a
    healthy worker resumes it after the lease, with nothing lost."""
    import threading

    from qworker.config import EngineConfig
    from qworker.engine.engine import Engine
    from qworker.worker.client import Client
    from qworker.worker.worker import Worker, WorkerCrashed, WorkerSettings

    server.client().flushall()

    def engine():
        return Engine(str(tiny_checkpoint("llama")), EngineConfig(max_num_seqs=4,
                                                                  num_kv_blocks=128),
                      device="cpu", dtype="float32")

    w = Worker(engine(), WorkerSettings(RedisSettings.from_url(server.url), name="w-crash",
                                        lease_ms=1000))

    def fault(ops):
        raise RuntimeError("injected publisher fault")

    w.publisher._calls = fault
    raised: list[BaseException] = []

    def run() -> None:
        try:
            w.run(install_signals=False)
        except BaseException as e:  # noqa: BLE001 - the test inspects what run() raised
            raised.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    client = Client(server.url)
    try:
        jid = client.submit(prompt="Hello", max_tokens=8, temperature=0.0, ignore_eos=True)
        t.join(30)
        assert not t.is_alive(), "the worker kept running without a publisher"
        assert len(raised) == 1 and isinstance(raised[0], WorkerCrashed)
        assert "injected publisher fault" in str(raised[0])
        r = server.client()
        assert r.xpending("qworker:jobs", "workers")["pending"] == 1     # held, not lost
        healthy = InProcessWorker(engine(), server.url, "w-healthy", lease_ms=1000)
        try:
            res = client.result(jid, timeout=30)
            assert res.finish_reason == "length" and len(res.token_ids) == 8
            events = list(client.stream(jid, timeout=30))
            assert [e.seq for e in events] == list(range(len(events)))
            assert [t for e in events for t in e.token_ids] == res.token_ids
        finally:
            healthy.stop()
    finally:
        client.close()
