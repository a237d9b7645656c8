"""Benchmark the Triton kernels on a CUDA GPU (the H200 figures in docs/benchmarks.md).

Measures, in one run: device copy bandwidth (the ceiling); paged decode attention at long
context (Llama-3.1-8B heads: 32 q / 8 kv / 128, bf16) as achieved bandwidth and % of the
copy, for the launch heuristic and, with --sweep, for a sweep of tile/warps/stages/splits;
prefill attention against torch SDPA; the small kernels against their torch references;
the decode linears (skinny GEMM) against cuBLAS on cold weights, with --sweep a sweep of
their launch configs at one row.
Times are medians of triton.testing.do_bench (CUDA events), after warm-up.

    python scripts/bench_kernels.py [--sweep] [--quick] [--only SECTION,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

import qworker_kernels as K
import torch
import triton
import triton.language as tl
from qworker_kernels.attention import AttnConfig, choose_config
from triton.testing import do_bench, do_bench_cudagraph

from qworker.model import ops

HQ, HKV, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
results: dict = {"rows": []}


def log(msg: str) -> None:
    print(msg, flush=True)


def bench(fn, rep_ms: int = 100) -> float:
    """Median milliseconds."""
    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


@triton.jit
def _read_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # each program sums BLOCK * ITERS consecutive elements: a pure read stream
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(ITERS):
        acc += tl.load(x_ptr + base + i * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def read_bandwidth() -> float:
    """TB/s of a read-only stream (decode attention only reads): a second ceiling."""
    x = torch.randn(1 << 30, device="cuda", dtype=DT)
    block, iters = 4096, 16
    out = torch.empty(x.numel() // (block * iters), device="cuda")
    ms = bench(lambda: _read_kernel[(out.numel(),)](x, out, BLOCK=block, ITERS=iters,
                                                   num_warps=8), 200)
    return x.numel() * x.element_size() / ms / 1e9


def graph_ms(fn) -> float:
    """Median ms of CUDA-graph replays of fn (no launch overhead); nan if capture fails."""
    torch.cuda.synchronize()
    try:
        with torch.cuda.stream(torch.cuda.Stream()):
            return do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001
        log(f"   graph timing failed: {type(e).__name__}: {str(e)[:120]}")
        return float("nan")


def copy_bandwidth() -> float:
    x = torch.randn(1 << 30, device="cuda", dtype=DT)     # 2 GiB, far over the 60 MB L2
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), 200)
    return 2 * x.numel() * x.element_size() / ms / 1e9    # TB/s, read + write


class DecodeCache:
    """One bf16 KV cache big enough for the largest shape; block tables scatter into it."""

    def __init__(self, max_tokens: int) -> None:
        self.num_blocks = max_tokens // BS + 1
        shape = (self.num_blocks, BS, HKV, D)
        self.k = torch.randn(shape, device="cuda", dtype=DT)
        self.v = torch.randn(shape, device="cuda", dtype=DT)

    def batch(self, b: int, ctx: int) -> dict:
        nblk = ctx // BS
        ids = torch.randperm(self.num_blocks - 1, device="cuda")[: b * nblk] + 1
        return dict(q=torch.randn(b, HQ, D, device="cuda", dtype=DT), k_cache=self.k,
                    v_cache=self.v,
                    query_start_loc=torch.arange(b + 1, device="cuda", dtype=torch.int32),
                    seq_lens=torch.full((b,), ctx, device="cuda", dtype=torch.int32),
                    block_tables=ids.view(b, nblk).to(torch.int32), scale=D ** -0.5)


def decode_bytes(b: int, ctx: int) -> int:
    return b * ctx * HKV * D * 2 * 2 + 2 * b * HQ * D * 2      # K + V once, q + out


def time_decode(batch: dict, cfg: AttnConfig | None, b: int, ctx: int,
                rep_ms: int = 100) -> tuple[float, float]:
    out = torch.empty_like(batch["q"])
    ms = bench(lambda: K.paged_attention(**batch, out=out, config=cfg, max_query_len=1,
                                         max_seq_len=ctx), rep_ms)
    return ms, decode_bytes(b, ctx) / ms / 1e9


def decode_section(copy_bw: float, sweep: bool, quick: bool) -> None:
    shapes = [(b, c) for b in (32, 64, 128, 256) for c in (4096, 8192, 16384, 32768)]
    swept = {(32, 32768), (32, 4096), (64, 8192), (128, 4096), (256, 16384)}
    if quick:
        shapes = [(32, 8192), (256, 4096)]
    cache = DecodeCache(max(b * c for b, c in shapes))
    log(f"\n## paged decode attention, Llama-3.1-8B heads, bf16, block {BS} "
        f"(copy {copy_bw:.2f} TB/s)")
    log(f"{'B':>4} {'ctx':>6} {'default cfg':>27} {'ms':>8} {'TB/s':>6} {'%copy':>6}"
        f" {'graph ms':>9} {'%copy':>6}   best-of-sweep")
    for b, ctx in shapes:
        batch = cache.batch(b, ctx)
        ref_cfg = choose_config(b, b, HKV, HQ // HKV, D, 1, ctx, torch.device("cuda"))
        ms, bw = time_decode(batch, None, b, ctx)
        gms = graph_ms(lambda: K.paged_attention(  # noqa: B023
            **batch, out=torch.empty_like(batch["q"]), max_query_len=1,  # noqa: B023
            max_seq_len=ctx))  # noqa: B023
        gbw = decode_bytes(b, ctx) / gms / 1e9
        row = dict(kind="decode", B=b, ctx=ctx, cfg=str(ref_cfg), ms=ms, tbs=bw,
                   pct=100 * bw / copy_bw, read_pct=100 * bw / results["read_tbs"],
                   graph_ms=gms, graph_pct=100 * gbw / copy_bw)
        best = ""
        if sweep and (b, ctx) in swept:
            trials = []
            for tile, warps, stages in itertools.product((64, 128), (4,), (2, 3)):
                for splits in sorted({1, 2, 4, 8, ref_cfg.num_splits}):
                    if splits * 256 > ctx and splits > 1:
                        continue
                    cfg = AttnConfig(16, tile, splits, warps, stages)
                    try:
                        trials.append((time_decode(batch, cfg, b, ctx, 50), cfg))
                    except Exception as e:  # noqa: BLE001 - a config may not compile
                        log(f"   {cfg}: {type(e).__name__}: {str(e)[:120]}")
            (bms, bbw), bcfg = min(trials, key=lambda t: t[0][0])
            row.update(best_cfg=str(bcfg), best_ms=bms, best_tbs=bbw,
                       best_pct=100 * bbw / copy_bw,
                       trials=[(str(c), m) for (m, _), c in trials])
            best = (f"{bms:8.3f} ms {bbw:5.2f} TB/s {100 * bbw / copy_bw:5.1f}%  "
                    f"tile {bcfg.tile_n} w{bcfg.num_warps} s{bcfg.num_stages} "
                    f"split {bcfg.num_splits}")
        results["rows"].append(row)
        cfg_s = (f"tile {ref_cfg.tile_n} w{ref_cfg.num_warps} s{ref_cfg.num_stages} "
                 f"split {ref_cfg.num_splits}")
        log(f"{b:4d} {ctx:6d} {cfg_s:>27} {ms:8.3f} {bw:6.2f} {100 * bw / copy_bw:5.1f}% "
            f"{gms:9.3f} {100 * gbw / copy_bw:5.1f}%   {best}")
    del cache
    # torch SDPA (flash) on contiguous K/V of one shape: what a non-paged decode costs
    b, ctx = (64, 8192)
    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=DT)
    k = torch.randn(b, HKV, ctx, D, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        ms = bench(lambda: sdpa(q, k, v, enable_gqa=True))
        bw = decode_bytes(b, ctx) / ms / 1e9
        log(f"torch sdpa (contiguous K/V, not paged) B={b} ctx={ctx}: {ms:.3f} ms "
            f"{bw:.2f} TB/s {100 * bw / copy_bw:.1f}%")
        results["rows"].append(dict(kind="sdpa_decode", B=b, ctx=ctx, ms=ms, tbs=bw))
    except Exception as e:  # noqa: BLE001
        log(f"torch sdpa decode failed: {e}")


def prefill_section(sweep: bool) -> None:
    log("\n## prefill attention (causal), Llama-3.1-8B heads, bf16")
    cases = [("8 x 1024 fresh", [(0, 1024)] * 8), ("4 x 512 chunk on 4k prefix",
                                                   [(4096, 512)] * 4),
             ("mixed: 64 decodes@4k + 2 x 1024", [(4096, 1)] * 64 + [(0, 1024)] * 2)]
    for name, specs in cases:
        seq = [c + n for c, n in specs]
        nblk = [-(-s // BS) for s in seq]
        nb = sum(nblk) + 1
        kc = torch.randn(nb, BS, HKV, D, device="cuda", dtype=DT)
        vc = torch.randn_like(kc)
        bt = torch.zeros(len(specs), max(nblk), dtype=torch.int32)
        ids = (torch.randperm(nb - 1) + 1).tolist()
        for i, n in enumerate(nblk):
            bt[i, :n] = torch.tensor(ids[:n])
            ids = ids[n:]
        qsl = torch.tensor([0] + list(itertools.accumulate(n for _, n in specs)),
                           dtype=torch.int32)
        t = int(qsl[-1])
        batch = dict(q=torch.randn(t, HQ, D, device="cuda", dtype=DT), k_cache=kc, v_cache=vc,
                     query_start_loc=qsl.cuda(), seq_lens=torch.tensor(seq, dtype=torch.int32,
                                                                       device="cuda"),
                     block_tables=bt.cuda(), scale=D ** -0.5)
        flops = sum(4 * HQ * D * n * (c + (n + 1) / 2) for c, n in specs)
        mq = max(n for _, n in specs)
        out = torch.empty_like(batch["q"])
        ms = bench(lambda: K.paged_attention(**batch, out=out, max_query_len=mq))  # noqa: B023
        row = dict(kind="prefill", case=name, ms=ms, tflops=flops / ms / 1e9)
        line = f"{name:34s} triton {ms:8.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s"
        if all(c == 0 for c, _ in specs) and len(set(specs)) == 1:
            n = specs[0][1]
            qq = torch.randn(len(specs), HQ, n, D, device="cuda", dtype=DT)
            kk = torch.randn(len(specs), HKV, n, D, device="cuda", dtype=DT)
            sdpa = torch.nn.functional.scaled_dot_product_attention
            sms = bench(lambda: sdpa(qq, kk, kk, is_causal=True, enable_gqa=True))  # noqa: B023
            row["sdpa_ms"] = sms
            line += f" | torch sdpa (contiguous) {sms:8.3f} ms ({sms / ms:.2f}x ours)"
        if sweep:
            trials = []
            for bm, tile, warps, stages in [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3),
                                            (128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 4, 3),
                                            (128, 64, 8, 3), (128, 32, 4, 2)]:
                cfg = AttnConfig(bm, tile, 1, warps, stages)
                try:
                    trials.append((bench(lambda: K.paged_attention(  # noqa: B023
                        **batch, out=out, config=cfg)), cfg))  # noqa: B023
                except Exception as e:  # noqa: BLE001
                    log(f"   {cfg}: {type(e).__name__}: {str(e)[:120]}")
            bms, bcfg = min(trials, key=lambda t: t[0])
            row.update(best_cfg=str(bcfg), best_ms=bms, trials=[(str(c), m) for m, c in trials])
            line += (f" | best {bms:.3f} ms: m{bcfg.block_m} tile {bcfg.tile_n} "
                     f"w{bcfg.num_warps} s{bcfg.num_stages}")
        results["rows"].append(row)
        log(line)


def small_kernels_section() -> None:
    log("\n## small kernels vs torch (eager reference ops), bf16")
    t, h, inter = 4096, 4096, 14336
    x = torch.randn(t, h, device="cuda", dtype=DT)
    r = torch.randn_like(x)
    w = torch.randn(h, device="cuda", dtype=DT)
    gu = torch.randn(t, 2 * inter, device="cuda", dtype=DT)
    qkv = torch.randn(t, (HQ + 2 * HKV) * D, device="cuda", dtype=DT)
    q = qkv[:, :HQ * D].view(t, HQ, D)
    k = qkv[:, HQ * D:(HQ + HKV) * D].view(t, HKV, D)
    v = qkv[:, (HQ + HKV) * D:].view(t, HKV, D)
    pos = torch.randint(0, 8192, (t,), device="cuda")
    cs = ops.rope_cos_sin_cache(D, 8192, 5e5, device="cuda")
    kc = torch.randn(t // BS * 4, BS, HKV, D, device="cuda", dtype=DT)
    vc = torch.randn_like(kc)
    slots = torch.randperm(kc.shape[0] * BS, device="cuda")[:t]
    e = 2  # bytes per bf16 element
    cases = [
        ("rms_norm [4096x4096]", lambda m: m.rms_norm(x, w, 1e-6), 2 * t * h * e),
        ("fused_add_rms_norm", lambda m: m.fused_add_rms_norm(x, r, w, 1e-6), 4 * t * h * e),
        ("silu_and_mul [4096x2x14336]", lambda m: m.silu_and_mul(gu), 3 * t * inter * e),
        ("apply_rotary [4096x(32+8)x128]", lambda m: m.apply_rotary(q, k, pos, cs),
         2 * t * (HQ + HKV) * D * e),
        ("store_kvcache [4096x8x128]", lambda m: m.store_kvcache(k, v, kc, vc, slots),
         4 * t * HKV * D * e),
        ("rotary_and_store_kv [4096x...]",
         lambda m: m.rotary_and_store_kv(q, k, v, pos, cs, kc, vc, slots),
         2 * t * (HQ + 2 * HKV) * D * e),
    ]
    log(f"{'kernel':32s} {'triton ms':>10} {'GB/s':>7} {'graph ms':>9} {'GB/s':>7} "
        f"{'torch ms':>10} {'speedup':>8}")
    for name, fn, nbytes in cases:
        tm = bench(lambda: fn(K))  # noqa: B023
        gm = graph_ms(lambda: fn(K))  # noqa: B023
        rm = bench(lambda: fn(ops))  # noqa: B023
        results["rows"].append(dict(kind="small", name=name, ms=tm, graph_ms=gm, torch_ms=rm,
                                    gbs=nbytes / tm / 1e6))
        log(f"{name:32s} {tm:10.4f} {nbytes / tm / 1e6:7.0f} {gm:9.4f} {nbytes / gm / 1e6:7.0f} "
            f"{rm:10.4f} {rm / tm:7.1f}x")


# (name, N, K) of the decode linears: Llama-3.1-8B, then Qwen3-0.6B
LINEAR_SHAPES = [("8b qkv", 6144, 4096), ("8b o_proj", 4096, 4096),
                 ("8b gate_up", 28672, 4096), ("8b down", 4096, 14336),
                 ("8b lm_head", 128256, 4096),
                 ("0.6b qkv", 4096, 1024), ("0.6b o_proj", 1024, 2048),
                 ("0.6b gate_up", 6144, 1024), ("0.6b down", 1024, 3072),
                 ("0.6b lm_head", 151936, 1024)]
LINEAR_ROWS = (1, 4, 8, 16)


def cold_linear_us(fn, w: torch.Tensor, x: torch.Tensor) -> float:
    """Microseconds per call of fn(x, w_i) on cold weights: one CUDA graph over enough
    distinct copies of w (>= 256 MB, 4 x the L2) that none is read from L2, as in a
    forward that streams every layer's weights once."""
    copies = max(2, -(-(256 << 20) // (w.numel() * w.element_size())))
    ws = [w.clone() for _ in range(copies)]
    ms = graph_ms(lambda: [fn(x, wi) for wi in ws])
    return ms * 1e3 / copies


def linear_section(copy_bw: float, sweep: bool) -> None:
    log("\n## decode linears: qworker_kernels.linear vs cuBLAS (F.linear), bf16, cold weights")
    log("   us per call (TB/s of weight bytes); config (block_n, block_k, warps, stages)")
    from qworker_kernels.skinny_linear import LinearConfig, launch_config, linear_wins
    configs = [LinearConfig(bn, bk, w, s) for bn in (16, 32, 64) for bk in (128, 256, 512)
               for w, s in ((4, 3), (4, 5), (8, 4))]
    for name, n, k in LINEAR_SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=DT) * k ** -0.5
        x = torch.randn(max(LINEAR_ROWS), k, device="cuda", dtype=DT)
        gb = w.numel() * w.element_size() / 1e9
        chosen = launch_config(n, k)
        if not linear_wins(n, k):
            log(f"{name:13s} (the model keeps cuBLAS for this shape; kernel timed anyway)")
        if sweep:                                   # at M = 1, then the best at every M
            timed = []
            for c in configs:
                try:
                    us = cold_linear_us(lambda xi, wi, c=c: K.linear(xi, wi, config=c), w, x[:1])
                except Exception as e:  # noqa: BLE001 - a config that does not compile
                    log(f"   {tuple(c)}: {type(e).__name__}: {str(e)[:100]}")
                    continue
                if us == us:                        # graph_ms gives nan when capture fails
                    timed.append((us, c))
            timed.sort(key=lambda t: t[0])
            log(f"{name:13s} best at M=1: " + "; ".join(
                f"{tuple(c)} {us:.1f}" for us, c in timed[:4]))
            chosen = timed[0][1]
        for m in LINEAR_ROWS:
            xm = x[:m]
            cub = cold_linear_us(torch.nn.functional.linear, w, xm)
            ours = cold_linear_us(lambda xi, wi: K.linear(xi, wi, config=chosen), w, xm)  # noqa: B023
            results["rows"].append(dict(kind="linear", name=name, n=n, k=k, m=m,
                                        config=list(chosen), us=ours, cublas_us=cub,
                                        copy_tbs=copy_bw))
            log(f"{name:13s} M={m:2d} {tuple(chosen)}: ours {ours:7.1f} ({gb / ours * 1e3:.2f}) "
                f"cuBLAS {cub:7.1f} ({gb / cub * 1e3:.2f})  cuBLAS/ours {cub / ours:.3f}")
        del w, x
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="sweep launch configs")
    ap.add_argument("--quick", action="store_true", help="two decode shapes only")
    ap.add_argument("--only", default="decode,small,prefill,linear",
                    help="comma-separated sections to run (default: all)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    results["env"] = dict(gpu=props.name, sms=props.multi_processor_count,
                          torch=torch.__version__, triton=triton.__version__,
                          python=platform.python_version(), cmd=" ".join(sys.argv))
    log(json.dumps(results["env"]))
    t0 = time.time()
    copy_bw = copy_bandwidth()
    results["copy_tbs"] = copy_bw
    results["read_tbs"] = read_bw = read_bandwidth()
    log(f"device copy bandwidth (read + write): {copy_bw:.2f} TB/s; "
        f"read-only stream: {read_bw:.2f} TB/s")
    path = os.path.join(args.out, "bench_kernels.json")
    sections = {"decode": lambda: decode_section(copy_bw, args.sweep, args.quick),
                "small": small_kernels_section, "prefill": lambda: prefill_section(args.sweep),
                "linear": lambda: linear_section(copy_bw, args.sweep)}
    chosen = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(chosen) - set(sections))
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(sections)}")
    for name in chosen:
        sections[name]()
        results["wall_s"] = time.time() - t0
        with open(path, "w") as f:      # after each section: a timeout keeps what was done
            json.dump(results, f, indent=1)
    log(f"\nwall {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
