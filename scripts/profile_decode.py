"""Where one decode forward's GPU time goes, kernel by kernel (torch profiler, CUDA only).

Builds a random-weight model of a real shape, runs the decode graph's forward eagerly on
``--batch`` rows (the graph's own input buffers), and prints the kernels by total CUDA
time over ``--reps`` forwards; then the bandwidth each linear layer's GEMM reaches alone
at that batch (CUDA-graph timing, L2 flushed by Triton's ``do_bench_cudagraph``).

  python scripts/profile_decode.py --shape llama8b --batch 1
"""

from __future__ import annotations

import argparse
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
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    import triton.testing
    from torch.profiler import ProfilerActivity, profile

    from qworker import LLM
    llm = LLM(make_checkpoint(a.shape, None, with_weights=False), device="cuda",
              dtype="bfloat16", max_num_seqs=max(8, a.batch), max_model_len=2048,
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


if __name__ == "__main__":
    main()
