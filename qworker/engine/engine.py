"""The engine: add requests, step the continuous-batching loop, collect each step's deltas.

``Engine.step()`` is the whole loop in one breath: schedule -> run the model -> sample ->
update request state -> detokenize (with asynchronous scheduling, the next step is
launched before this one's sampled ids are read). The Redis worker and the offline
``LLM`` both drive it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import torch

from qworker.config import EngineConfig
from qworker.engine.block_manager import BlockManager
from qworker.engine.output import OutputProcessor
from qworker.engine.request import Request
from qworker.engine.runner import ModelRunner, PendingTokens
from qworker.engine.sampler import Sampler, SamplingBatch
from qworker.engine.scheduler import Scheduler, SchedulerOutput
from qworker.model.hub import resolve_model
from qworker.model.loader import load_model
from qworker.sampling_params import SamplingParams


@dataclass(slots=True)
class _Launched:
    """A step queued on the device whose sampled ids the host has not read."""

    sched: SchedulerOutput
    host: torch.Tensor | None            # [S] int64 sampled ids (pinned on CUDA)
    event: Any                           # torch.cuda.Event behind the copy; None on CPU
    pending: PendingTokens | None        # the same ids on the device, for the next step


@dataclass(slots=True)
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    text: str                       # text delta; the deltas join to the whole output text
    finished: bool
    finish_reason: str | None       # "stop" or "length" when finished
    num_prompt_tokens: int
    num_output_tokens: int          # all output tokens so far, resumed ones included


class Engine:
    """A continuous-batching engine over a paged KV cache.

    ``model`` is an alias (``smollm2-135m-instruct``) or a Hugging Face checkpoint dir.
    ``device``: "cpu", "cuda", "cuda:N" or "auto"; ``dtype``: "float32", "bfloat16",
    "float16" or "auto" (bfloat16 on CUDA, float32 on the CPU).
    """

    def __init__(self, model: str, config: EngineConfig | None = None, device: str = "auto",
                 dtype: str = "auto"):
        self.config = config or EngineConfig()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16, float16 or auto, got {dtype!r}")
        self.device = torch.device(device)
        self.tp = None                  # rank 0's handle on the tensor-parallel followers
        if self.config.tensor_parallel_size > 1:
            from qworker.engine.distributed import start_tensor_parallel
            self.tp = start_tensor_parallel(resolve_model(model), self.config, self.device,
                                            getattr(torch, dtype))
            self.loaded, self.runner = self.tp.loaded, self.tp.runner
        else:
            self.loaded = load_model(resolve_model(model), self.device, getattr(torch, dtype),
                                     self.config.load_format)
            self.runner = ModelRunner(self.loaded, self.config, self.device,
                                      getattr(torch, dtype))
        self.tokenizer = self.loaded.tokenizer
        self.eos_token_ids = set(self.loaded.eos_token_ids)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        model_len = self.config.max_model_len or self.loaded.max_model_len
        # A lone request must always fit in the pool, or preemption could never help it.
        self.max_model_len = min(model_len, self.runner.num_kv_blocks * self.config.block_size)
        self.scheduler = Scheduler(self.config, self.block_manager, self.max_model_len,
                                   self.eos_token_ids)
        self.sampler = Sampler()
        # Without a tokenizer (random-weight benchmarks) requests carry token ids only.
        self.outputs = OutputProcessor(self.tokenizer) if self.tokenizer is not None else None
        self.vocab_size = int(self.loaded.config.vocab_size)
        self._requests: dict[str, Request] = {}
        self._history_ids: set[str] = set()     # running requests that use penalties
        async_on = self.config.async_scheduling         # None: on for one CUDA device
        if async_on is None:
            async_on = self.device.type == "cuda" and self.tp is None
        self.async_scheduling = bool(async_on)
        self._inflight: _Launched | None = None  # launched, sampled ids not read yet
        self.num_steps = 0                                   # launched so far (stats)
        # time the host spent waiting for sampled ids: near 0 means host-bound
        self.wait_seconds = 0.0
        self._arrivals = 0
        self._avg_prompt_len = 256.0

    # ---- requests ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, output_token_ids: list[int] | None = None,
                    emitted_text: str | None = None) -> None:
        """Queue a request. ``output_token_ids`` resumes a job whose earlier tokens were
        already emitted elsewhere: they count as output and are not emitted again.
        ``emitted_text``: the text the earlier run emitted for them (its deltas joined);
        text it held back for a possible stop string is then emitted later, not lost, and
        nothing it did emit comes twice (see ``OutputProcessor.add_request``).
        Raises ValueError for an unusable request (the engine is unchanged)."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt = list(prompt_token_ids)
        resumed = list(output_token_ids or [])
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in prompt + resumed
               if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) + len(resumed) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt) + len(resumed)} tokens but this worker "
                             f"takes at most {self.max_model_len - 1} (max_model_len "
                             f"{self.max_model_len} includes the output)")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        req = Request(request_id, prompt, params, arrival=self._arrivals, seed=seed,
                      priority=priority, output_token_ids=resumed,
                      num_resumed_tokens=len(resumed))
        self._arrivals += 1
        self._avg_prompt_len = 0.9 * self._avg_prompt_len + 0.1 * req.num_tokens
        self._requests[request_id] = req
        if params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 \
                or params.frequency_penalty != 0.0:
            self._history_ids.add(request_id)
        if self.outputs is not None:
            self.outputs.add_request(request_id, prompt, params, resumed, emitted_text)
        self.scheduler.add(req)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. Returns False if it is unknown."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        self.scheduler.finish(req, "abort")
        self._forget(request_id)
        return True

    def has_unfinished(self) -> bool:
        """Whether a request is queued or running, or a launched step is not read yet."""
        return self.scheduler.has_unfinished() or self._inflight is not None

    def capacity(self) -> int:
        """How many more requests could start soon: free sequence slots, bounded by the
        free KV blocks left after the queued requests' prompts (at the average prompt size
        seen so far). The worker pulls no more than this from Redis."""
        s = self.scheduler
        slots = self.config.max_num_seqs - len(s.running) - len(s.waiting)
        queued = sum(self.block_manager.blocks_for(r.num_tokens) for r in s.waiting)
        spare = self.block_manager.num_free_blocks - queued - s.watermark_blocks
        per_request = self.block_manager.blocks_for(int(self._avg_prompt_len) + 1)
        return max(0, min(slots, spare // per_request))

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the loop ------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one iteration; returns a StepOutput for each request that sampled a token.

        Synchronous (the CPU's default): schedule -> run -> sample -> read the ids ->
        update -> detokenize; every scheduled request advances and finished ones free
        their blocks at once. Asynchronous (``EngineConfig.async_scheduling``, CUDA's
        default): this call schedules and launches step N+1, whose decodes take step N's
        sampled ids on the device, and only then reads step N's ids and returns step N's
        outputs; so the first call returns nothing, and the host's work (scheduling,
        inputs, detokenization, and the caller's own) runs while the GPU computes."""
        prev, self._inflight = self._inflight, None
        if prev is not None and self._history_ids:
            return self._resolve(prev)      # penalties need every id on the host first
        sched = self.scheduler.schedule()
        cur = self._launch(sched, prev) if sched.scheduled else None
        if self.async_scheduling:
            self._inflight = cur
            return self._resolve(prev) if prev is not None else []
        return self._resolve(cur) if cur is not None else []

    def _launch(self, sched: SchedulerOutput, prev: _Launched | None) -> _Launched:
        """Queue one step on the device: forward, sampler, and the copy of the sampled
        ids to the host; nothing here waits for the device."""
        self.num_steps += 1
        logits = self.runner.execute(sched, prev.pending if prev is not None else None)
        reqs = sched.sampling_requests
        ids = host = event = None
        if reqs:
            batch = SamplingBatch.from_requests(reqs, self.eos_token_ids, self.vocab_size,
                                                logits.device)
            ids = self.sampler(logits, batch)                  # [S] int64, on the device
            host = ids
            if ids.device.type == "cuda":
                host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
                host.copy_(ids, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
        self.scheduler.advance(sched)
        pending = None
        if ids is not None:
            pending = PendingTokens(ids, {r.request_id: i for i, r in enumerate(reqs)})
        return _Launched(sched, host, event, pending)

    def _resolve(self, step: _Launched) -> list[StepOutput]:
        """Read a launched step's sampled ids (the step's one wait on the device) and turn
        them into request state and outputs."""
        reqs = step.sched.sampling_requests
        sampled: list[int] = []
        if reqs:
            if step.event is not None:
                t0 = time.perf_counter()
                step.event.synchronize()
                self.wait_seconds += time.perf_counter() - t0
            sampled = step.host.tolist()
        gone = {id(r) for r in reqs if r.is_finished}          # aborted or stopped meanwhile
        self.scheduler.resolve(step.sched, sampled)
        results = []
        for req, token in zip(reqs, sampled, strict=True):
            if id(req) in gone:
                continue
            text, stopped = "", False
            if self.outputs is not None:
                text, stopped = self.outputs.process(req.request_id, [token], req.is_finished)
            if stopped:         # a stop string wins over a length limit hit in the same step
                if req.is_finished:
                    req.finish_reason = "stop"
                else:
                    self.scheduler.finish(req, "stop")
            results.append(StepOutput(req.request_id, [token], text, req.is_finished,
                                      req.finish_reason, req.num_prompt_tokens,
                                      req.num_output_tokens))
            if req.is_finished:
                self._forget(req.request_id)
        return results

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._history_ids.discard(request_id)
        if self.outputs is not None:
            self.outputs.remove(request_id)

    def stats(self) -> dict[str, float]:
        """Gauges for heartbeats and metrics."""
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_usage": round(bm.usage, 4),
            "kv_blocks": bm.num_blocks,
            "preemptions": self.scheduler.num_preemptions,
            "prefix_hit_rate": round(bm.prefix_hit_tokens / max(1, bm.prefix_query_tokens), 4),
            "steps": self.num_steps,
            "gpu_wait_s": round(self.wait_seconds, 3),
        }

    def close(self) -> None:
        """Stop the tensor-parallel follower processes, if any (also done at exit)."""
        if self.tp is not None:
            self.tp.shutdown()
