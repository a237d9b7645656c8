"""The engine: add requests, step the continuous-batching loop, collect each step's deltas.

``Engine.step()`` is the whole loop in one breath: schedule -> run the model -> sample ->
update request state -> detokenize. The Redis worker and the offline ``LLM`` both drive it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from qworker.config import EngineConfig
from qworker.engine.block_manager import BlockManager
from qworker.engine.output import OutputProcessor
from qworker.engine.request import Request
from qworker.engine.runner import ModelRunner
from qworker.engine.sampler import Sampler, SamplingBatch
from qworker.engine.scheduler import Scheduler
from qworker.model.hub import resolve_model
from qworker.model.loader import load_model
from qworker.sampling_params import SamplingParams


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
        import torch

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
        if self.outputs is not None:
            self.outputs.add_request(request_id, prompt, params, resumed, emitted_text)
        self.scheduler.add(req)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. Returns False if it is unknown."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, "abort")
        if self.outputs is not None:
            self.outputs.remove(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

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
        """Run one iteration: every scheduled request advances; finished ones free their
        blocks at once. Returns a StepOutput for each request that sampled a token."""
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        logits = self.runner.execute(sched)                 # [num_sampling, V] float32
        reqs = sched.sampling_requests
        sampled: list[int] = []
        if reqs:
            batch = SamplingBatch.from_requests(reqs, self.eos_token_ids, self.vocab_size,
                                                logits.device)
            sampled = self.sampler(logits, batch).tolist()  # the step's only host sync
        self.scheduler.update_from_output(sched, sampled)
        results = []
        for req, token in zip(reqs, sampled, strict=True):
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
                self._requests.pop(req.request_id, None)
                if self.outputs is not None:
                    self.outputs.remove(req.request_id)
        return results

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
        }

    def close(self) -> None:
        """Stop the tensor-parallel follower processes, if any (also done at exit)."""
        if self.tp is not None:
            self.tp.shutdown()
