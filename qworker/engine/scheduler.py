"""The iteration-level scheduler: decides, every step, which requests run and how far."""

from __future__ import annotations

from bisect import insort
from dataclasses import dataclass, field

from qworker.config import EngineConfig
from qworker.engine.block_manager import BlockManager
from qworker.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: ``num_new_tokens`` tokens from position ``start``.

    Fixed when scheduled (the request's own counters advance only in
    ``Scheduler.update_from_output``, after the runner has used this)."""

    request: Request
    num_new_tokens: int
    start: int = field(init=False)
    samples: bool = field(init=False)   # reaches the end of the known tokens: samples one

    def __post_init__(self) -> None:
        self.start = self.request.num_computed_tokens
        self.samples = self.start + self.num_new_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def sampling_requests(self) -> list[Request]:
        """Requests that sample a token this step, in batch order (the logits' rows)."""
        return [s.request for s in self.scheduled if s.samples]


class Scheduler:
    """Decides every step which requests run and how many tokens each advances.

    One token-budget rule covers prefill and decode (as in vLLM v1): each scheduled
    request catches its ``num_computed_tokens`` up towards ``num_tokens``. Running
    requests go first (a decode takes one token, an unfinished prefill its next chunk),
    then waiting ones by (priority, arrival), under ``max_num_batched_tokens`` and
    ``max_num_seqs``. When the KV pool runs dry the running request with the largest
    (priority, arrival) is preempted: its blocks are freed and it recomputes later.
    Never touches tensors or Redis.
    """

    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int,
                 eos_token_ids: set[int]):
        self.config = config
        self.bm = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Request] = []      # kept sorted by Request.sort_key
        self.running: list[Request] = []      # admission order
        self.num_preemptions = 0
        # Admission keeps this many blocks spare so new requests don't force an
        # immediate preemption of running ones.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    # ---- queue changes -------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        insort(self.waiting, request, key=lambda r: r.sort_key)

    def finish(self, request: Request, reason: str) -> None:
        """End ``request`` now and free its blocks (finish, abort, stop string)."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.bm.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.bm.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.add(request)

    # ---- the step ------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        done: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending_tokens and self._ends_by_length(req):
                i += 1          # its last token is in flight: it finishes when that lands
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.bm.allocate_slots(req, n):
                # Lowest priority, latest arrival among those not yet scheduled this step.
                victim = max((r for r in self.running if id(r) not in done),
                             key=lambda r: r.sort_key)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n))
                done.add(id(req))
                budget -= n
                i += 1
        if out.preempted:
            return out    # the pool is full: admit nobody new this step
        while (self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            if req.num_pending_tokens:
                break           # preempted with a token in flight: back once it lands
            computed, num_cached = self.bm.get_computed_blocks(req)
            n = min(req.num_tokens - num_cached, budget)
            need = self.bm.blocks_for(num_cached + n) - len(computed)
            if need > self.bm.num_free_blocks - self.watermark_blocks and self.running:
                break
            if not self.bm.allocate_slots(req, n, computed):
                break
            self.bm.prefix_query_tokens += req.num_tokens
            self.bm.prefix_hit_tokens += num_cached
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.waiting.pop(0)
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out

    def update_from_output(self, out: SchedulerOutput, sampled: list[int]) -> list[Request]:
        """``advance`` then ``resolve``: the synchronous step. Returns the requests that
        finished."""
        self.advance(out)
        return self.resolve(out, sampled)

    def advance(self, out: SchedulerOutput) -> None:
        """The step ``out`` was launched: its tokens count as computed, and each sampling
        request has one more token pending (on the device, id not yet read)."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            if s.samples:
                s.request.num_pending_tokens += 1

    def resolve(self, out: SchedulerOutput, sampled: list[int]) -> list[Request]:
        """The sampled ids of an ``advance``d step (one per sampling request, in batch
        order) are known: append them, register the blocks they filled, and finish the
        requests that hit EOS, a stop token id, max_tokens or the context limit. A request
        finished meanwhile (aborted, stop string) drops its token. Steps resolve in launch
        order. Returns the requests that finished."""
        reqs = out.sampling_requests
        for req, token in zip(reqs, sampled, strict=True):
            req.num_pending_tokens -= 1
            if not req.is_finished:
                req.output_token_ids.append(token)
        for s in out.scheduled:
            if s.request.status is RequestStatus.RUNNING:
                self.bm.cache_full_blocks(s.request)
        finished = []
        for req, token in zip(reqs, sampled, strict=True):
            if req.is_finished:
                continue
            reason = self._stop_reason(req, token)
            if reason is not None:
                self.finish(req, reason)
                finished.append(req)
        return finished

    def _ends_by_length(self, req: Request) -> bool:
        """Whether the tokens known and pending already reach max_tokens or the context
        limit (so scheduling ``req`` again would only compute a token to throw away)."""
        p = req.sampling_params
        outputs = req.num_output_tokens + req.num_pending_tokens
        return ((p.max_tokens is not None and outputs >= p.max_tokens)
                or req.num_tokens >= self.max_model_len)

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.sampling_params
        if req.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
                return "stop"
        if p.max_tokens is not None and req.num_output_tokens >= p.max_tokens:
            return "length"
        if req.num_known_tokens >= self.max_model_len:
            return "length"
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)
