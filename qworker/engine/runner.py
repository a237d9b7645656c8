"""ModelRunner: one scheduled step -> batch tensors -> model -> logits of the sampled rows."""

from __future__ import annotations

import torch

from qworker.config import EngineConfig
from qworker.engine.scheduler import SchedulerOutput
from qworker.model.llama import AttentionMetadata
from qworker.model.loader import LoadedModel


class ModelRunner:
    """Owns the paged KV cache and runs the model on one ``SchedulerOutput`` at a time.

    ``num_kv_blocks`` is ``config.num_kv_blocks`` when given, else sized from memory by
    ``_num_blocks_for_device``. Per layer the caches are ``[num_kv_blocks, block_size,
    Hkv, D]`` (docs/design.md, "KV cache layout").
    """

    def __init__(self, loaded: LoadedModel, config: EngineConfig,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.model = loaded.model
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = config.block_size
        self.vocab_size = self.model.vocab_size
        self.num_kv_blocks = config.num_kv_blocks or self._num_blocks_for_device()
        shape = (self.num_kv_blocks, self.block_size, self.model.num_kv_heads,
                 self.model.head_dim)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (torch.zeros(shape, dtype=dtype, device=self.device),
             torch.zeros(shape, dtype=dtype, device=self.device))
            for _ in range(self.model.num_layers)]

    # -- sizing ---------------------------------------------------------------------------

    def bytes_per_block(self) -> int:
        """K and V bytes of one block across all layers."""
        m = self.model
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * elem

    def _num_blocks_for_device(self) -> int:
        """How many KV blocks fit the memory budget of ``self.device``.

        CPU: ``config.cpu_kv_cache_gb``. CUDA: a first approximation (a share of the
        memory free now, after the weights are loaded); the GPU engineer replaces it with
        a profiled peak-activation budget under ``config.gpu_memory_utilization``.
        """
        if self.device.type == "cpu":
            budget = int(self.config.cpu_kv_cache_gb * 2**30)
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = (1.0 - self.config.gpu_memory_utilization) * total
            budget = int(free - reserve - 2**30)        # 1 GiB for activations (rough)
        else:
            raise ValueError(f"no KV cache sizing for device {self.device}; "
                             "set EngineConfig.num_kv_blocks")
        n = budget // self.bytes_per_block()
        if n < 1:
            raise ValueError(f"no room for a single KV block on {self.device} "
                             f"({self.bytes_per_block()} bytes each, budget {budget})")
        return int(n)

    # -- one step -------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Run one step; return float32 logits ``[num_sampled, V]`` for the last token of
        each request whose ``ScheduledRequest.samples`` is True, in batch order.

        Request b contributes ``all_token_ids[start:start+n]`` at positions
        ``start..start+n-1`` with ``start = num_computed_tokens``; its ``block_ids`` must
        already cover ``start+n`` tokens.
        """
        if not out.scheduled:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=self.device)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        for s in out.scheduled:
            req, n = s.request, s.num_new_tokens
            start, end = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens
            if n < 1 or end > req.num_tokens:
                raise ValueError(f"request {req.request_id}: cannot schedule {n} tokens at "
                                 f"{start} of {req.num_tokens}")
            n_blocks = -(-end // bs)
            if len(req.block_ids) < n_blocks:
                raise ValueError(f"request {req.request_id}: {len(req.block_ids)} blocks "
                                 f"cannot hold {end} tokens (block_size {bs})")
            blocks = req.block_ids[:n_blocks]
            input_ids += req.all_token_ids[start:end]
            positions += range(start, end)
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, end)]
            query_start_loc.append(query_start_loc[-1] + n)
            seq_lens.append(end)
            tables.append(blocks)
            if s.samples:
                sample_rows.append(query_start_loc[-1] - 1)
        width = max(len(t) for t in tables)
        tables = [t + [0] * (width - len(t)) for t in tables]

        attn = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),              # [T]
            query_start_loc=self._tensor(query_start_loc, torch.int32), # [B+1]
            seq_lens=self._tensor(seq_lens, torch.int32),               # [B]
            block_tables=self._tensor(tables, torch.int32),             # [B, M]
            kv_caches=self.kv_caches,
        )
        with torch.inference_mode():
            hidden = self.model(self._tensor(input_ids, torch.int64),   # [T] -> [T, H]
                                self._tensor(positions, torch.int64), attn)
            if not sample_rows:
                return torch.empty(0, self.vocab_size, dtype=torch.float32,
                                   device=self.device)
            rows = self._tensor(sample_rows, torch.int64)               # [S]
            return self.model.compute_logits(hidden.index_select(0, rows))  # [S, V] fp32

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)
