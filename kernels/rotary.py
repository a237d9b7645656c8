"""apply_rotary: neox-style rotary embedding, twin of ``ops.apply_rotary``; and
rotary_and_store_kv, which also writes the rotated k and v into the paged KV cache
(twin of ``ops.rotary_and_store_kv``: one launch instead of two in every layer).

Any scaling (llama3, linear) is already folded into ``cos_sin_cache`` by
``ops.rope_cos_sin_cache``; a cache narrower than head_dim means partial rotary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import last_dim_contiguous, next_pow2, pdl_options, pdl_wait


@triton.jit
def _rotate_heads(x_ptr, out_ptr, stride_xt, stride_xh, stride_ot, stride_oh, tok,
                  cos, sin, num_heads,
                  HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
                  H_PAD: tl.constexpr, HALF_PAD: tl.constexpr, REST_PAD: tl.constexpr):
    # x: [Hx, D] of token `tok`; cos, sin: [HALF_PAD] fp32 (zero past HALF)
    offs_h = tl.arange(0, H_PAD)[:, None]                     # [H_PAD, 1]
    offs_j = tl.arange(0, HALF_PAD)[None, :]                  # [1, HALF_PAD]
    ok = (offs_h < num_heads) & (offs_j < HALF)
    src = x_ptr + tok * stride_xt + offs_h * stride_xh
    dst = out_ptr + tok * stride_ot + offs_h * stride_oh
    x1 = tl.load(src + offs_j, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs_j, mask=ok, other=0.0).to(tl.float32)
    c, s = cos[None, :], sin[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(dst + offs_j, (x1 * c - x2 * s).to(ty), mask=ok)
    tl.store(dst + HALF + offs_j, (x2 * c + x1 * s).to(ty), mask=ok)
    if REST_PAD > 0:  # partial rotary: dims [2*HALF, D) pass through unchanged
        offs_r = 2 * HALF + tl.arange(0, REST_PAD)[None, :]
        ok_r = (offs_h < num_heads) & (offs_r < HEAD_DIM)
        tl.store(dst + offs_r, tl.load(src + offs_r, mask=ok_r, other=0.0), mask=ok_r)


@triton.jit
def _cos_sin(pos_ptr, cache_ptr, stride_cache, tok, HALF: tl.constexpr,
             HALF_PAD: tl.constexpr):
    # token `tok`'s cache row [cos (HALF) | sin (HALF)] -> two [HALF_PAD] fp32 (0 past HALF)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_j = tl.arange(0, HALF_PAD)
    row = cache_ptr + pos * stride_cache
    cos = tl.load(row + offs_j, mask=offs_j < HALF, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF + offs_j, mask=offs_j < HALF, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cache_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_qot, stride_qoh, stride_kot, stride_koh, stride_cache,
                   num_q_heads, num_kv_heads,
                   HALF: tl.constexpr, HEAD_DIM: tl.constexpr, HQ_PAD: tl.constexpr,
                   HK_PAD: tl.constexpr, HALF_PAD: tl.constexpr, REST_PAD: tl.constexpr):
    # grid (T,): one program rotates every q and k head of one token.
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(pos_ptr, cache_ptr, stride_cache, tok, HALF, HALF_PAD)
    _rotate_heads(q_ptr, q_out_ptr, stride_qt, stride_qh, stride_qot, stride_qoh, tok,
                  cos, sin, num_q_heads, HALF, HEAD_DIM, HQ_PAD, HALF_PAD, REST_PAD)
    _rotate_heads(k_ptr, k_out_ptr, stride_kt, stride_kh, stride_kot, stride_koh, tok,
                  cos, sin, num_kv_heads, HALF, HEAD_DIM, HK_PAD, HALF_PAD, REST_PAD)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary on the first rot_dim dims of each head.

    q: [T, Hq, D], k: [T, Hkv, D] (views with any token/head strides are fine),
    positions: [T] (int), cos_sin_cache: [max_pos, rot_dim] float32.
    Returns new contiguous (q, k) in their dtypes.
    """
    consts = _check(q, k, cos_sin_cache, "apply_rotary")
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    cache = last_dim_contiguous(cos_sin_cache)
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(
        k.shape, dtype=k.dtype, device=k.device)
    if q.shape[0] == 0:
        return q_out, k_out
    _rotary_kernel[(q.shape[0],)](
        q, k, q_out, k_out, positions, cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cache.stride(0),
        q.shape[1], k.shape[1], **consts)
    return q_out, k_out


