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

``--mid-run W_8b`` profiles real decode steps instead: the workload's requests all
admitted and prefilled, its decode batch at the contexts it has reached (eager, so that
the profiler sees every kernel), then ``--reps`` whole ``Engine.step()`` calls. Kernels
are summed by kind per step; attention is set against the K/V bytes it had to read.

  python scripts/profile_decode.py --shape llama8b --batch 1 [--blas] [--ab-batches 1,8,32]
      [--variants default,cublas,gu_cublas,qo_cublas,down_ours]
  python scripts/profile_decode.py --mid-run W_8b --skip 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offline import SHAPES, WORKLOADS, make_checkpoint, random_workload  # noqa: E402


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
    ap.add_argument("--mid-run", default="", choices=["", *WORKLOADS],
                    help="profile this workload's real decode steps (see above)")
    ap.add_argument("--skip", type=int, default=32,
                    help="--mid-run: decode steps to run after the last prefill first")
    a = ap.parse_args()
    if a.mid_run:
        if not torch.cuda.is_available():
            raise SystemExit("needs CUDA")
        mid_run(a.mid_run, a.skip, a.reps)
        return
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


# kernel name fragments -> kind, first match wins (GEMMs are cuBLAS's nvjet/cutlass/gemm
# kernels, its split-K reduce, or our skinny GEMM)
KINDS = (("attention", ("paged_attention", "attn", "merge")), ("gemm", ("nvjet", "gemm", "cutlass",
         "splitkreduce", "skinny", "_linear")), ("norm", ("rms_norm",)),
         ("rotary + kv store", ("rotary", "store")), ("silu_and_mul", ("silu",)))


def mid_run(workload: str, skip: int, reps: int) -> None:
    """Profile ``reps`` decode steps of ``workload`` once every request is prefilled."""
    from torch.profiler import ProfilerActivity, profile

    from qworker import LLM, SamplingParams
    w = WORKLOADS[workload]
    shape = SHAPES[w["shape"]]
    llm = LLM(make_checkpoint(w["shape"], None, with_weights=False), device="cuda",
              dtype="bfloat16", max_num_seqs=w["n"], max_model_len=2560,
              load_format="dummy", enforce_eager=True)
    eng = llm.engine
    for i, (ids, n) in enumerate(random_workload(w["n"], w["inp"], w["out"],
                                                 shape["vocab_size"])):
        eng.add_request(f"r{i}", ids, SamplingParams(max_tokens=n, temperature=0.0,
                                                     ignore_eos=True))
    sched = eng.scheduler
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                               for r in sched.running):
        eng.step()
    for _ in range(skip):
        eng.step()
    running = list(sched.running)
    batch, ctx = len(running), sum(r.num_tokens for r in running)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(reps):
            eng.step()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    for ev in p.key_averages():
        us = ev.self_device_time_total / reps
        if us <= 0:
            continue
        name = ev.key.lower()
        kind = next((k for k, frags in KINDS if any(f in name for f in frags)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                 max_name_column_width=70))
    total = sum(kinds.values())
    # K/V bytes one decode step reads: every running token's K and V in every layer
    kv = ctx * shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * \
        shape.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"]) * 2
    print(f"\n{workload} mid-run: batch {batch}, mean context {ctx / batch:.0f} tokens, "
          f"{reps} steps; GPU time per step by kind:")
    for k, us in sorted(kinds.items(), key=lambda kv_: -kv_[1]):
        extra = f", {kv / us / 1e6:.2f} TB/s of K/V" if k == "attention" else ""
        print(f"  {k:18s} {us / 1e3:7.3f} ms ({us / total:5.1%}){extra}")
    print(f"  {'all kernels':18s} {total / 1e3:7.3f} ms; K/V read {kv / 1e9:.2f} GB a step")


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
