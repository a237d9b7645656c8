"""Engine configuration: the knobs of the continuous-batching loop (pure Python)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EngineConfig:
    """How the engine schedules and sizes its KV cache.

    max_num_seqs: most requests running at once.
    max_num_batched_tokens: token budget of one step (decodes + prefill chunks).
    block_size: tokens per KV block.
    num_kv_blocks: size of the KV pool; None sizes it from memory
        (``gpu_memory_utilization`` on CUDA, ``cpu_kv_cache_gb`` on the CPU).
    enable_prefix_caching: reuse full KV blocks of identical prefixes.
    max_model_len: longest prompt + output; None takes the model's own limit.
    load_format: "auto" reads the checkpoint's weights; "dummy" initializes random
        weights from config.json alone (benchmarks of real shapes, no weight files).
    tensor_parallel_size: GPUs (of one host) one model is sharded across; rank 0 runs
        the scheduler (``qworker.engine.distributed``). 1: no parallelism, no overhead.
    async_scheduling: schedule and launch step N+1 before reading step N's sampled ids,
        so the host's work overlaps the GPU's (sampled ids feed the next step on the
        device; a request that stops computes one token that is thrown away). None: on
        for CUDA without tensor parallelism, off elsewhere (the CPU has nothing to
        overlap). While a request with a repetition/presence/frequency penalty runs,
        steps are synchronous (the penalties need every earlier token).
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_gb: float = 1.0
    enforce_eager: bool = False
    load_format: str = "auto"
    tensor_parallel_size: int = 1
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")

        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size",
                     "tensor_parallel_size"):
            positive_int(name)
        if self.block_size & (self.block_size - 1) or self.block_size > 256:
            raise ValueError(f"block_size must be a power of two <= 256 (16 or 32 on CUDA), "
                             f"got {self.block_size}")
        if self.num_kv_blocks is not None:
            positive_int("num_kv_blocks")
        if self.max_model_len is not None:
            positive_int("max_model_len")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise ValueError("gpu_memory_utilization must be in [0.05, 0.99], "
                             f"got {self.gpu_memory_utilization}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' (read the weights) or 'dummy' "
                             f"(random weights, for benchmarks), got {self.load_format!r}")
        if self.async_scheduling not in (None, True, False):
            raise ValueError(f"async_scheduling must be True, False or None (auto), got "
                             f"{self.async_scheduling!r}")
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError("async_scheduling is not supported with tensor_parallel_size > 1 "
                             "(leave it None: off with tensor parallelism)")
        if not self.cpu_kv_cache_gb > 0:
            raise ValueError(f"cpu_kv_cache_gb must be > 0, got {self.cpu_kv_cache_gb}")
