"""Where one decode forward's GPU time goes, kernel by kernel (torch profiler, CUDA only).

Builds a random-weight model of a real shape, runs the decode graph's forward eagerly on
``--batch`` rows (the graph's own input buffers), and prints the kernels by total CUDA
time over ``--reps`` forwards; then the bandwidth each linear layer's GEMM reaches alone
at that batch (CUDA-graph timing, L2 flushed by Triton's ``do_bench_cudagraph``).

``--blas`` compares the BLAS back ends torch can use for the linears (cuBLAS, cuBLASLt,
and cuBLAS on a transposed copy of the weight): each linear alone on cold weights (a
graph over 16 distinct copies, as a forward streams 32 layers), and whether row 0 of the
result changes with the row count (batch invariance).

``--ab-batches`` times the decode graph's replay at those batches (``--context`` tokens
each), captured once per ``--variants`` entry of ``VARIANTS`` (the default; programmatic
dependent launch off; every linear through cuBLAS, ``QWORKER_SKINNY_LINEAR=0``; one
weight shape moved between the skinny GEMM and cuBLAS) and replayed alternately in this
process.

  python scripts/profile_decode.py --shape llama8b --batch 1 [--blas] [--ab-batches 1,8,32]
      [--variants default,cublas,gu_cublas,qo_cublas,down_ours]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offline import SHAPES, make_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="llama8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--blas", action="store_true", help="compare cuBLAS and cuBLASLt")
    ap.add_argument("--ab-batches", default="",
                    help="batches whose decode graph replay is timed per variant")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--variants", default="default,no_pdl,cublas",
                    help=f"which of {', '.join(VARIANTS)} --ab-batches compares")
    a = ap.parse_args()
    ab = [int(b) for b in a.ab_batches.split(",") if b]
    unknown = sorted(set(a.variants.split(",")) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    import triton.testing
    from torch.profiler import ProfilerActivity, profile

    from qworker import LLM
    llm = LLM(make_checkpoint(a.shape, None, with_weights=False), device="cuda",
              dtype="bfloat16", max_num_seqs=max(8, a.batch, *ab), max_model_len=2048,
              load_format="dummy")
    runner = llm.engine.runner
    g, model = runner.graphs, runner.model
    args = (g.input_ids[:a.batch], g.positions[:a.batch], g._attn(a.batch))
    with torch.inference_mode():
        for _ in range(3):
            model(*args)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(a.reps):
                model(*args)
            torch.cuda.synchronize()
    print(f"{a.reps} forwards of {a.shape} at batch {a.batch}:")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=16,
                                 max_name_column_width=70))
    layer = model.model.layers[0]
    for name, lin in (("qkv", layer.self_attn.qkv_proj), ("o_proj", layer.self_attn.o_proj),
                      ("gate_up", layer.mlp.gate_up_proj), ("down", layer.mlp.down_proj),
                      ("lm_head", model.lm_head)):
        w = lin.weight
        x = torch.randn(a.batch, w.shape[1], device="cuda", dtype=w.dtype)
        ms = triton.testing.do_bench_cudagraph(lambda x=x, w=w: torch.nn.functional.linear(x, w))
        tbps = w.numel() * w.element_size() / ms / 1e9
        print(f"{name:8s} {tuple(w.shape)}: {ms * 1e3:7.1f} us, {tbps:.2f} TB/s of weights")
    if a.blas:
        blas_linears(model)
    if ab:
        variant_replays(runner, ab, a.context, a.variants.split(","))


BACKENDS = ("cublas", "cublaslt")


def _graph_us(fn, reps: int = 20) -> float:
    """Median microseconds of one call of fn, replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3)
    return statistics.median(out)


