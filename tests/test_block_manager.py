"""Block manager and scheduler invariants, in pure Python (no model, no torch).

The property test drives the real Scheduler + BlockManager through random interleavings
of add / step / abort; "sampling" appends a token derived from the request's own state,
which is all the scheduler looks at.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qworker.config import EngineConfig
from qworker.engine.block_manager import BlockManager
from qworker.engine.request import Request, RequestStatus
from qworker.engine.scheduler import Scheduler
from qworker.sampling_params import SamplingParams

EOS = 0


def make_request(rid: str, prompt: list[int], max_tokens: int = 8, priority: int = 0,
                 arrival: int = 0) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(rid, list(prompt), params, arrival=arrival, seed=0, priority=priority)


def run_step(sched: Scheduler) -> list[Request]:
    out = sched.schedule()
    sampled = [1 + (len(r.all_token_ids) * 7919) % 97 for r in out.sampling_requests]
    return sched.update_from_output(out, sampled)


def live(sched: Scheduler) -> list[Request]:
    return sched.running + sched.waiting


def test_full_blocks_of_a_shared_prefix_are_reused():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_request("a", list(range(1, 11)))           # 10 tokens: 2 full blocks + 2
    assert bm.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    b = make_request("b", list(range(1, 9)) + [50, 51, 52])
    blocks, num_cached = bm.get_computed_blocks(b)
    assert blocks == a.block_ids[:2] and num_cached == 8
    assert bm.allocate_slots(b, b.num_tokens - num_cached, blocks)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert bm.ref_counts[a.block_ids[0]] == 2
    bm.check_invariants([a, b])


def test_freed_prefix_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(1, 10)))
    assert bm.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    bm.cache_full_blocks(a)
    first_two = a.block_ids[:2]
    bm.free(a)
    bm.check_invariants([])
    c = make_request("c", list(range(1, 9)) + [99])
    blocks, num_cached = bm.get_computed_blocks(c)
    assert blocks == first_two and num_cached == 8


def test_whole_prompt_hit_still_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(1, 9)))            # exactly 2 blocks
    assert bm.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    same = make_request("b", list(range(1, 9)))
    blocks, num_cached = bm.get_computed_blocks(same)
    assert num_cached == 4 and len(blocks) == 1


def test_allocation_that_does_not_fit_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    r = make_request("r", list(range(1, 13)))
    assert not bm.allocate_slots(r, 12)
    assert r.block_ids == [] and bm.num_free_blocks == 2


def test_double_free_is_detected():
    bm = BlockManager(num_blocks=2, block_size=4)
    r = make_request("r", [1, 2, 3])
    assert bm.allocate_slots(r, 3)
    ids = list(r.block_ids)
    bm.free(r)
    r.block_ids = ids
    with pytest.raises(AssertionError, match="freed twice"):
        bm.free(r)


def test_preemption_under_a_tiny_pool_finishes_every_request():
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4)
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(cfg, bm, max_model_len=24, eos_token_ids={EOS})
    for i in range(5):
        sched.add(make_request(f"r{i}", [10 + i] * 5, max_tokens=10, arrival=i))
    finished = []
    for _ in range(500):
        finished += run_step(sched)
        bm.check_invariants(live(sched))
        if not sched.has_unfinished():
            break
    assert sorted(r.request_id for r in finished) == [f"r{i}" for i in range(5)]
    assert all(r.num_output_tokens == 10 for r in finished)
    assert sched.num_preemptions > 0
    assert bm.num_free_blocks == 6


def test_victim_is_lowest_priority_then_latest_arrival():
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4)
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(cfg, bm, max_model_len=64, eos_token_ids={EOS})
    urgent = make_request("urgent", [1] * 3, max_tokens=20, priority=0, arrival=0)
    first = make_request("first", [2] * 3, max_tokens=20, priority=1, arrival=1)
    late = make_request("late", [3] * 3, max_tokens=20, priority=1, arrival=2)
    for r in (urgent, first, late):
        sched.add(r)
    preempted = []
    for _ in range(20):
        out = sched.schedule()
        preempted += [r.request_id for r in out.preempted]
        sampled = [5] * len(out.sampling_requests)
        sched.update_from_output(out, sampled)
        if preempted:
            break
    assert preempted[0] == "late"
    assert urgent.status is RequestStatus.RUNNING


def test_budget_chunks_a_long_prompt_and_decodes_go_first():
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=8, block_size=4)
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(cfg, bm, max_model_len=64, eos_token_ids={EOS})
    short = make_request("short", [7, 8], max_tokens=4, arrival=0)
    sched.add(short)
    run_step(sched)                                    # short prefilled, 1 token out
    sched.add(make_request("long", list(range(1, 21)), arrival=1))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("short", 1), ("long", 7)]
    assert [r.request_id for r in out.sampling_requests] == ["short"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "step", "step", "step", "abort"]),
                              st.integers(0, 10**6)), min_size=1, max_size=80),
       num_blocks=st.integers(4, 24), caching=st.booleans())
def test_no_block_leaked_or_double_freed_under_random_interleavings(ops, num_blocks, caching):
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, block_size=4)
    bm = BlockManager(num_blocks=num_blocks, block_size=4, enable_prefix_caching=caching)
    sched = Scheduler(cfg, bm, max_model_len=num_blocks * 4, eos_token_ids={EOS})
    n = 0
    for op, x in ops:
        if op == "add":
            # A few shared prefixes so that prefix hits happen.
            prompt = [1 + x % 3] * 4 + [5 + x % 11] * (1 + x % 9)
            sched.add(make_request(f"r{n}", prompt[: num_blocks * 4 - 1],
                                   max_tokens=1 + x % 12, priority=x % 2, arrival=n))
            n += 1
        elif op == "step":
            run_step(sched)
        elif live(sched):
            victim = live(sched)[x % len(live(sched))]
            sched.finish(victim, "abort")
        bm.check_invariants(live(sched))
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        run_step(sched)
        bm.check_invariants(live(sched))
    assert not sched.has_unfinished(), "requests starved"
    assert bm.num_free_blocks == num_blocks
    assert all(c == 0 for c in bm.ref_counts)
