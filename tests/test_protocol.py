"""Wire protocol v1 without Redis: every hostile payload becomes a JobError with a clear
code, valid jobs round-trip, events are ordered once, XAUTOCLAIM replies of Redis 6.2
and 7 parse the same."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qworker.sampling_params import MAX_TOKENS_LIMIT
from qworker.worker.intake import derived_seed, parse_autoclaim
from qworker.worker.protocol import (
    MAX_JOB_BYTES,
    Event,
    JobError,
    Result,
    decode_job,
    log_entry_id,
    pack,
    seq_of_entry_id,
)
from qworker.worker.streaming import StreamCursor, build_job


def job(**kw):
    base = {"v": 1, "id": "j1", "prompt": "hello", "params": {"max_tokens": 4}}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def nested(depth: int):
    obj: object = 1
    for _ in range(depth):
        obj = [obj]
    return obj


HOSTILE = [  # (payload bytes, expected code, id that must still be reported)
    (b"", "invalid_payload", None),
    (b"\xc1", "invalid_payload", None),
    (b"not msgpack at all", "invalid_payload", None),
    (pack(job()) + b"\x00", "invalid_payload", None),
    (pack([1, 2, 3]), "invalid_job", None),
    (pack("a string"), "invalid_job", None),
    (pack(None), "invalid_job", None),
    (pack(job(v=2)), "unsupported_version", "j1"),
    (pack(job(v=None)), "unsupported_version", "j1"),
    (pack(job(id=None)), "invalid_job", None),
    (pack(job(id="has space")), "invalid_job", None),
    (pack(job(id="x" * 129)), "invalid_job", None),
    (pack(job(id=7)), "invalid_job", None),
    (pack(job(prompt=None)), "invalid_job", "j1"),
    (pack(job(prompt_token_ids=[1, 2])), "invalid_job", "j1"),
    (pack(job(prompt=5)), "invalid_prompt", "j1"),
    (pack(job(prompt="")), "invalid_prompt", "j1"),
    (pack(job(prompt=None, prompt_token_ids=[])), "invalid_prompt", "j1"),
    (pack(job(prompt=None, prompt_token_ids=[1, -1])), "invalid_prompt", "j1"),
    (pack(job(prompt=None, prompt_token_ids=[1, "a"])), "invalid_prompt", "j1"),
    (pack(job(prompt=None, prompt_token_ids=[1, True])), "invalid_prompt", "j1"),
    (pack(job(prompt=None, messages=[{"role": "user"}])), "invalid_prompt", "j1"),
    (pack(job(prompt=None, messages="hi")), "invalid_prompt", "j1"),
    (pack(job(prompt=None, messages=[])), "invalid_prompt", "j1"),
    (pack(job(params={"max_tokens": 0})), "invalid_params", "j1"),
    (pack(job(params={"max_tokens": -5})), "invalid_params", "j1"),
    (pack(job(params={"max_tokens": MAX_TOKENS_LIMIT + 1})), "invalid_params", "j1"),
    (pack(job(params={"max_tokens": "10"})), "invalid_params", "j1"),
    (pack(job(params={"temperature": -1.0})), "invalid_params", "j1"),
    (pack(job(params={"temperature": float("nan")})), "invalid_params", "j1"),
    (pack(job(params={"top_p": 0})), "invalid_params", "j1"),
    (pack(job(params={"beam_width": 4})), "invalid_params", "j1"),
    (pack(job(params={"stop": 5})), "invalid_params", "j1"),
    (pack(job(params=[1])), "invalid_params", "j1"),
    (pack(job(priority="high")), "invalid_job", "j1"),
    (pack(job(priority=2**40)), "invalid_job", "j1"),
    (pack(job(deadline_ms=-1)), "invalid_job", "j1"),
    (pack(job(tenant=5)), "invalid_job", "j1"),
    (pack(job(colour="red")), "invalid_job", "j1"),
    (pack({1: "int key"}), "invalid_payload", None),
    (pack(job(prompt=nested(20))), "invalid_payload", None),
    (b"\x91" * 5000 + b"\x01", "invalid_payload", None),
    (b"\xdd\xff\xff\xff\xff", "invalid_payload", None),        # array of 4 billion items
    (b"\xdb\x7f\xff\xff\xff", "invalid_payload", None),        # str of 2 GiB, no body
    (b"\xa3\xff\xfe\xfd", "invalid_payload", None),            # str with bad UTF-8
    (pack(job())[:-3], "invalid_payload", None),               # truncated
    (msgpack.packb(msgpack.ExtType(1, b"x")), "invalid_payload", None),
]


@pytest.mark.parametrize("raw,code,jid", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_payload_is_a_job_error_with_code_and_id(raw, code, jid):
    with pytest.raises(JobError) as e:
        decode_job(raw)
    assert e.value.code == code, e.value.message
    assert e.value.job_id == jid
    assert e.value.message and len(e.value.message) < 400


def test_oversized_payload_is_refused_before_decoding():
    raw = pack(job(prompt="x" * (MAX_JOB_BYTES + 10)))
    with pytest.raises(JobError, match="limit is") as e:
        decode_job(raw)
    assert e.value.code == "invalid_payload"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_job_error(raw):
    try:
        decode_job(raw)
    except JobError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
                    | st.binary(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                         max_size=4),
                    max_leaves=20))
def test_arbitrary_msgpack_values_never_raise_anything_but_job_error(obj):
    try:
        decode_job(pack(obj))
    except JobError:
        pass


def test_build_job_round_trips_through_decode():
    jid, raw = build_job(messages=[{"role": "user", "content": "hi"}], job_id="abc:1",
                         priority=-3, deadline=5, tenant="t", max_tokens=7, temperature=0.5,
                         stop=["\n"])
    j = decode_job(raw)
    assert (jid, j.id, j.priority, j.tenant) == ("abc:1", "abc:1", -3, "t")
    assert j.messages == [{"role": "user", "content": "hi"}]
    assert j.params.max_tokens == 7 and j.params.stop == ["\n"]
    assert j.deadline_ms - j.submitted_ms == 5000


def test_build_job_refuses_bad_input_before_it_reaches_redis():
    with pytest.raises(ValueError, match="exactly one"):
        build_job("a", prompt_token_ids=[1])
    with pytest.raises(ValueError, match="job_id"):
        build_job("a", job_id="bad id")
    with pytest.raises(ValueError, match="unknown sampling parameter"):
        build_job("a", beams=3)


def test_event_and_result_maps_round_trip():
    ev = Event("j", 3, [1, 2], "ab", True, "stop", None, {"prompt_tokens": 1}, {"total_ms": 1.0})
    assert Event.from_map(msgpack.unpackb(pack(ev.to_map()))) == ev
    res = Result("j", [1], "a", "error", {"code": "x", "message": "y"})
    assert Result.from_map(msgpack.unpackb(pack(res.to_map()))) == res


def test_log_entry_ids_encode_the_seq():
    assert log_entry_id(0) == "0-1"
    assert seq_of_entry_id(b"0-42") == 41


def test_stream_cursor_takes_each_seq_once_in_order():
    cur = StreamCursor()
    ev = [Event("j", i, [i], str(i), i == 3) for i in range(4)]
    assert [cur.accept(e) for e in (ev[0], ev[0], ev[2], ev[1], ev[2], ev[1], ev[3])] == \
        ["take", "skip", "gap", "take", "take", "skip", "take"]
    assert cur.finished and cur.accept(ev[3]) == "skip"


def test_autoclaim_reply_of_redis_7_lists_deleted_ids():
    cursor, entries, deleted = parse_autoclaim([b"0-0", [(b"1-1", {b"job": b"x"})], [b"1-2"]])
    assert (cursor, entries, deleted) == ("0-0", [("1-1", {b"job": b"x"})], ["1-2"])


def test_autoclaim_reply_of_redis_6_2_has_nil_for_deleted_entries():
    cursor, entries, deleted = parse_autoclaim([b"5-0", [(b"1-1", {b"job": b"x"}), (None, None)]])
    assert (cursor, deleted) == ("5-0", [])
    assert entries == [("1-1", {b"job": b"x"}), (None, None)]


def test_derived_seed_is_stable_and_in_range():
    assert derived_seed("job-1") == derived_seed("job-1") != derived_seed("job-2")
    assert 0 <= derived_seed("x") < 2**63
