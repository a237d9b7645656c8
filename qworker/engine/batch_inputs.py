"""The host side of a step: ``SchedulerOutput`` -> the runner's int arrays, in staging buffers.

The arrays are written with numpy into reusable CPU buffers (pinned on CUDA, so the
copies to the device are asynchronous). On CUDA two buffer sets alternate, and a set is
refilled only after the event recorded behind its last copies has passed: a step's
inputs can be built while the previous step's copies are still queued, and nothing here
waits on the GPU in the normal course (the engine syncs once per step, on the sampled
ids). Layout and meaning as in docs/design.md, "Model runner".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qworker.engine.request import Request
from qworker.engine.scheduler import SchedulerOutput


@dataclass(slots=True)
class HostBatch:
    """One step's inputs as CPU tensors (views of a staging set; valid until it is reused).

    For a padded decode batch (``pad_to``) the token arrays and ``seq_lens`` have the
    padded length, with padding rows at slot -1 and seq_len 0 (they write no K/V and
    read none); ``query_start_loc`` and ``block_tables`` cover the real requests only.
    """

    num_reqs: int                   # B real requests
    num_tokens: int                 # T tokens (the padded length when padded)
    input_ids: torch.Tensor         # [T] int64
    positions: torch.Tensor         # [T] int64
    slot_mapping: torch.Tensor      # [T] int64, -1 on padding rows
    query_start_loc: torch.Tensor   # [B+1] int32
    seq_lens: torch.Tensor          # [B] int32 ([T] when padded, 0 on padding rows)
    block_tables: torch.Tensor      # [B, M] int32, rows padded with 0
    sample_rows: torch.Tensor       # [S] int64: last token row of each sampling request
    is_decode: bool                 # every request adds one token and samples it
    max_query_len: int
    max_seq_len: int
    staging: _Staging | None = None
    # (token row, request) of decodes whose input token is still pending on the device
    # (asynchronous scheduling): input_ids holds 0 there until the runner fills it in
    pending: list[tuple[int, Request]] | None = None


def tokens_of(req: Request, start: int, end: int) -> list[int]:
    """``req.all_token_ids[start:end]`` without building the whole list."""
    prompt, n = req.prompt_token_ids, len(req.prompt_token_ids)
    if end <= n:
        return prompt[start:end]
    if start >= n:
        return req.output_token_ids[start - n:end - n]
    return prompt[start:] + req.output_token_ids[:end - n]


def fill_input_ids(input_ids: torch.Tensor,
                   fill: tuple[torch.Tensor | int, torch.Tensor]) -> None:
    """Write a batch's pending ids into its device ``input_ids``: ``fill`` = (rows, ids)
    from ``ModelRunner._pending_fill``; an int rows P means rows 0..P-1, in order."""
    rows, ids = fill
    if isinstance(rows, int):
        input_ids[:rows].copy_(ids)
    else:
        input_ids.index_copy_(0, rows, ids)


class _Staging:
    """One set of reusable CPU buffers (grown on demand) and the event behind its copies."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.event: torch.cuda.Event | None = None
        self.tokens = self.reqs = self.table = 0
        self._grow(1024, 256, 256 * 64)

    def _grow(self, tokens: int, reqs: int, table: int) -> None:
        def buf(n: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(n, dtype=dtype, pin_memory=self.pin)

        if tokens > self.tokens:
            self.tokens = max(tokens, 2 * self.tokens)
            # input_ids | positions | slot_mapping | sample_rows | pending rows and their
            # source rows (filled by the runner), one int64 buffer each
            self.i64 = [buf(self.tokens, torch.int64) for _ in range(6)]
        if reqs > self.reqs:
            self.reqs = max(reqs, 2 * self.reqs)
            self.qsl = buf(self.reqs + 1, torch.int32)
            self.seq_lens = buf(self.reqs, torch.int32)
        if table > self.table:
            self.table = max(table, 2 * self.table)
            self.bt = buf(self.table, torch.int32)

    def acquire(self, tokens: int, reqs: int, table: int) -> None:
        if self.event is not None:
            self.event.synchronize()    # the copies of two steps ago: long done
            self.event = None
        self._grow(tokens, reqs, table)


class _BlockTables:
    """Every live request's block ids as a row of one numpy table, kept across steps.

    A running request's ``block_ids`` only grow (they are rebuilt only after a
    preemption, which bumps ``num_preemptions``), so a step copies just the new ids and
    the batch's rows are gathered in one numpy call instead of one list conversion per
    request. Rows of requests absent from a step are reclaimed when rows run out.
    """

    def __init__(self) -> None:
        self.table = np.zeros((64, 64), dtype=np.int32)
        self.rows: dict[str, list] = {}     # request_id -> [row, n, request, preemptions, step]
        self.free = list(range(63, -1, -1))
        self.step = 0

    def row_of(self, req: Request) -> int:
        """The table row holding ``req.block_ids`` (brought up to date)."""
        blocks = req.block_ids
        n = len(blocks)
        if n > self.table.shape[1]:
            grown = np.zeros((self.table.shape[0], max(n, 2 * self.table.shape[1])), np.int32)
            grown[:, :self.table.shape[1]] = self.table
            self.table = grown
        r = self.rows.get(req.request_id)
        if (r is None or r[2] is not req or r[3] != req.num_preemptions or r[1] > n
                or (r[1] and self.table[r[0], r[1] - 1] != blocks[r[1] - 1])):
            row = self._take_row() if r is None else r[0]
            self.table[row] = 0
            self.table[row, :n] = blocks
            r = self.rows[req.request_id] = [row, n, req, req.num_preemptions, self.step]
        elif n > r[1]:
            self.table[r[0], r[1]:n] = blocks[r[1]:]
            r[1] = n
        r[4] = self.step
        return r[0]

    def _take_row(self) -> int:
        if not self.free:       # reclaim rows of requests not in this step, else grow
            for rid in [k for k, r in self.rows.items() if r[4] != self.step]:
                self.free.append(self.rows.pop(rid)[0])
        if not self.free:
            old = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.free = list(range(2 * old - 1, old - 1, -1))
        return self.free.pop()


class BatchBuilder:
    """Builds ``HostBatch``es for the runner; ``pin`` (CUDA) pins and double-buffers."""

    def __init__(self, block_size: int, pin: bool = False) -> None:
        self.block_size = block_size
        self._sets = [_Staging(pin) for _ in range(2 if pin else 1)]
        self._next = 0
        self._tables = _BlockTables()

    def build(self, out: SchedulerOutput, pad_to: int | None = None) -> HostBatch:
        """Validate ``out`` and lay out its inputs. ``pad_to`` (decode batches only) pads
        the token arrays and seq_lens to that many rows."""
        bs = self.block_size
        sched = out.scheduled
        num_reqs = len(sched)
        num_tokens = width = max_q = max_seq = 0
        is_decode = True
        for s in sched:
            req, n = s.request, s.num_new_tokens
            start = req.num_computed_tokens
            end = start + n
            if n < 1 or end > req.num_tokens:
                raise ValueError(f"request {req.request_id}: cannot schedule {n} tokens at "
                                 f"{start} of {req.num_tokens}")
            n_blocks = -(-end // bs)
            if len(req.block_ids) < n_blocks:
                raise ValueError(f"request {req.request_id}: {len(req.block_ids)} blocks "
                                 f"cannot hold {end} tokens (block_size {bs})")
            num_tokens += n
            width, max_q, max_seq = max(width, n_blocks), max(max_q, n), max(max_seq, end)
            is_decode = is_decode and n == 1 and s.samples
        rows = num_tokens
        if pad_to is not None:
            if not is_decode or pad_to < num_reqs:
                raise ValueError(f"only a decode batch of at most {pad_to} requests pads "
                                 f"to {pad_to}")
            rows = pad_to
        st = self._sets[self._next]
        self._next = (self._next + 1) % len(self._sets)
        st.acquire(rows, max(rows, num_reqs), num_reqs * width)
        ids, pos, slots, samp = (t.numpy() for t in st.i64[:4])
        qsl, lens = st.qsl.numpy(), st.seq_lens.numpy()
        tables = self._tables
        tables.step += 1
        table_rows = np.empty(num_reqs, dtype=np.int64)
        qsl[0] = 0
        t = num_samples = 0
        pending: list[tuple[int, Request]] = []
        for i, s in enumerate(sched):
            req, n = s.request, s.num_new_tokens
            start = req.num_computed_tokens
            end = start + n
            blocks = req.block_ids
            if n == 1:
                p = len(req.prompt_token_ids)
                if start < p:
                    ids[t] = req.prompt_token_ids[start]
                elif start - p < len(req.output_token_ids):
                    ids[t] = req.output_token_ids[start - p]
                else:                                   # sampled, not yet read back
                    ids[t] = 0
                    pending.append((t, req))
                pos[t] = start
                slots[t] = blocks[start // bs] * bs + start % bs
            else:
                ids[t:t + n] = tokens_of(req, start, end)
                p = np.arange(start, end, dtype=np.int64)
                pos[t:t + n] = p
                table = np.asarray(blocks[:-(-end // bs)], dtype=np.int64)
                slots[t:t + n] = table[p // bs] * bs + p % bs
            table_rows[i] = tables.row_of(req)
            t += n
            qsl[i + 1] = t
            lens[i] = end
            if s.samples:
                samp[num_samples] = t - 1
                num_samples += 1
        bt = st.bt.numpy()[:num_reqs * width].reshape(num_reqs, width)
        np.take(tables.table[:, :width], table_rows, axis=0, out=bt)
        if rows > t:                               # padding rows: write nothing, read nothing
            ids[t:rows] = 0
            pos[t:rows] = 0
            slots[t:rows] = -1
            lens[num_reqs:rows] = 0
        i64 = st.i64
        return HostBatch(
            num_reqs=num_reqs, num_tokens=rows,
            input_ids=i64[0][:rows], positions=i64[1][:rows], slot_mapping=i64[2][:rows],
            query_start_loc=st.qsl[:num_reqs + 1],
            seq_lens=st.seq_lens[:rows if pad_to is not None else num_reqs],
            block_tables=st.bt[:num_reqs * width].view(num_reqs, width),
            sample_rows=i64[3][:num_samples], is_decode=is_decode,
            max_query_len=max_q, max_seq_len=max_seq, staging=st, pending=pending or None)

    @staticmethod
    def copies_issued(batch: HostBatch) -> None:
        """Call after the batch's last host->device copy was queued (CUDA only)."""
        st = batch.staging
        if st is not None and st.pin:
            st.event = torch.cuda.Event()
            st.event.record()
