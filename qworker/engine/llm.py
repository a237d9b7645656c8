"""The offline API: ``LLM(...).generate(prompts, SamplingParams(...))``, named as in vLLM."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from qworker.config import EngineConfig
from qworker.engine.engine import Engine
from qworker.sampling_params import SamplingParams

Prompt = str | list[int]


@dataclass(slots=True)
class RequestOutput:
    """The finished output of one prompt."""

    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


class LLM:
    """Generate offline with continuous batching.

    >>> llm = LLM("smollm2-135m-instruct", device="cpu", dtype="float32")
    >>> outs = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0.0))
    >>> outs[0].text, outs[0].token_ids, outs[0].finish_reason
    """

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto",
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 block_size: int = 16, num_kv_blocks: int | None = None,
                 enable_prefix_caching: bool = True, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.90, enforce_eager: bool = False,
                 load_format: str = "auto", tensor_parallel_size: int = 1,
                 async_scheduling: bool | None = None):
        config = EngineConfig(max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens,
                              block_size=block_size, num_kv_blocks=num_kv_blocks,
                              enable_prefix_caching=enable_prefix_caching,
                              max_model_len=max_model_len,
                              gpu_memory_utilization=gpu_memory_utilization,
                              enforce_eager=enforce_eager, load_format=load_format,
                              tensor_parallel_size=tensor_parallel_size,
                              async_scheduling=async_scheduling)
        self.engine = Engine(model, config, device=device, dtype=dtype)
        self.tokenizer = self.engine.tokenizer
        self._counter = itertools.count()

    def close(self) -> None:
        """Stop tensor-parallel follower processes (``tensor_parallel_size > 1``)."""
        self.engine.close()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order.

        A prompt is a string (tokenized as is; apply a chat template yourself, or use
        ``chat``) or a list of token ids. One SamplingParams applies to all prompts, or
        give one per prompt.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts: "
                                 "give one, or one per prompt")
        priority = list(priority) if priority is not None else [0] * len(prompts)
        outputs: dict[str, RequestOutput] = {}
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                token_ids = self._tokenize(prompt)
                rid = f"offline-{next(self._counter)}"
                self.engine.add_request(rid, token_ids, p, priority=priority[i])
                outputs[rid] = RequestOutput(prompt if isinstance(prompt, str) else None,
                                             token_ids)
                ids.append(rid)
        except Exception:
            for rid in ids:      # all or nothing: a bad prompt leaves no orphans behind
                self.engine.abort(rid)
            raise
        pieces: dict[str, list[str]] = {rid: [] for rid in ids}   # texts joined once at the end
        while self.engine.has_unfinished():
            for o in self.engine.step():
                out = outputs[o.request_id]
                out.token_ids.extend(o.new_token_ids)
                pieces[o.request_id].append(o.text)
                if o.finished:
                    out.finish_reason = o.finish_reason
        for rid in ids:
            outputs[rid].text = "".join(pieces[rid])
        return [outputs[rid] for rid in ids]

    def chat(self, conversations: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
             ) -> list[RequestOutput]:
        """Generate replies to chat conversations, rendered with the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True,
                                                      tokenize=False)
                   for c in conversations]
        return self.generate([self._tokenize(p, special=False) for p in prompts],
                             sampling_params)

    def _tokenize(self, prompt: Prompt, special: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=special)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in prompt):
            return list(prompt)
        raise ValueError(f"a prompt must be a str or a list of int token ids, got "
                         f"{type(prompt).__name__}")
