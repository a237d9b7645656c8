"""Tensor-parallel layers (Megatron style) that are plain layers when the group has one rank.

A model built with ``TPContext(rank, size)`` holds only its rank's shard of each weight:

- ``ColumnParallelLinear`` splits output features; a fused projection (qkv, gate|up) is
  a list of *parts*, each sharded on its own (per head group for q/k/v), so a rank's
  local output is ``[q_r | k_r | v_r]`` and needs no communication.
- ``RowParallelLinear`` splits input features; partial products are all-reduced (the bias
  is added once, after the sum).
- ``VocabParallelEmbedding`` splits vocabulary rows; each rank looks up the ids it owns,
  zeros the rest, and the partial embeddings are all-reduced.
- ``ParallelLMHead`` computes the logits of the rank's vocabulary slice and all-gathers
  them into ``[N, V]`` (its own weight, or the embedding's when tied).

Every layer splits its forward into ``local_forward`` (this rank's partial result: what a
test can combine by hand) and the collective. With ``size == 1`` there is no collective
and no padding: the forward is one ``F.linear`` / ``F.embedding``, as before.
Shapes: T tokens, N rows, H hidden, V vocabulary, r this rank, P ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from qworker.model import cpu_gemm
from qworker.model.ops_dispatch import linear

__all__ = [
    "ColumnParallelLinear", "ParallelLMHead", "RowParallelLinear", "Shard", "TPContext",
    "VocabParallelEmbedding", "even_shard", "head_shard",
]


@dataclass(frozen=True, slots=True)
class TPContext:
    """This process's place in its tensor-parallel group (``size == 1``: no group)."""

    rank: int = 0
    size: int = 1
    group: Any = None           # a torch.distributed ProcessGroup; None: the default group


SINGLE = TPContext()


class Shard(NamedTuple):
    """Rows ``[start, start + length)`` of a checkpoint tensor with ``full`` rows."""

    full: int
    start: int
    length: int


def even_shard(full: int, tp: TPContext, what: str = "size") -> Shard:
    """Rank ``tp.rank``'s equal slice of ``full`` rows."""
    if full % tp.size:
        raise ValueError(f"{what} {full} is not divisible by tensor_parallel_size {tp.size}")
    n = full // tp.size
    return Shard(full, tp.rank * n, n)


