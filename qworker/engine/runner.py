"""ModelRunner: one scheduled step -> batch tensors -> model -> logits of the sampled rows.

On CUDA: inputs are laid out in pinned staging buffers and copied without blocking;
decode-only batches replay CUDA graphs (``cuda_graphs``), other batches run eagerly; the
KV pool is sized from ``gpu_memory_utilization`` after a profiling forward at
``max_num_batched_tokens`` has measured peak activation memory. Nothing here waits on
the GPU: the engine's fetch of the sampled ids is the step's one synchronisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from qworker.config import EngineConfig
from qworker.engine.batch_inputs import BatchBuilder, HostBatch, fill_input_ids
from qworker.engine.cuda_graphs import DecodeGraphs
from qworker.engine.scheduler import SchedulerOutput
from qworker.model.llama import AttentionMetadata
from qworker.model.loader import LoadedModel
from qworker.model.ops_dispatch import kernels_module

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PendingTokens:
    """A launched step's sampled ids, still on the device: request ``r`` sampled
    ``ids[rows[r.request_id]]`` (asynchronous scheduling reads them from here)."""

    ids: torch.Tensor               # [S] int64
    rows: dict[str, int]


_GRAPH_RESERVE = 512 << 20      # CUDA-graph pool and allocator slack, beyond the profile


class ModelRunner:
    """Owns the paged KV cache and runs the model on one ``SchedulerOutput`` at a time.

    ``num_kv_blocks`` is ``config.num_kv_blocks`` when given, else sized from memory by
    ``_num_blocks_for_device``. Per layer the caches are ``[num_kv_blocks, block_size,
    Hkv, D]`` (docs/design.md, "KV cache layout"). ``memory`` reports the sizing.
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.model = loaded.model
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = config.block_size
        self.vocab_size = self.model.vocab_size
        self.max_model_len = config.max_model_len or loaded.max_model_len
        self.memory: dict[str, float] = {}
        on_cuda = self.device.type == "cuda"
        self.builder = BatchBuilder(self.block_size, pin=on_cuda)
        if on_cuda and kernels_module() is None:
            log.warning("no Triton kernels: the torch reference ops sync the host on every "
                        "call; running eagerly")
        self.num_kv_blocks = config.num_kv_blocks or self._num_blocks_for_device()
        self.kv_caches = self._allocate_kv(self.num_kv_blocks)
        self.graphs: DecodeGraphs | None = None
        if on_cuda and not config.enforce_eager and kernels_module() is not None:
            width = -(-self.max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, self.kv_caches, config.max_num_seqs, width,
                                       self.device)
            self.graphs.capture()
            self.memory["graph_capture_s"] = round(self.graphs.capture_seconds, 2)

    def _allocate_kv(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (num_blocks, self.block_size, self.model.num_kv_heads, self.model.head_dim)
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.device))
                for _ in range(self.model.num_layers)]

    # -- sizing ---------------------------------------------------------------------------

    def bytes_per_block(self) -> int:
        """K and V bytes of one block across all layers."""
        m = self.model
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * elem

    def _num_blocks_for_device(self) -> int:
        """How many KV blocks fit the memory budget of ``self.device``.

        CPU: ``config.cpu_kv_cache_gb``. CUDA: ``gpu_memory_utilization`` of the card,
        less what is in use now (weights, context, other processes), less the peak
        activations of a profiling forward at ``max_num_batched_tokens``, the sampler's
        float32 working set and a reserve for the CUDA-graph pool.
        """
        if self.device.type == "cpu":
            budget = int(self.config.cpu_kv_cache_gb * 2**30)
        elif self.device.type == "cuda":
            activation = self._profile_activation_bytes()
            free, total = torch.cuda.mem_get_info(self.device)
            sampler = 6 * self.config.max_num_seqs * self.vocab_size * 4
            budget = int(total * self.config.gpu_memory_utilization - (total - free)
                         - activation - sampler - _GRAPH_RESERVE)
            gib = 2.0**30
            self.memory.update(total_gib=round(total / gib, 2),
                               in_use_gib=round((total - free) / gib, 2),
                               weights_gib=round(torch.cuda.memory_allocated(self.device) / gib, 2),
                               activation_gib=round(activation / gib, 3),
                               sampler_gib=round(sampler / gib, 3),
                               kv_gib=round(max(budget, 0) / gib, 2))
        else:
            raise ValueError(f"no KV cache sizing for device {self.device}; "
                             "set EngineConfig.num_kv_blocks")
        n = budget // self.bytes_per_block()
        if n < 1:
            raise ValueError(f"no room for a single KV block on {self.device} "
                             f"({self.bytes_per_block()} bytes each, budget {budget}); lower "
                             "max_num_batched_tokens or raise gpu_memory_utilization")
        return int(n)

    @torch.inference_mode()
    def _profile_activation_bytes(self) -> int:
        """Peak bytes allocated beyond the weights by a forward of one request of
        ``max_num_batched_tokens`` tokens (plus the logits of ``max_num_seqs`` rows), over
        a throw-away KV cache just large enough. Also compiles the prefill kernels."""
        t = self.config.max_num_batched_tokens
        bs, dev = self.block_size, self.device
        n_blocks = -(-t // bs)
        kv = self._allocate_kv(n_blocks)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        i32 = dict(dtype=torch.int32, device=dev)
        positions = (torch.arange(t, dtype=torch.int64, device=dev)
                     % self.model.cos_sin_cache.shape[0])
        attn = AttentionMetadata(
            slot_mapping=torch.arange(t, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor([0, t], **i32), seq_lens=torch.tensor([t], **i32),
            block_tables=torch.arange(n_blocks, **i32)[None, :], kv_caches=kv)
        ids = torch.arange(t, dtype=torch.int64, device=dev) % self.vocab_size
        hidden = self.model(ids, positions, attn)
        logits = self.model.compute_logits(hidden[-min(t, self.config.max_num_seqs):])
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        del kv, attn, hidden, logits
        torch.cuda.empty_cache()
        return int(peak)

    # -- one step -------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput, pending: PendingTokens | None = None
                ) -> torch.Tensor:
        """Run one step; return float32 logits ``[num_sampled, V]`` for the last token of
        each request whose ``ScheduledRequest.samples`` is True, in batch order.

        Request b contributes ``all_token_ids[start:start+n]`` at positions
        ``start..start+n-1`` with ``start = num_computed_tokens``; its ``block_ids`` must
        already cover ``start+n`` tokens. A decode whose token is still pending (sampled by
        the step before, not read back) takes it from ``pending`` on the device. On CUDA
        the result is still being computed when this returns.
        """
        if not out.scheduled:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.device)
        bucket = self._decode_bucket(out)
        batch = self.builder.build(out, pad_to=bucket)
        with torch.inference_mode():
            fill = self._pending_fill(batch, pending)
            if bucket is not None:
                hidden = self.graphs.run(batch, bucket, fill)            # [B, H], all sample
                self.builder.copies_issued(batch)
                return self.model.compute_logits(hidden)                 # [B, V] fp32
            dev = self._to_device(batch)
            self.builder.copies_issued(batch)
            if fill is not None:
                fill_input_ids(dev.input_ids, fill)
            hidden = self.model(dev.input_ids, dev.positions, AttentionMetadata(
                slot_mapping=dev.slot_mapping, query_start_loc=dev.query_start_loc,
                seq_lens=dev.seq_lens, block_tables=dev.block_tables,
                kv_caches=self.kv_caches))                              # [T, H]
            if dev.sample_rows.numel() == 0:
                return torch.empty(0, self.vocab_size, dtype=torch.float32,
                                   device=self.device)
            return self.model.compute_logits(hidden.index_select(0, dev.sample_rows))

    def _pending_fill(self, batch: HostBatch, pending: PendingTokens | None
                      ) -> tuple[torch.Tensor | int, torch.Tensor] | None:
        """(rows [P], ids [P]) on the device: the input ids of ``batch.pending``, gathered
        from the previous step's sampled ids without reading them on the host. rows is
        an int P when they are rows 0..P-1 fed by ids 0..P-1 in order (a steady decode
        batch): then one device copy fills them, with nothing to upload."""
        if not batch.pending:
            return None
        if pending is None:
            raise ValueError("the batch has pending tokens but no step in flight holds them")
        k, rows = len(batch.pending), pending.rows
        dst, src = batch.staging.i64[4][:k], batch.staging.i64[5][:k]
        d, s = dst.numpy(), src.numpy()
        d[:] = [row for row, _ in batch.pending]                  # numpy: no per-item torch
        s[:] = [rows[req.request_id] for _, req in batch.pending]
        if (d == np.arange(k)).all() and (s == d).all():
            return k, pending.ids[:k]
        dst = dst.to(self.device, non_blocking=True)
        src = src.to(self.device, non_blocking=True)
        return dst, pending.ids.index_select(0, src)

    def _decode_bucket(self, out: SchedulerOutput) -> int | None:
        """The graph bucket of a decode-only batch, or None to run eagerly."""
        if self.graphs is None:
            return None
        bs, width = self.block_size, 0
        for s in out.scheduled:
            if s.num_new_tokens != 1 or not s.samples:
                return None
            width = max(width, -(-(s.request.num_computed_tokens + 1) // bs))
        return self.graphs.bucket_for(len(out.scheduled), width)

    def _to_device(self, b: HostBatch) -> HostBatch:
        if self.device.type == "cpu":
            return b

        def d(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=True)

        return HostBatch(b.num_reqs, b.num_tokens, d(b.input_ids), d(b.positions),
                         d(b.slot_mapping), d(b.query_start_loc), d(b.seq_lens),
                         d(b.block_tables), d(b.sample_rows), b.is_decode, b.max_query_len,
                         b.max_seq_len)