def _check(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
           name: str) -> dict:
    """Validate q [T, Hq, D], k [T, Hkv, D] and the cache width; the launch constants."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{name} expects q [T, Hq, D] and k [T, Hkv, D], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    _, hq, d = q.shape
    rot = cos_sin_cache.shape[-1]
    if rot % 2 or rot > d:
        raise ValueError(f"cos_sin_cache width {rot} must be even and <= head_dim {d}")
    half, rest = rot // 2, d - rot
    return dict(HALF=half, HEAD_DIM=d, HQ_PAD=next_pow2(hq), HK_PAD=next_pow2(k.shape[1]),
                HALF_PAD=next_pow2(half), REST_PAD=next_pow2(rest) if rest else 0,
                num_warps=4 if hq * d <= 4096 else 8)


@triton.jit
def _rotary_store_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                         pos_ptr, slot_ptr, cache_ptr,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_qot, stride_qoh, stride_cb, stride_cr, stride_ch,
                         stride_cache, num_q_heads, num_kv_heads,
                         BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr,
                         HEAD_DIM: tl.constexpr, HQ_PAD: tl.constexpr,
                         HK_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
                         REST_PAD: tl.constexpr, D_PAD: tl.constexpr,
                         USE_PDL: tl.constexpr):
    # grid (T,): token `tok`'s q heads are rotated into q_out; its k heads, rotated, and
    # its v heads go to cache[slot // BLOCK_SIZE, slot % BLOCK_SIZE] (slot < 0: padding,
    # nothing stored). Same float32 math and rounding as _rotary_kernel + store.
    pdl_wait(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(pos_ptr, cache_ptr, stride_cache, tok, HALF, HALF_PAD)
    _rotate_heads(q_ptr, q_out_ptr, stride_qt, stride_qh, stride_qot, stride_qoh, tok,
                  cos, sin, num_q_heads, HALF, HEAD_DIM, HQ_PAD, HALF_PAD, REST_PAD)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        at = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cr
        # the cache row stands in for k_out's token row (token stride 0)
        _rotate_heads(k_ptr, k_cache_ptr + at, stride_kt, stride_kh, 0, stride_ch, tok,
                      cos, sin, num_kv_heads, HALF, HEAD_DIM, HK_PAD, HALF_PAD, REST_PAD)
        offs_h = tl.arange(0, HK_PAD)[:, None]
        offs_d = tl.arange(0, D_PAD)[None, :]
        ok = (offs_h < num_kv_heads) & (offs_d < HEAD_DIM)
        v = tl.load(v_ptr + tok * stride_vt + offs_h * stride_vh + offs_d, mask=ok)
        tl.store(v_cache_ptr + at + offs_h * stride_ch + offs_d,
                 v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def rotary_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` to q [T, Hq, D] and k [T, Hkv, D], then the rotated k and v
    [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at ``slot_mapping``
    (-1: skipped). Returns the rotated q, contiguous. q/k/v may be strided views (of a
    fused qkv projection) with a contiguous last dim.
    """
    consts = _check(q, k, cos_sin_cache, "rotary_and_store_kv")
    if v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    _, bs, hkv, d = k_cache.shape
    if tuple(k.shape[1:]) != (hkv, d) or k_cache.stride(-1) != 1:
        raise ValueError(f"k/v must be [T, {hkv}, {d}] for this cache (contiguous last "
                         f"dim), got {tuple(k.shape)}")
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    cache = last_dim_contiguous(cos_sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return q_out
    _rotary_store_kernel[(q.shape[0],)](
        q, k, v, q_out, k_cache, v_cache, positions, slot_mapping, cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cache.stride(0),
        q.shape[1], hkv, BLOCK_SIZE=bs, D_PAD=next_pow2(d), **consts,
        **pdl_options(q.device))
    return q_out
