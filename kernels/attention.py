"""paged_attention: one launch for a mixed batch of prefill chunks and decodes.

Twin of ``ops.paged_attention``. Work is cut into programs of
(query block, KV head, context split):

* A query block is BLOCK_Q consecutive query tokens of one request times the GROUP query
  heads that share a KV head, laid out as BLOCK_M = BLOCK_Q * GROUP (+ padding) rows:
  row m is token m // GROUP, head kv_head * GROUP + m % GROUP. So K/V tiles are loaded
  once per KV head and serve the whole group (grouped-query attention).
* Request b owns the query-block ids [qsl[b] // BLOCK_Q + b, qsl[b+1] // BLOCK_Q + b + 1)
  (at least cdiv(q_len, BLOCK_Q) ids); a program finds its request by binary search over
  query_start_loc, so the grid, T // BLOCK_Q + B, is known on the host without a sync.
* The context of a query block is cut into NUM_SPLITS contiguous ranges of KV tiles
  (flash-decoding). With one split the program writes the output; otherwise it writes
  its unnormalised partial (acc, running max, running sum) and a second kernel merges
  the splits. Splits pay off when there are few query blocks and long contexts.

Softmax is online, in float32, base 2 (scores are pre-scaled by log2(e)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._utils import check_out, last_dim_contiguous, next_pow2, pdl_options, pdl_wait, sm_count

_LOG2E = 1.4426950408889634


@triton.jit
def _find_request(qsl_ptr, num_reqs, qblock, BLOCK_Q: tl.constexpr):
    """The request b whose query-block range [qsl[b] // BLOCK_Q + b, ...) holds qblock."""
    lo = 0
    hi = num_reqs
    while lo < hi:  # largest b in [0, num_reqs) with start(b) <= qblock, found as lo - 1
        mid = (lo + hi) // 2
        start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(start <= qblock, mid + 1, lo)
        hi = tl.where(start <= qblock, hi, mid)
    return lo - 1


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
        qsl_ptr, seq_lens_ptr, block_tables_ptr, scale_log2, num_reqs, ml_plane,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_cb, stride_cr, stride_ch, stride_bt,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
        TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr,
        USE_PDL: tl.constexpr):
    # grid (T // BLOCK_Q + B, Hkv, NUM_SPLITS)
    # q, out: [T, Hq, D]; caches: [num_blocks, BLOCK_SIZE, Hkv, D]; block_tables: [B, M]
    # part_acc: [T, Hq, NUM_SPLITS, D] f32; part_ml: [2, T, Hq, NUM_SPLITS] f32 (max, sum),
    # ml_plane = T * Hq * NUM_SPLITS
    pdl_wait(USE_PDL)
    qblock = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP

    b = _find_request(qsl_ptr, num_reqs, qblock, BLOCK_Q)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    local = qblock - (q_start // BLOCK_Q + b)          # this program's block within request b
    if local * BLOCK_Q >= q_len:                       # spare id (or past the last request)
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len                          # tokens cached before this step

    offs_m = tl.arange(0, BLOCK_M)
    q_tok = local * BLOCK_Q + offs_m // GROUP          # [BLOCK_M] query index within request
    head = kv_head * GROUP + offs_m % GROUP            # [BLOCK_M] query head
    row_ok = (offs_m < BLOCK_Q * GROUP) & (q_tok < q_len)
    q_pos = ctx_len + q_tok                            # [BLOCK_M] position of each row's token
    tok = (q_start + q_tok).to(tl.int64)               # [BLOCK_M] row in q / out
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)     # [BLOCK_M, D_PAD]

    # Keys [0, kv_end) are visible to some row; this split takes tiles [t_begin, t_end).
    kv_end = ctx_len + tl.minimum(local * BLOCK_Q + BLOCK_Q, q_len)
    num_tiles = tl.cdiv(kv_end, TILE_N)
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    t_begin = split * per_split
    t_end = tl.minimum(t_begin + per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)   # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                 # running sum of exp2
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    for t in range(t_begin, t_end):
        k_pos = t * TILE_N + tl.arange(0, TILE_N)                         # [TILE_N]
        k_ok = k_pos < kv_end
        blk = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        kv_off = blk * stride_cb + (k_pos % BLOCK_SIZE) * stride_cr + kv_head * stride_ch
        k = tl.load(k_cache_ptr + kv_off[None, :] + offs_d[:, None],
                    mask=k_ok[None, :] & d_ok[:, None], other=0.0)        # [D_PAD, TILE_N]
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)        # [TILE_N, D_PAD]
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * scale_log2                                                # [BLOCK_M, TILE_N]
        visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])      # causal
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row may have seen no visible key yet (m_new = -inf): shift by 0 to avoid NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh
                 + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # An empty split stores (acc 0, max -inf, sum 0), which the merge weighs as 0.
        ml = (tok * num_q_heads + head) * NUM_SPLITS + split                # [BLOCK_M]
        tl.store(part_acc_ptr + ml[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
        tl.store(part_ml_ptr + ml, m_i, mask=row_ok)
        tl.store(part_ml_ptr + ml_plane + ml, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(part_acc_ptr, part_ml_ptr, out_ptr, ml_plane, stride_ot, stride_oh,
                         NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                         USE_PDL: tl.constexpr):
    # grid (T, Hq): out[t, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s
    pdl_wait(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = tok * tl.num_programs(1) + head
    offs_s = tl.arange(0, S_PAD)
    s_ok = offs_s < NUM_SPLITS
    m = tl.load(part_ml_ptr + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + ml_plane + row * NUM_SPLITS + offs_s, mask=s_ok, other=0.0)
    # every token sees at least itself, so some split has a finite max
    w = tl.math.exp2(m - tl.max(m, axis=0))                            # [S_PAD], 0 if empty
    offs_d = tl.arange(0, D_PAD)
    mask = s_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    acc = tl.load(part_acc_ptr + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM
                  + offs_d[None, :], mask=mask, other=0.0)             # [S_PAD, D_PAD]
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(w * l_s, axis=0)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@dataclass(frozen=True, slots=True)
class AttnConfig:
    """Launch shape of one paged_attention call (see the module docstring)."""

    block_m: int
    tile_n: int
    num_splits: int
    num_warps: int
    num_stages: int


# Swept on an H200 with Llama-3.1-8B heads (docs/benchmarks.md, "Kernels (H200)"); the
# interpreter takes the same. (block_m, tile_n, num_warps, num_stages):
_DECODE = (16, 128, 4, 3)     # short queries: within ~4% of the best swept config
_MIXED = (64, 64, 4, 3)       # decodes next to prefill chunks: short rows waste less of a tile
_PREFILL = (128, 32, 4, 3)    # prefill-dominated batches (>= _PREFILL_AVG_LEN tokens/request)
_PREFILL_AVG_LEN = 64
_MIN_TOKENS_PER_SPLIT = 256      # below this a split costs more than it brings
_MAX_SPLITS = 16
_MAX_PARTIAL_BYTES = 64 << 20    # cap on the fp32 split workspace


def choose_config(num_tokens: int, num_reqs: int, num_kv_heads: int, group: int,
                  head_dim: int, max_query_len: int, max_seq_len: int,
                  device: torch.device, elem_bytes: int = 2) -> AttnConfig:
    """Host-side heuristic: decode-shaped tiles for short queries, splits for long contexts."""
    if max_query_len * group <= 16:
        block_m, tile_n, warps, stages = _DECODE
    elif num_tokens >= _PREFILL_AVG_LEN * num_reqs:
        block_m, tile_n, warps, stages = _PREFILL
    else:
        block_m, tile_n, warps, stages = _MIXED
    block_m = max(block_m, next_pow2(group))
    if elem_bytes > 2:       # float32 tiles: keep the pipelined K/V buffers in shared memory
        stages = min(stages, 2)
    block_q = block_m // group
    q_blocks = min(num_tokens // block_q + num_reqs, num_reqs * triton.cdiv(max_query_len,
                                                                              block_q))
    # Splits fill the GPU when there are few query blocks: aim at ~4 programs per SM for
    # decodes; prefill tiles are heavier, so split them only when they don't fill one wave.
    waves = 4 if max_query_len * group <= 16 else 1
    want = triton.cdiv(waves * sm_count(device), q_blocks * num_kv_heads)
    by_len = max_seq_len // _MIN_TOKENS_PER_SPLIT
    by_mem = _MAX_PARTIAL_BYTES // max(1, num_tokens * num_kv_heads * group * head_dim * 4)
    splits = max(1, min(want, by_len, by_mem, _MAX_SPLITS))
    return AttnConfig(block_m, tile_n, splits, warps, stages)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float, *,
                    max_query_len: int | None = None, max_seq_len: int | None = None,
                    out: torch.Tensor | None = None,
                    config: AttnConfig | None = None) -> torch.Tensor:
    """Causal attention of a mixed batch of prefill chunks and decodes through block tables.

    q: [T, Hq, D] (last dim contiguous); caches: [num_blocks, block_size, Hkv, D]
    (contiguous last dim; block_size any power of 2 >= 1); query_start_loc: [B+1] int32;
    seq_lens: [B] int32; block_tables: [B, M] int32. Request b's q_len queries are its
    last q_len tokens and attend causally. Returns [T, Hq, D] in q's dtype.

    Never syncs with the device: ``max_query_len`` / ``max_seq_len`` are only hints for
    the launch shape (defaults: T - B + 1 and M * block_size, upper bounds from shapes);
    pass exact values when known, any value is correct. ``config`` overrides the heuristic
    (benchmarks and tests).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_attention expects q [T, Hq, D] and caches "
                         f"[num_blocks, block_size, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    t, hq, d = q.shape
    _, bs, hkv, dc = k_cache.shape
    if dc != d or hq % hkv or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError(f"head_dim {d} vs cache {dc}, Hq {hq} must be a multiple of Hkv "
                         f"{hkv}, caches must share strides with a contiguous last dim")
    q = last_dim_contiguous(q)
    out = check_out(out, q, (t, hq, d))
    num_reqs = seq_lens.shape[0]
    if t == 0 or num_reqs == 0:
        return out
    group = hq // hkv
    if config is None:
        config = choose_config(
            t, num_reqs, hkv, group, d,
            max(1, max_query_len if max_query_len is not None else t - num_reqs + 1),
            max_seq_len if max_seq_len is not None else block_tables.shape[1] * bs,
            q.device, q.element_size())
    block_q = config.block_m // group
    if block_q < 1:
        raise ValueError(f"block_m {config.block_m} < GQA group {group}")
    d_pad = next_pow2(d)
    splits = config.num_splits
    ml_plane = t * hq * splits
    if splits > 1:
        part_acc = torch.empty((t, hq, splits, d), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((2, t, hq, splits), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out   # unused
    grid = (t // block_q + num_reqs, hkv, splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, part_acc, part_ml,
        query_start_loc, seq_lens, block_tables, scale * _LOG2E, num_reqs, ml_plane,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=d, D_PAD=d_pad, BLOCK_SIZE=bs, BLOCK_M=config.block_m,
        BLOCK_Q=block_q, TILE_N=config.tile_n, NUM_SPLITS=splits,
        IEEE=q.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl_options(q.device))
    if splits > 1:
        _merge_splits_kernel[(t, hq)](
            part_acc, part_ml, out, ml_plane, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, S_PAD=max(2, next_pow2(splits)), HEAD_DIM=d, D_PAD=d_pad,
            num_warps=4, **pdl_options(q.device))
    return out


__all__ = ["AttnConfig", "choose_config", "paged_attention"]