def blas_linears(model) -> None:
    layer = model.model.layers[0]
    print("\nlinears on cold weights (16 copies in one graph), us per call and TB/s:")
    for name, lin in (("qkv", layer.self_attn.qkv_proj), ("o_proj", layer.self_attn.o_proj),
                      ("gate_up", layer.mlp.gate_up_proj), ("down", layer.mlp.down_proj)):
        w0 = lin.weight
        ws = [w0.clone() for _ in range(16)]
        wts = [w.t().contiguous() for w in ws]
        gb = w0.numel() * 2 / 1e9
        x = torch.randn(64, w0.shape[1], device="cuda", dtype=w0.dtype)
        for m in (1, 8, 32):
            xm = x[:m]
            row = []
            for be in BACKENDS:
                torch.backends.cuda.preferred_blas_library(be)
                us = _graph_us(lambda: [torch.nn.functional.linear(xm, w) for w in ws]) / 16  # noqa: B023
                row.append(f"{be} {us:6.1f} ({gb / us * 1e3:.2f})")
            torch.backends.cuda.preferred_blas_library("cublas")
            us = _graph_us(lambda: [xm @ wt for wt in wts]) / 16  # noqa: B023
            row.append(f"transposed {us:6.1f} ({gb / us * 1e3:.2f})")
            print(f"  {name:8s} M={m:2d}: " + "; ".join(row))
        for be in BACKENDS:
            torch.backends.cuda.preferred_blas_library(be)
            ref = torch.nn.functional.linear(x[:1], w0)
            differ = [m for m in (2, 4, 8, 16, 24, 32, 48, 64)
                      if not torch.equal(torch.nn.functional.linear(x[:m], w0)[:1], ref)]
            print(f"  {name:8s} {be}: row 0 differs from M=1 at M={differ or 'none'}")
        torch.backends.cuda.preferred_blas_library("default")


VARIANTS = {      # name: environment while capturing, and/or skinny-GEMM table entries
    "default": {},
    "no_pdl": {"env": {"QWORKER_PDL": "0"}},
    "cublas": {"env": {"QWORKER_SKINNY_LINEAR": "0"}},
    "gu_cublas": {"tuned": {(28672, 4096): None}},
    "qo_cublas": {"tuned": {(6144, 4096): None, (4096, 4096): None}},
    "down_ours": {"tuned": {(4096, 14336): (32, 512, 4, 3)}},
}


def variant_replays(runner, batches: list[int], context: int, variants: list[str]) -> None:
    """Decode graph replay ms per batch for each variant, interleaved (5 rounds)."""
    from qworker_kernels.skinny_linear import TUNED, LinearConfig

    from qworker.engine.cuda_graphs import DecodeGraphs
    bs = runner.block_size
    nblk = -(-context // bs)
    sides = {}
    for name in variants:
        env, tuned = VARIANTS[name].get("env", {}), VARIANTS[name].get("tuned", {})
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        table = dict(TUNED)
        TUNED.update({s: c and LinearConfig(*c) for s, c in tuned.items()})
        g = DecodeGraphs(runner.model, runner.kv_caches, max(batches), nblk,
                         torch.device("cuda"))
        g.capture()
        n = g.buckets[-1]
        g.seq_lens[:n] = context                            # every row a real request
        g.positions[:n] = context - 1
        g.block_tables[:n] = (torch.arange(n * nblk, device="cuda", dtype=torch.int32)
                              .view(n, nblk) % runner.num_kv_blocks)
        g.slot_mapping[:n] = g.block_tables[:n, -1].long() * bs + (context - 1) % bs
        sides[name] = g
        TUNED.clear()
        TUNED.update(table)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    times: dict = {(s, b): [] for s in sides for b in batches}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        for b in batches:
            for s, g in sides.items():
                graph = g._graphs[g.bucket_for(b, nblk)]
                for _ in range(3):
                    graph.replay()
                start.record()
                for _ in range(20):
                    graph.replay()
                end.record()
                end.synchronize()
                times[(s, b)].append(start.elapsed_time(end) / 20)
    print(f"\ndecode graph replay ms, {context} context (median of 5 rounds of 20):")
    print(f"{'batch':>5} " + " ".join(f"{s:>10}" for s in sides))
    for b in batches:
        print(f"{b:5d} " + " ".join(f"{statistics.median(times[(s, b)]):10.3f}" for s in sides))


if __name__ == "__main__":
    main()
