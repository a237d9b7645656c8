"""CUDA graphs of the model's forward for decode-only batches, one per batch-size bucket.

A decode batch of B requests runs the graph of the smallest bucket >= B. The graphs read
static device buffers (input_ids, positions, slot_mapping, seq_lens, block_tables,
query_start_loc); a step copies its inputs into them and replays. Rows past B are
padding: slot -1 (no K/V written) and seq_len 0 (no K/V read). Everything a graph
launches is fixed at capture, so the attention kernel's launch shape comes from the
buffer shapes alone (no device value is read on the host). The graphs share one memory
pool and are captured largest first, so the pool holds about one batch's activations.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from qworker.engine.batch_inputs import HostBatch, fill_input_ids
from qworker.model.llama import AttentionMetadata, LlamaForCausalLM

log = logging.getLogger(__name__)


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every 8 to 32, every 16 beyond."""
    sizes = [1, 2, 4, 8, 16, 24, 32, *range(48, max_num_seqs + 1, 16)]
    return sorted({b for b in sizes if b < max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    """Captures and replays the decode graphs of ``model`` over ``kv_caches``.

    ``width``: block-table columns of the static buffer (blocks of the longest request).
    """

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_num_seqs: int, width: int, device: torch.device) -> None:
        self.model, self.kv_caches, self.width = model, kv_caches, width
        self.buckets = decode_buckets(max_num_seqs)
        n = self.buckets[-1]
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, **i64)                     # [n]
        self.positions = torch.zeros(n, **i64)                     # [n]
        self.slot_mapping = torch.full((n,), -1, **i64)            # [n]
        self.seq_lens = torch.zeros(n, **i32)                      # [n]
        self.query_start_loc = torch.arange(n + 1, **i32)          # [n+1]: one token each
        self.block_tables = torch.zeros(n, width, **i32)           # [n, width]
        self._bt_landing = torch.zeros(n * width, **i32)           # contiguous H2D target
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._hidden: dict[int, torch.Tensor] = {}                 # graph outputs [b, H]
        self.capture_seconds = 0.0

    def bucket_for(self, num_reqs: int, num_blocks: int) -> int | None:
        """The bucket a decode batch of ``num_reqs`` requests needing ``num_blocks``
        block-table columns runs in, or None (too large: run eagerly)."""
        if num_blocks > self.width or num_reqs > self.buckets[-1]:
            return None
        return self.buckets[bisect.bisect_left(self.buckets, num_reqs)]

    def _attn(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:b],
                                 query_start_loc=self.query_start_loc[:b + 1],
                                 seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b],
                                 kv_caches=self.kv_caches)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket (largest first). The buffers hold padding meanwhile, so
        the warm-up runs write and read no K/V."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            args = (self.input_ids[:b], self.positions[:b], self._attn(b))
            self.model(*args)                       # warm-up: compiles this shape's kernels
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._hidden[b] = self.model(*args)
            self._graphs[b] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        log.info("captured %d decode graphs (batch %d..%d) in %.1f s", len(self.buckets),
                 self.buckets[0], self.buckets[-1], self.capture_seconds)

    def run(self, batch: HostBatch, bucket: int,
            fill: tuple[torch.Tensor | int, torch.Tensor] | None = None) -> torch.Tensor:
        """Copy ``batch`` (padded to ``bucket`` rows) into the buffers and replay:
        hidden states ``[B, H]`` of the real rows. ``fill`` = (rows, ids) on the device
        overwrites those input ids (tokens pending from the step before; see
        ``batch_inputs.fill_input_ids``)."""
        b, m = batch.num_reqs, batch.block_tables.shape[1]
        if batch.num_tokens != bucket:
            raise ValueError(f"batch padded to {batch.num_tokens} rows, bucket is {bucket}")
        self.input_ids[:bucket].copy_(batch.input_ids, non_blocking=True)
        if fill is not None:
            fill_input_ids(self.input_ids, fill)
        self.positions[:bucket].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:bucket].copy_(batch.slot_mapping, non_blocking=True)
        self.seq_lens[:bucket].copy_(batch.seq_lens, non_blocking=True)
        landing = self._bt_landing[:b * m].view(b, m)
        landing.copy_(batch.block_tables, non_blocking=True)
        self.block_tables[:b, :m].copy_(landing)     # device to device; columns >= m unread
        self._graphs[bucket].replay()
        return self._hidden[bucket][:b]
