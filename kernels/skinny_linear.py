"""linear: ``y = x @ W.T (+ b)`` for a few rows (decode batches), twin of ``ops.linear``.

A decode step multiplies a handful of rows by each weight matrix, so it is bound by
reading the weights once. Here every program owns ``BLOCK_N`` output columns and the
whole of K for one 16-row tile of x: it streams its ``[BLOCK_N, K]`` slice of W through
tensor cores (``tl.dot``; rows past M are zeros) and writes its outputs once. There is
no split-K and no reduction kernel, and the launch config depends on (N, K) alone, so:

- a row's result is bitwise the same whatever the number of rows beside it (batch
  invariance by construction: each 16-row tile runs the same instructions over K);
- the grid is fixed for a given M bucket, which is what CUDA graphs need.

Each program reads all of x, so x costs M / BLOCK_N of the weight's traffic (from L2):
the kernel pays off up to 16 rows (one tile). There, on the H200, it beats cuBLAS in the
decode graph on most decode shapes measured; ``TUNED`` records the configs and the one
shape where cuBLAS stays (docs/benchmarks.md). ``qworker.model.ops_dispatch.linear``
routes: at most 16 rows and ``linear_wins`` -> here, else cuBLAS.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._utils import pdl_options, pdl_wait

BLOCK_M = 16            # rows per tile: the smallest tensor-core tile (fixed: invariance)


class LinearConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@triton.jit(do_not_specialize=["M"])
def _skinny_linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K,
                          stride_xm, stride_wn, stride_om,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                          USE_PDL: tl.constexpr):
    # grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); x [M, K], w [N, K] (K contiguous in
    # both), out [M, N]. acc [BLOCK_M, BLOCK_N] float32 over the whole of K, in K order:
    # every row tile runs the same instructions, so a row's result depends on neither M
    # nor the tile it falls in.
    pdl_wait(USE_PDL)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]   # [BM, BK]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]   # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok, other=0.0)
            w = tl.load(w_ptrs, mask=n_ok, other=0.0)
        else:
            k_ok = (offs_k + k) < K
            x = tl.load(x_ptrs, mask=m_ok & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok & k_ok[:, None], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok & n_ok)


# Per weight shape (N, K): the config measured best at one row on the H200
# (scripts/bench_kernels.py --only linear --sweep), or None where cuBLAS was measured
# faster inside the decode graph (scripts/profile_decode.py --ab-batches). Shapes not
# listed take `_default_config`, which follows the same pattern.
TUNED: dict[tuple[int, int], LinearConfig | None] = {
    (6144, 4096): LinearConfig(64, 128, 4, 5),      # Llama-3.1-8B qkv
    (4096, 4096): LinearConfig(32, 128, 4, 5),      # 8B o_proj
    (28672, 4096): LinearConfig(64, 256, 4, 3),     # 8B gate|up
    (4096, 14336): None,                            # 8B down: graph 0.3-0.5 ms slower
    (128256, 4096): LinearConfig(64, 128, 4, 3),    # 8B lm_head
    (4096, 1024): LinearConfig(32, 128, 4, 5),      # Qwen3-0.6B qkv
    (1024, 2048): LinearConfig(16, 256, 4, 5),      # 0.6B o_proj
    (6144, 1024): LinearConfig(64, 128, 4, 5),      # 0.6B gate|up
    (1024, 3072): LinearConfig(16, 256, 4, 5),      # 0.6B down
    (151936, 1024): LinearConfig(64, 128, 4, 3),    # 0.6B lm_head
}


@functools.lru_cache(maxsize=64)
def _default_config(n: int, k: int) -> LinearConfig:
    block_n = 64 if n >= 6144 else (32 if n >= 2048 else 16)
    if k >= 8192:
        return LinearConfig(block_n, 512, num_warps=4, num_stages=3)
    return LinearConfig(block_n, min(128, max(16, triton.next_power_of_2(k))), 4, 5)


def config_for(n: int, k: int) -> LinearConfig | None:
    """The launch config of an ``[N, K]`` weight (never a function of M: invariance), or
    None where cuBLAS is the faster choice."""
    return TUNED[(n, k)] if (n, k) in TUNED else _default_config(n, k)


def launch_config(n: int, k: int) -> LinearConfig:
    """The config ``linear`` launches with for an ``[N, K]`` weight: the table's, or the
    heuristic's where the table keeps cuBLAS (a direct call still runs the kernel)."""
    return config_for(n, k) or _default_config(n, k)


def linear_wins(n: int, k: int) -> bool:
    """Whether decode rows times an ``[N, K]`` weight should take this kernel."""
    return config_for(n, k) is not None


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear expects x [M, K] and weight [N, K], got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if x.dtype != weight.dtype or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ValueError(f"x ({x.dtype}), weight ({weight.dtype}) and bias must agree: "
                         f"bias must be [{weight.shape[0]}]")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           *, out: torch.Tensor | None = None,
           config: LinearConfig | None = None) -> torch.Tensor:
    """x: [M, K], weight: [N, K], bias: [N] or None -> [M, N] in x's dtype, accumulated
    in float32. Meant for small M (decode); any M is correct. ``config`` overrides the
    (N, K) table (benchmarks)."""
    _check(x, weight, bias)
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    m, (n, k) = x.shape[0], weight.shape
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(1) != 1:
        raise ValueError(f"out must be {x.dtype} [{m}, {n}] with contiguous rows")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    cfg = config or launch_config(n, k)
    _skinny_linear_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(n, cfg.block_n))](
        x, weight, bias if bias is not None else weight, out, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_options(x.device))
    return out


def linear_enabled() -> bool:
    """``QWORKER_SKINNY_LINEAR=0`` sends every linear to torch (cuBLAS); read per call,
    so a CUDA graph keeps what held at capture."""
    return os.environ.get("QWORKER_SKINNY_LINEAR", "") != "0"
