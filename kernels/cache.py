"""store_kvcache: scatter a step's K/V into the paged cache, twin of ``ops.store_kvcache``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import last_dim_contiguous, next_pow2


@triton.jit
def _store_kvcache_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                          stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_cb, stride_cr, stride_ch, num_kv_heads,
                          BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                          H_PAD: tl.constexpr, D_PAD: tl.constexpr):
    # grid (T,); key/value rows [Hkv, D] go to cache[slot // BLOCK_SIZE, slot % BLOCK_SIZE]
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padding token
        return
    offs_h = tl.arange(0, H_PAD)[:, None]
    offs_d = tl.arange(0, D_PAD)[None, :]
    ok = (offs_h < num_kv_heads) & (offs_d < HEAD_DIM)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cr \
        + offs_h * stride_ch + offs_d
    k = tl.load(key_ptr + tok * stride_kt + offs_h * stride_kh + offs_d, mask=ok)
    v = tl.load(value_ptr + tok * stride_vt + offs_h * stride_vh + offs_d, mask=ok)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at slots.

    A slot of -1 is skipped (padding tokens). key/value may be strided views (e.g. of a
    fused qkv projection) as long as their last dim is contiguous.
    """
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    _, bs, hkv, d = k_cache.shape
    if key.shape != value.shape or tuple(key.shape[1:]) != (hkv, d):
        raise ValueError(f"key/value must be [T, {hkv}, {d}], got {tuple(key.shape)} "
                         f"and {tuple(value.shape)}")
    if k_cache.stride(-1) != 1:
        raise ValueError("the KV cache's last dim must be contiguous")
    t = key.shape[0]
    if t == 0:
        return
    key, value = last_dim_contiguous(key), last_dim_contiguous(value)
    _store_kvcache_kernel[(t,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), hkv,
        BLOCK_SIZE=bs, HEAD_DIM=d, H_PAD=next_pow2(hkv), D_PAD=next_pow2(d),
        num_warps=4 if hkv * d <= 2048 else 8)