def head_shard(num_heads: int, head_dim: int, tp: TPContext, what: str = "heads") -> Shard:
    """The rows (``head_dim`` per head) of the heads rank ``tp.rank`` keeps.

    Heads split evenly when ``num_heads % P == 0``; with fewer heads than ranks
    (``P % num_heads == 0``, e.g. 8 KV heads on 16 ranks) each head is replicated on
    ``P // num_heads`` consecutive ranks, matching the query heads those ranks hold.
    """
    full = num_heads * head_dim
    if num_heads % tp.size == 0:
        n = num_heads // tp.size
        return Shard(full, tp.rank * n * head_dim, n * head_dim)
    if tp.size % num_heads == 0:
        return Shard(full, (tp.rank // (tp.size // num_heads)) * head_dim, head_dim)
    raise ValueError(f"{num_heads} {what} cannot be split over tensor_parallel_size "
                     f"{tp.size}: one must divide the other")


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class _Prepackable:
    """A linear whose single-rank forward can use a weight packed once (CPU, float32).

    ``prepack()`` after the weights are loaded; ``weight`` stays a valid parameter (the
    packed copy is extra memory: the model's linear weights once more)."""

    packed: torch.Tensor | None = None

    weight: torch.Tensor

    def prepack(self) -> bool:
        """Pack ``weight`` for ``cpu_gemm``; False (nothing done) where that does not apply."""
        if not cpu_gemm.available(self.weight):
            return False
        self.packed = cpu_gemm.pack(self.weight)
        return True

    def _linear(self, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is not None:
            return cpu_gemm.packed_linear(x, self.packed, bias)
        return linear(x, weight, bias)


class ColumnParallelLinear(_Prepackable, nn.Module):
    """``y_r = x @ W_r.T + b_r``: this rank's rows of one or more fused projections.

    ``parts`` maps a part name (``"q"``, ``"k"``, ``"v"``; ``"gate"``, ``"up"``) to the
    ``Shard`` of that part's checkpoint tensor this rank keeps (``even_shard``,
    ``head_shard``). Local rows follow the order of ``parts``.
    """

    def __init__(self, n_in: int, parts: dict[str, Shard], bias: bool) -> None:
        super().__init__()
        self.parts = dict(parts)
        self.offsets: dict[str, int] = {}
        rows = 0
        for name, shard in self.parts.items():
            self.offsets[name] = rows
            rows += shard.length
        self.weight = _param(rows, n_in)                       # [sum_parts(len), H_in]
        self.bias = _param(rows) if bias else None

    def load(self, param: str, tensor: torch.Tensor, part: str | None = None) -> int:
        """Copy this rank's rows of ``part``'s checkpoint tensor; returns elements copied."""
        if part not in self.parts:
            raise ValueError(f"no part {part!r} in a projection of {list(self.parts)}")
        full, start, length = self.parts[part]
        dest = getattr(self, param).data.narrow(0, self.offsets[part], length)
        if tensor.shape[0] != full:
            raise ValueError(f"{param} has shape {tuple(tensor.shape)}, expected "
                             f"{(full, *dest.shape[1:])}")
        return _copy(dest, tensor.narrow(0, start, length), param)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.weight, self.bias)         # [T, H_in] -> [T, rows_r]

    forward = local_forward                                    # column outputs stay sharded


class RowParallelLinear(_Prepackable, nn.Module):
    """``y = sum_r x_r @ W_r.T + b``: input features split in ``P`` equal slices."""

    def __init__(self, n_in: int, n_out: int, bias: bool, tp: TPContext = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        _, self.start, self.n_in = even_shard(n_in, tp, "input features")
        self.weight = _param(n_out, self.n_in)                 # [H_out, H_in / P]
        self.bias = _param(n_out) if bias else None

    def load(self, param: str, tensor: torch.Tensor, part: str | None = None) -> int:
        if param == "weight" and tensor.dim() == 2:
            tensor = tensor.narrow(1, self.start, self.n_in)
        return _copy(getattr(self, param).data, tensor, param)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H_in / P] -> this rank's partial sum [T, H_out], bias excluded."""
        return linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._linear(x, self.weight, self.bias)
        y = self.local_forward(x)
        dist.all_reduce(y, group=self.tp.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + V_r)`` of the (padded) embedding table; ids elsewhere give 0."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPContext = SINGLE) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.per_rank = -(-vocab_size // tp.size)               # padded: ceil(V / P)
        self.start = tp.rank * self.per_rank
        self.num_real = max(0, min(vocab_size - self.start, self.per_rank))
        self.weight = _param(self.per_rank, hidden)            # [V_r, H]

    def load(self, param: str, tensor: torch.Tensor, part: str | None = None) -> int:
        if tuple(tensor.shape) != (self.vocab_size, self.weight.shape[1]):
            raise ValueError(f"weight has shape {tuple(tensor.shape)}, expected "
                             f"{(self.vocab_size, self.weight.shape[1])}")
        self.weight.data[self.num_real:].zero_()               # padding rows: never looked up
        _copy(self.weight.data[:self.num_real], tensor[self.start:self.start + self.num_real],
              param)
        return self.weight.numel()

    def local_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] ids -> [T, H]: the rows this rank owns, zeros for the others."""
        local = ids - self.start
        owned = (local >= 0) & (local < self.num_real)
        h = F.embedding(torch.where(owned, local, 0), self.weight)
        return h * owned.unsqueeze(-1).to(h.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)                # [T] -> [T, H]
        h = self.local_forward(ids)
        dist.all_reduce(h, group=self.tp.group)
        return h


class ParallelLMHead(_Prepackable, nn.Module):
    """Logits ``[N, V]`` float32 from hidden ``[N, H]``, vocabulary split like the
    embedding. ``tied``: reuse that embedding's weight (no parameter of its own)."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPContext = SINGLE,
                 tied: VocabParallelEmbedding | None = None) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        if tied is None:
            self.shard = VocabParallelEmbedding(vocab_size, hidden, tp)
        else:                       # shared, not a submodule: the embedding owns the weight
            object.__setattr__(self, "shard", tied)

    @property
    def weight(self) -> nn.Parameter:
        return self.shard.weight                               # [V_r, H]

    def load(self, param: str, tensor: torch.Tensor, part: str | None = None) -> int:
        return self.shard.load(param, tensor, part)

    def local_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._linear(hidden, self.shard.weight, None).float()   # [N, H] -> [N, V_r]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.local_forward(hidden)
        if self.tp.size == 1:
            return logits                                      # [N, V]
        pieces = [torch.empty_like(logits) for _ in range(self.tp.size)]
        dist.all_gather(pieces, logits.contiguous(), group=self.tp.group)
        return torch.cat(pieces, dim=-1)[:, :self.vocab_size]  # [N, P * V_r] -> [N, V]


def _copy(dest: torch.Tensor, src: torch.Tensor, what: str) -> int:
    if tuple(dest.shape) != tuple(src.shape):
        raise ValueError(f"{what} has shape {tuple(src.shape)}, expected {tuple(dest.shape)}")
    dest.copy_(src)
    return src.numel()
