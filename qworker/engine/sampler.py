"""Sampler: logits of the sampling rows -> next token ids (vLLM's semantics).

Per row, in order: min_tokens bans (eos + stop_token_ids), repetition / presence /
frequency penalties, greedy argmax (temperature 0) or temperature, then top-k, top-p and
min-p restrict the support, then a seeded draw. The draw uses the Gumbel-max trick with
noise from a counter-based hash of (seed, position, vocab index) in int64 tensor ops, so a
row's token depends only on its own logits, seed and position: never on the batch, the row
index, the device or on preemption. ``Sampler.__call__`` does no GPU->CPU synchronisation;
every per-row value is built once by ``SamplingBatch.from_requests``.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from qworker.engine.request import Request

_SAMPLING_EPS = 1e-5  # temperature below this is greedy (vLLM)


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MUL1 = _i64(0xBF58476D1CE4E5B9)
_MUL2 = _i64(0x94D049BB133111EB)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: a bijection on 64-bit words (wrapping int64 arithmetic)."""
    x = (x ^ _srl(x, 30)) * _MUL1
    x = (x ^ _srl(x, 27)) * _MUL2
    return x ^ _srl(x, 31)


def hash_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform noise in (0, 1) that depends only on (seed, position, vocab index).

    seeds, positions: [B] int64 -> [B, V] float32. The integer part is bit-identical on
    every device; u = (top 23 bits + 0.5) / 2**23 is exact in float32.
    """
    row_key = _mix64(_mix64(seeds) ^ positions)                               # [B]
    counter = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seeds.device)
    x = _mix64(row_key[:, None] + counter[None, :] * _GOLDEN)                 # [B, V]
    return (_srl(x, 41).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling state for one step, already on the logits' device.

    Rows follow the order of the requests given to ``from_requests``. Optional tensors are
    None when no row of the batch needs them (so the sampler skips that stage); the seven
    per-row tensors of a random draw are None when every row is greedy (no copies to the
    device for them: a greedy decode step then copies nothing here).
    """

    temperature: torch.Tensor | None    # [B] float32, 1.0 on greedy rows
    greedy: torch.Tensor | None         # [B] bool
    top_k: torch.Tensor | None          # [B] int64 in [1, V] (V = off)
    top_p: torch.Tensor | None          # [B] float32 in (0, 1]
    min_p: torch.Tensor | None          # [B] float32 in [0, 1]
    seeds: torch.Tensor | None          # [B] int64
    positions: torch.Tensor | None      # [B] int64: index of the token being sampled
    all_greedy: bool
    needs_filter: bool                  # some sampling row uses top-k, top-p or min-p
    repetition_penalty: torch.Tensor | None = None   # [B] float32
    frequency_penalty: torch.Tensor | None = None    # [B] float32
    presence_penalty: torch.Tensor | None = None     # [B] float32
    seen_mask: torch.Tensor | None = None            # [B, V] bool: in prompt or output
    output_counts: torch.Tensor | None = None        # [B, V] float32: counts in output
    banned_rows: torch.Tensor | None = None          # [N] int64 } logits[r, c] = -inf
    banned_cols: torch.Tensor | None = None          # [N] int64 } (min_tokens)

    @classmethod
    def from_requests(cls, requests: list[Request], eos_token_ids: Iterable[int],
                      vocab_size: int, device: torch.device | str) -> SamplingBatch:
        """Gather the per-row tensors for ``requests`` (one logits row each, in order).

        eos_token_ids: the model's end-of-sequence ids; with stop_token_ids they are banned
        while a request has fewer than ``min_tokens`` output tokens (also under ignore_eos,
        as in vLLM). Ids outside [0, vocab_size) are ignored.
        """
        V = vocab_size
        eos = sorted(set(eos_token_ids))
        sps = [r.sampling_params for r in requests]
        greedy = [sp.temperature < _SAMPLING_EPS for sp in sps]
        top_k = [min(sp.top_k, V) if sp.top_k > 0 else V for sp in sps]

        def t(values: list, dtype: torch.dtype) -> torch.Tensor:
            return _to_device(torch.tensor(values, dtype=dtype), device)

        if all(greedy):
            batch = cls(None, None, None, None, None, None, None, all_greedy=True,
                        needs_filter=False)
        else:
            batch = cls(
                temperature=t([1.0 if g else sp.temperature
                               for g, sp in zip(greedy, sps, strict=True)], torch.float32),
                greedy=t(greedy, torch.bool),
                top_k=t(top_k, torch.int64),
                top_p=t([sp.top_p for sp in sps], torch.float32),
                min_p=t([sp.min_p for sp in sps], torch.float32),
                seeds=t([r.seed for r in requests], torch.int64),
                positions=t([r.num_tokens for r in requests], torch.int64),
                all_greedy=False,
                needs_filter=any(not g and (k < V or sp.top_p < 1.0 or sp.min_p > 0.0)
                                 for g, k, sp in zip(greedy, top_k, sps, strict=True)),
            )
        if any(sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0
               or sp.frequency_penalty != 0.0 for sp in sps):
            batch._add_penalties(requests, V, device)
        banned = [(row, tok) for row, r in enumerate(requests)
                  if r.num_output_tokens + r.num_pending_tokens < r.sampling_params.min_tokens
                  for tok in sorted(set(eos) | set(r.sampling_params.stop_token_ids))
                  if 0 <= tok < V]
        if banned:
            batch.banned_rows = t([row for row, _ in banned], torch.int64)
            batch.banned_cols = t([tok for _, tok in banned], torch.int64)
        return batch

    def _add_penalties(self, requests: list[Request], V: int,
                       device: torch.device | str) -> None:
        sps = [r.sampling_params for r in requests]
        def f32(values: list[float]) -> torch.Tensor:
            return _to_device(torch.tensor(values, dtype=torch.float32), device)

        self.repetition_penalty = f32([sp.repetition_penalty for sp in sps])
        self.frequency_penalty = f32([sp.frequency_penalty for sp in sps])
        self.presence_penalty = f32([sp.presence_penalty for sp in sps])
        # Only rows that use a penalty pay for gathering their token ids.
        out_ids = [r.output_token_ids if sp.repetition_penalty != 1.0
                   or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0 else []
                   for r, sp in zip(requests, sps, strict=True)]
        prompt_ids = [r.prompt_token_ids if sp.repetition_penalty != 1.0 else []
                      for r, sp in zip(requests, sps, strict=True)]
        self.output_counts = _bincount_rows(out_ids, V, device)             # [B, V]
        self.seen_mask = (_bincount_rows(prompt_ids, V, device) > 0) | (self.output_counts > 0)


