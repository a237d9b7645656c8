"""The state of one request inside the engine: data only, no mechanics."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from qworker.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"      # not yet scheduled, or preempted (its KV was dropped)
    RUNNING = "running"      # holds KV blocks and is scheduled every step
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    """One generation request.

    Invariants: ``num_computed_tokens <= num_tokens``; the K/V of the first
    ``num_computed_tokens`` tokens are in the blocks ``block_ids`` (in order); a WAITING
    request holds no blocks. ``num_tokens`` counts ``num_pending_tokens``: tokens sampled
    on the device whose ids the host has not read yet (asynchronous scheduling, at most
    two: one step in flight, the next one scheduled); ``all_token_ids`` holds the known
    ones only.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival: int                      # monotonic admission counter: FCFS tie-break
    seed: int                         # sampling seed (drawn at admission when not given)
    priority: int = 0                 # lower value is served first (vLLM's convention)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    # Output tokens that were already emitted before this engine saw the request (a job
    # resumed from its replay log): they are never emitted again.
    num_resumed_tokens: int = 0
    num_pending_tokens: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Known tokens plus pending ones: the index of the next token to sample."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: priority, then first come first served."""
        return (self.priority, self.arrival)
