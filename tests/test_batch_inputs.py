"""The runner's host-side batch builder lays out exactly the tensors of docs/design.md
("Model runner"), step after step, while its block-table rows are reused across steps,
requests grow, are preempted and ids come back; decode batches pad with inert rows."""

from __future__ import annotations

import random

import pytest
import torch

from qworker.engine.batch_inputs import BatchBuilder
from qworker.engine.request import Request
from qworker.engine.scheduler import ScheduledRequest, SchedulerOutput
from qworker.sampling_params import SamplingParams

BS = 4


def reference(out: SchedulerOutput) -> dict[str, list]:
    """The layout computed the plain way, as the runner once did."""
    ids, pos, slots, qsl, lens, tables, rows = [], [], [], [0], [], [], []
    for s in out.scheduled:
        r, n = s.request, s.num_new_tokens
        start, end = r.num_computed_tokens, r.num_computed_tokens + n
        blocks = r.block_ids[:-(-end // BS)]
        ids += r.all_token_ids[start:end]
        pos += range(start, end)
        slots += [blocks[p // BS] * BS + p % BS for p in range(start, end)]
        qsl.append(qsl[-1] + n)
        lens.append(end)
        tables.append(blocks)
        if s.samples:
            rows.append(qsl[-1] - 1)
    return dict(input_ids=ids, positions=pos, slot_mapping=slots, query_start_loc=qsl,
                seq_lens=lens, tables=tables, sample_rows=rows)


def check(batch, ref) -> None:
    for name in ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens",
                 "sample_rows"):
        assert getattr(batch, name).tolist() == ref[name], name
    assert batch.input_ids.dtype == torch.int64 and batch.seq_lens.dtype == torch.int32
    width = max(len(t) for t in ref["tables"])
    assert tuple(batch.block_tables.shape) == (len(ref["tables"]), width)
    for row, blocks in zip(batch.block_tables.tolist(), ref["tables"], strict=True):
        assert row[:len(blocks)] == blocks


def test_random_steps_match_the_plain_layout_while_rows_are_reused():
    rng = random.Random(0)
    builder = BatchBuilder(BS)
    free = list(range(10_000))
    rng.shuffle(free)
    live: list[Request] = []
    counter = 0
    for _ in range(300):
        while len(live) < rng.randint(1, 40):           # admit (ids come back: r0, r1, ...)
            prompt = [rng.randint(0, 999) for _ in range(rng.randint(1, 30))]
            live.append(Request(f"r{counter % 50}", prompt, SamplingParams(),
                                arrival=counter, seed=0))
            counter += 1
        if rng.random() < 0.1:                          # preempt one: new blocks later
            r = rng.choice(live)
            free += r.block_ids
            r.block_ids, r.num_computed_tokens = [], 0
            r.num_preemptions += 1
        sched = []
        for r in live:
            n = 1 if r.num_computed_tokens == r.num_tokens - 1 else \
                rng.randint(1, r.num_tokens - r.num_computed_tokens)
            need = -(-(r.num_computed_tokens + n) // BS) - len(r.block_ids)
            r.block_ids += [free.pop() for _ in range(max(0, need))]
            sched.append(ScheduledRequest(r, n))
        out = SchedulerOutput(sched)
        check(builder.build(out), reference(out))
        for s in sched:                                  # advance as the scheduler would
            s.request.num_computed_tokens += s.num_new_tokens
            if s.samples:
                s.request.output_token_ids.append(rng.randint(0, 999))
        done = [r for r in live if r.num_tokens > 60]
        for r in done:
            free += r.block_ids
            live.remove(r)


def test_a_padded_decode_batch_has_inert_padding_rows():
    reqs = [Request(f"r{i}", list(range(5 + i)), SamplingParams(), arrival=i, seed=0,
                    num_computed_tokens=4 + i, block_ids=[10 * i, 10 * i + 1, 10 * i + 2])
            for i in range(3)]
    out = SchedulerOutput([ScheduledRequest(r, 1) for r in reqs])
    batch = BatchBuilder(BS).build(out, pad_to=8)
    ref = reference(out)
    assert batch.num_reqs == 3 and batch.num_tokens == 8
    assert batch.input_ids.tolist() == ref["input_ids"] + [0] * 5
    assert batch.slot_mapping.tolist() == ref["slot_mapping"] + [-1] * 5
    assert batch.seq_lens.tolist() == ref["seq_lens"] + [0] * 5
    assert batch.query_start_loc.tolist() == ref["query_start_loc"]
    assert batch.sample_rows.tolist() == [0, 1, 2] and batch.is_decode


def test_only_decode_batches_pad():
    r = Request("a", list(range(9)), SamplingParams(), arrival=0, seed=0, block_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="decode"):
        BatchBuilder(BS).build(SchedulerOutput([ScheduledRequest(r, 9)]), pad_to=8)