def _to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy a CPU tensor to ``device`` without blocking the host: a copy from pageable
    memory to a GPU waits for the stream, i.e. for the step's forward pass."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _int64_cpu(values: Iterable[int]) -> torch.Tensor:
    """A CPU int64 tensor from Python ints (via array: far faster than torch.tensor(list))."""
    buf = array.array("q", values)
    return torch.frombuffer(buf, dtype=torch.int64) if buf else torch.empty(0, dtype=torch.int64)


def _bincount_rows(rows: list[list[int]], V: int, device: torch.device | str) -> torch.Tensor:
    """Per-row token counts: B lists of ids -> [B, V] float32 (ids outside [0, V) dropped)."""
    ids = _to_device(_int64_cpu(itertools.chain.from_iterable(rows)), device)  # [N]
    row_idx = _to_device(torch.repeat_interleave(torch.arange(len(rows)),
                                                 _int64_cpu(map(len, rows))), device)  # [N]
    ids = torch.where((ids < 0) | (ids >= V), V, ids)                         # spill column V
    counts = torch.zeros(len(rows), V + 1, dtype=torch.float32, device=device)
    counts.index_put_((row_idx, ids), torch.ones_like(ids, dtype=torch.float32),
                      accumulate=True)
    return counts[:, :V]


class Sampler:
    """``Sampler()(logits[B, V] float32, batch) -> next token ids [B] int64``."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits.to(torch.float32)
        if batch.banned_rows is not None:
            logits = logits.index_put((batch.banned_rows, batch.banned_cols),
                                      torch.full((), float("-inf"), device=logits.device))
        if batch.seen_mask is not None:
            logits = apply_penalties(logits, batch)
        greedy_ids = logits.argmax(dim=-1)                                   # [B]
        if batch.all_greedy:
            return greedy_ids
        logits = logits / batch.temperature[:, None]
        if batch.needs_filter:
            logits = apply_top_k_top_p_min_p(logits, batch.top_k, batch.top_p, batch.min_p)
        u = hash_uniform(batch.seeds, batch.positions, logits.shape[-1])     # [B, V]
        gumbel = -torch.log(-torch.log(u))
        sampled = (logits + gumbel).argmax(dim=-1)                           # [B]
        return torch.where(batch.greedy, greedy_ids, sampled)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt+output tokens (divide positive logits,
    multiply negative ones), then frequency (x count) and presence (x seen) over output."""
    rep = batch.repetition_penalty[:, None]                                  # [B, 1]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(batch.seen_mask, penalized, logits)
    logits = logits - batch.frequency_penalty[:, None] * batch.output_counts
    return logits - batch.presence_penalty[:, None] * (batch.output_counts > 0)


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's support to -inf.

    logits [B, V] (already divided by temperature); top_k [B] int64 in [1, V];
    top_p, min_p [B]. Top-k keeps the k largest, top-p then keeps the smallest prefix of
    the renormalised top-k distribution whose mass reaches p, min-p keeps tokens with
    probability >= min_p * max probability. The largest logit always survives.
    """
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)              # [B, V]
    rank = torch.arange(V, device=logits.device)[None, :]                    # [1, V]
    keep = rank < top_k[:, None]                                             # top-k
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)                                    # [B, V]
    mass_before = probs.cumsum(dim=-1) - probs
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)         # top-p
    keep &= probs >= min_p[:, None] * probs[:, :1]                           # min-p
    keep[:, 0] = True
    keep_vocab = torch.empty_like(keep).scatter_(1, order, keep)             # back to ids
    return logits.masked_fill(~keep_vocab, float("-inf"))
