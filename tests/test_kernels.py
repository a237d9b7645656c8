"""The Triton kernels (qworker_kernels) against their torch oracles (qworker.model.ops).

Every case draws fresh random inputs and poisons the outputs (NaN) first, so an element
the kernel fails to write fails the test. "small" cases run in float32 everywhere: on a
CPU-only machine under Triton's interpreter (set up below, before triton is imported),
on a GPU compiled. "real" cases use real model shapes in bf16 and need CUDA.
"""

from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # triton decides interpreter vs compiler when its functions are decorated
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set: on a "
                           "CPU-only machine set it in the environment or in conftest.py")
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import qworker_kernels as K  # noqa: E402
from qworker_kernels.attention import AttnConfig  # noqa: E402

from qworker.model import ops  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs CUDA")]
SMALL = pytest.param("small", id="small-fp32")
REAL = pytest.param("real", id="real-bf16", marks=needs_gpu)
DTYPE = {"small": torch.float32, "real": torch.bfloat16}
# ||out - ref|| / ||ref||: fp32 rounding only, or bf16 outputs against a float32 reference
TOL = {"small": 2e-5, "real": 1e-2}


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs per case, reproducible."""
    g = torch.Generator(device=DEVICE)
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32
          ) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape
    assert not out.isnan().any(), f"{int(out.isnan().sum())} NaNs (unwritten or poisoned reads)"
    o, r = out.double(), ref.double()
    err = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
    assert err < tol, f"relative error {err:.3e} >= {tol:.0e}"


# ----------------------------------------------------------------------------- elementwise

@pytest.mark.parametrize("size", [SMALL, REAL])
def test_rms_norm_matches_torch(size: str, gen: torch.Generator) -> None:
    t, h = (5, 96) if size == "small" else (1000, 4096)
    x, w = randn(gen, t, h, dtype=DTYPE[size]), randn(gen, h, dtype=DTYPE[size])
    out = K.rms_norm(x, w, 1e-6, out=nan_like(x))
    assert_close(out, ops.rms_norm(x, w, 1e-6), TOL[size])


@pytest.mark.parametrize("size", [SMALL, REAL])
def test_fused_add_rms_norm_returns_normed_sum_and_sum(size: str, gen: torch.Generator) -> None:
    t, h = (5, 96) if size == "small" else (1000, 4096)
    x, r = randn(gen, t, h, dtype=DTYPE[size]), randn(gen, t, h, dtype=DTYPE[size])
    w = randn(gen, h, dtype=DTYPE[size])
    normed, summed = K.fused_add_rms_norm(x, r, w, 1e-5, out=nan_like(x),
                                          residual_out=nan_like(x))
    ref_normed, ref_sum = ops.fused_add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(summed, ref_sum)
    assert_close(normed, ref_normed, TOL[size])


def test_fused_add_rms_norm_may_write_the_sum_into_residual(gen: torch.Generator) -> None:
    x, r, w = randn(gen, 3, 64), randn(gen, 3, 64), randn(gen, 64)
    ref_normed, ref_sum = ops.fused_add_rms_norm(x, r, w, 1e-6)
    normed, summed = K.fused_add_rms_norm(x, r, w, 1e-6, residual_out=r)
    assert summed is r and torch.equal(r, ref_sum)
    assert_close(normed, ref_normed, TOL["small"])


@pytest.mark.parametrize("size", [SMALL, REAL])
def test_silu_and_mul_matches_torch(size: str, gen: torch.Generator) -> None:
    t, i = (4, 80) if size == "small" else (1000, 14336)
    x = randn(gen, t, 2 * i, dtype=DTYPE[size]) * 3
    assert_close(K.silu_and_mul(x, out=nan_like(x[:, :i])), ops.silu_and_mul(x), TOL[size])


# ----------------------------------------------------------------------------- linear

LINEAR_CFG = K.LinearConfig(block_n=16, block_k=32, num_warps=4, num_stages=2)


@pytest.mark.parametrize("size", [SMALL, REAL])
@pytest.mark.parametrize("rows", [1, 5, 16, 37, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_torch(size: str, rows: int, bias: bool, gen: torch.Generator) -> None:
    # small: K not a multiple of the K tile, N not a multiple of the N tile
    n, k = (40, 72) if size == "small" else (6144, 4096)
    dt = DTYPE[size]
    x, w = randn(gen, rows, k, dtype=dt), randn(gen, n, k, dtype=dt) * k ** -0.5
    b = randn(gen, n, dtype=dt) if bias else None
    cfg = LINEAR_CFG if size == "small" else None
    out = K.linear(x, w, b, out=torch.full((rows, n), float("nan"), dtype=dt, device=DEVICE),
                   config=cfg)
    ref = ops.linear(x.float(), w.float(), None if b is None else b.float())
    assert_close(out, ref, TOL[size])


@pytest.mark.parametrize("size", [SMALL, REAL])
def test_linear_rows_do_not_depend_on_the_row_count(size: str, gen: torch.Generator) -> None:
    """Batch invariance by construction: every row of x[:M] @ W.T is bitwise the same for
    any M (the launch config is a function of the weight's shape only)."""
    shapes = [(48, 64)] if size == "small" else [(6144, 4096), (4096, 4096), (4096, 14336),
                                                  (28672, 4096), (128256, 4096)]
    top = 40 if size == "small" else 48
    cfg = LINEAR_CFG if size == "small" else None
    for n, k in shapes:
        x = randn(gen, top, k, dtype=DTYPE[size])
        w = randn(gen, n, k, dtype=DTYPE[size]) * k ** -0.5
        full = K.linear(x, w, config=cfg)
        for m in (1, 2, 3, 8, 16, 17, 33, top - 1):
            assert torch.equal(K.linear(x[:m], w, config=cfg), full[:m]), (n, k, m)
        # and the last row alone equals its place in the batch (the third row tile). On
        # the GPU that is bitwise. The interpreter's tl.dot is numpy's BLAS, whose sum
        # for a row may depend on the row's place in the tile (numpy 2.4's OpenBLAS does
        # on an AMD EPYC): there it holds to float32 rounding only.
        alone = K.linear(x[top - 1:], w, config=cfg)
        if size == "small":
            torch.testing.assert_close(alone, full[top - 1:], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(alone, full[top - 1:]), (n, k)


def test_linear_takes_strided_rows_and_rejects_bad_shapes(gen: torch.Generator) -> None:
    x, w = randn(gen, 6, 2 * 64), randn(gen, 24, 64)
    view = x[:, 64:]                                   # row stride 128, last dim contiguous
    assert_close(K.linear(view, w, config=LINEAR_CFG), ops.linear(view, w), TOL["small"])
    assert K.linear(x[:0, 64:], w).shape == (0, 24)
    with pytest.raises(ValueError, match=r"x \[M, K\] and weight \[N, K\]"):
        K.linear(x, w)
    with pytest.raises(ValueError, match=r"bias must be \[24\]"):
        K.linear(view, w, randn(gen, 23))


@pytest.mark.parametrize("size", [SMALL, REAL])
@pytest.mark.parametrize("rotary_factor", [1.0, 0.5])
def test_apply_rotary_matches_torch_on_strided_qkv_views(size: str, rotary_factor: float,
                                                         gen: torch.Generator) -> None:
    t, hq, hkv, d = (6, 4, 2, 64) if size == "small" else (1000, 32, 8, 128)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cache = ops.rope_cos_sin_cache(d, 20000, 500000.0, llama3, rotary_factor, DEVICE)
    qkv = randn(gen, t, (hq + 2 * hkv) * d, dtype=DTYPE[size])    # a fused projection
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
    pos = torch.randint(0, 20000, (t,), generator=gen, device=DEVICE)
    q_out, k_out = K.apply_rotary(q, k, pos, cache)
    q_ref, k_ref = ops.apply_rotary(q, k, pos, cache)
    assert_close(q_out, q_ref, TOL[size])
    assert_close(k_out, k_ref, TOL[size])


@pytest.mark.parametrize("size", [SMALL, REAL])
def test_store_kvcache_writes_slots_and_skips_padding(size: str, gen: torch.Generator) -> None:
    nb, bs, hkv, d, t = (6, 16, 2, 64, 9) if size == "small" else (512, 16, 8, 128, 2048)
    dt = DTYPE[size]
    kv = randn(gen, t, 2 * hkv * d, dtype=dt)          # strided views, as from a fused qkv
    key, value = kv[:, :hkv * d].view(t, hkv, d), kv[:, hkv * d:].view(t, hkv, d)
    slots = torch.randperm(nb * bs, generator=gen, device=DEVICE)[:t]
    slots[::4] = -1
    k_cache = torch.full((nb, bs, hkv, d), float("nan"), dtype=dt, device=DEVICE)
    v_cache = k_cache.clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    K.store_kvcache(key, value, k_cache, v_cache, slots)
    ops.store_kvcache(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache.nan_to_num(7.0), k_ref.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), v_ref.nan_to_num(7.0))


@pytest.mark.parametrize("size", [SMALL, REAL])
@pytest.mark.parametrize("rotary_factor", [1.0, 0.5])
def test_rotary_and_store_kv_equals_rotary_then_store(size: str, rotary_factor: float,
                                                     gen: torch.Generator) -> None:
    """The fused kernel writes exactly what apply_rotary + store_kvcache write (bitwise:
    same float32 math, same rounding), skips padding slots, and matches the torch ops."""
    t, hq, hkv, d, nb, bs = (7, 4, 2, 64, 4, 16) if size == "small" else (
        1000, 32, 8, 128, 256, 16)
    dt = DTYPE[size]
    cache = ops.rope_cos_sin_cache(d, 20000, 500000.0, None, rotary_factor, DEVICE)
    qkv = randn(gen, t, (hq + 2 * hkv) * d, dtype=dt)             # a fused projection
    q, k, v = (x.view(t, -1, d) for x in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    pos = torch.randint(0, 20000, (t,), generator=gen, device=DEVICE)
    slots = torch.randperm(nb * bs, generator=gen, device=DEVICE)[:t]
    slots[1::3] = -1                                                 # padding rows
    caches = [torch.full((nb, bs, hkv, d), float("nan"), dtype=dt, device=DEVICE)
              for _ in range(6)]
    q_out = K.rotary_and_store_kv(q, k, v, pos, cache, caches[0], caches[1], slots)
    q_two, k_two = K.apply_rotary(q, k, pos, cache)
    K.store_kvcache(k_two, v, caches[2], caches[3], slots)
    q_ref = ops.rotary_and_store_kv(q, k, v, pos, cache, caches[4], caches[5], slots)
    assert torch.equal(q_out, q_two)
    for fused, two, ref in ((caches[0], caches[2], caches[4]), (caches[1], caches[3], caches[5])):
        assert torch.equal(fused.nan_to_num(7.0), two.nan_to_num(7.0))
        written = ~ref.isnan()
        assert int(written.sum()) == int((slots >= 0).sum()) * hkv * d
        assert torch.equal(fused.isnan(), ref.isnan())               # padding left alone
        assert_close(fused[written], ref[written], TOL[size])
    assert_close(q_out, q_ref, TOL[size])


# ------------------------------------------------------------------------- paged attention

def make_batch(gen: torch.Generator, specs: list[tuple[int, int]], block_size: int,
               hq: int, hkv: int, d: int, dtype: torch.dtype) -> dict:
    """specs: per request (cached tokens, new tokens). Every cache slot that holds no
    token of the batch, block 0 (the block tables' padding) included, is NaN."""
    seq_lens = [c + n for c, n in specs]
    nblks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(nblks) + 3
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype,
                         device=DEVICE)
    v_cache = k_cache.clone()
    ids = (torch.randperm(num_blocks - 1, generator=gen, device=DEVICE) + 1).tolist()
    block_tables = torch.zeros(len(specs), max(nblks) + 2, dtype=torch.int32)
    for b, (s, n) in enumerate(zip(seq_lens, nblks, strict=True)):
        blocks, ids = ids[:n], ids[n:]
        block_tables[b, :n] = torch.tensor(blocks, dtype=torch.int32)
        flat = torch.tensor(blocks, device=DEVICE).repeat_interleave(block_size) * block_size \
            + torch.arange(n * block_size, device=DEVICE) % block_size
        k_cache.view(-1, hkv, d)[flat[:s]] = randn(gen, s, hkv, d, dtype=dtype)
        v_cache.view(-1, hkv, d)[flat[:s]] = randn(gen, s, hkv, d, dtype=dtype)
    q_lens = torch.tensor([n for _, n in specs])
    qsl = torch.zeros(len(specs) + 1, dtype=torch.int32)
    qsl[1:] = q_lens.cumsum(0)
    return dict(q=randn(gen, int(qsl[-1]), hq, d, dtype=dtype), k_cache=k_cache,
                v_cache=v_cache, query_start_loc=qsl.to(DEVICE),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                block_tables=block_tables.to(DEVICE), scale=d ** -0.5)


def reference(batch: dict) -> torch.Tensor:
    """The oracle on the CPU, on float32 copies (bf16 inputs are exact in float32)."""
    f = {k: v.cpu().float() if k in ("q", "k_cache", "v_cache") else
         v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return ops.paged_attention(**f).to(DEVICE)


def run_attention(batch: dict, **kwargs) -> torch.Tensor:
    return K.paged_attention(**batch, out=nan_like(batch["q"]), **kwargs)


# (cached, new) per request: decodes (at block edges too), prefill chunks over a cached
# prefix, a fresh prefill, and a request with no query this step
SMALL_MIX = [(37, 1), (0, 1), (15, 1), (16, 1), (40, 13), (0, 21), (10, 0), (63, 1)]
# (block_size, head_dim, Hq, Hkv): GQA groups 2, 4, 3 (SmolLM2's 9/3), 1; head_dim 96 too
SMALL_LAYOUTS = [(16, 64, 4, 2), (32, 128, 8, 2), (16, 64, 3, 1), (32, 96, 2, 2)]
# the default launch heuristic, then a split of the context with tiles under a block
SMALL_CONFIGS = [None, AttnConfig(block_m=16, tile_n=16, num_splits=3, num_warps=4,
                                  num_stages=2)]


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=["default", "split3"])
@pytest.mark.parametrize("layout", SMALL_LAYOUTS, ids=lambda x: "bs{}-d{}-h{}/{}".format(*x))
def test_paged_attention_mixed_batch_small(layout: tuple, config: AttnConfig | None,
                                           gen: torch.Generator) -> None:
    bs, d, hq, hkv = layout
    if config is not None and config.block_m < hq // hkv:
        pytest.skip("group larger than block_m")
    batch = make_batch(gen, SMALL_MIX, bs, hq, hkv, d, torch.float32)
    out = run_attention(batch, config=config)
    assert_close(out, reference(batch), TOL["small"])


def test_paged_attention_prefill_dominated_batch_small(gen: torch.Generator) -> None:
    # >= 64 new tokens per request on average: the heuristic takes its largest query tiles
    batch = make_batch(gen, [(0, 120), (20, 90), (33, 1)], 16, 4, 2, 64, torch.float32)
    assert_close(run_attention(batch), reference(batch), TOL["small"])


def test_paged_attention_long_context_split_small(gen: torch.Generator) -> None:
    batch = make_batch(gen, [(700, 1), (333, 1), (500, 3)], 32, 4, 2, 64, torch.float32)
    ref = reference(batch)
    for splits in (2, 5):
        cfg = AttnConfig(block_m=16, tile_n=64, num_splits=splits, num_warps=4, num_stages=2)
        assert_close(run_attention(batch, config=cfg), ref, TOL["small"])


def test_paged_attention_hints_change_nothing(gen: torch.Generator) -> None:
    batch = make_batch(gen, [(20, 1), (3, 9)], 16, 4, 2, 64, torch.float32)
    ref = reference(batch)
    assert_close(run_attention(batch, max_query_len=9, max_seq_len=23), ref, TOL["small"])
    assert_close(run_attention(batch, max_query_len=1, max_seq_len=4096), ref, TOL["small"])


# real model shapes (bf16, CUDA): (block_size, head_dim, Hq, Hkv)
REAL_LAYOUTS = {"llama3-8b-bs16": (16, 128, 32, 8), "llama3-8b-bs32": (32, 128, 32, 8),
                "qwen3-0.6b": (16, 128, 16, 8), "smollm2-135m": (16, 64, 9, 3)}


@pytest.mark.parametrize("layout", list(REAL_LAYOUTS.values()), ids=list(REAL_LAYOUTS))
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_paged_attention_mixed_batch_real(layout: tuple, gen: torch.Generator) -> None:
    bs, d, hq, hkv = layout
    ctx = torch.randint(1, 8192, (48,), generator=gen, device=DEVICE).tolist()
    specs = [(c, 1) for c in ctx] + [(1500, 512), (3000, 200), (0, 700), (0, 1)]
    batch = make_batch(gen, specs, bs, hq, hkv, d, torch.bfloat16)
    assert_close(run_attention(batch), reference(batch), TOL["real"])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_paged_attention_prefill_dominated_batch_real(gen: torch.Generator) -> None:
    specs = [(0, 1024), (4096, 512), (700, 300), (9000, 1)]
    batch = make_batch(gen, specs, 16, 32, 8, 128, torch.bfloat16)
    assert_close(run_attention(batch), reference(batch), TOL["real"])


@pytest.mark.parametrize("splits", [None, 8], ids=["default", "split8"])
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_paged_attention_long_context_split_real(splits: int | None,
                                                 gen: torch.Generator) -> None:
    batch = make_batch(gen, [(32767, 1), (20000, 1), (30000, 4), (5000, 1)], 16, 32, 8, 128,
                       torch.bfloat16)
    cfg = None if splits is None else AttnConfig(16, 64, splits, 4, 3)
    assert_close(run_attention(batch, config=cfg), reference(batch), TOL["real"])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_kernels_never_sync_with_the_host(gen: torch.Generator) -> None:
    batch = make_batch(gen, [(300, 1), (0, 40)], 16, 32, 8, 128, torch.bfloat16)
    x = randn(gen, 41, 4096, dtype=torch.bfloat16)
    cache = ops.rope_cos_sin_cache(128, 512, 5e5, device=DEVICE)
    pos = torch.arange(41, device=DEVICE)
    k = randn(gen, 41, 8, 128, dtype=torch.bfloat16)
    slots = torch.arange(41, device=DEVICE)

    def step() -> None:
        K.paged_attention(**batch)
        K.rms_norm(x, x[0], 1e-6)
        K.fused_add_rms_norm(x, x, x[0], 1e-6)
        K.silu_and_mul(x)
        K.apply_rotary(batch["q"], k, pos, cache)
        K.store_kvcache(k, k, batch["k_cache"], batch["v_cache"], slots)

    step()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
