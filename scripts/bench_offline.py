"""Offline throughput: one workload through several serving strategies, side by side.

Strategies (``--modes``):
  naive   transformers ``generate``, one request at a time
  static  transformers ``generate`` on padded static batches (``--bs``), run to the longest
  hf_cb   transformers' own continuous batching (``init_continuous_batching``)
  ours    qworker's engine (continuous batching over a paged KV cache)

Workloads (docs/benchmarks.md, ../shared/docs/BENCHMARKS.md):
  W_cpu   SmolLM2-135M-Instruct, real weights, fp32, the 16 test prompts, 48 tokens each
  W_nano  Qwen3-0.6B shape, random weights, 256 requests, in/out uniform 100..1024
  W_8b    Llama-3.1-8B shape, random weights, 256 requests, in 128..1024, out 64..512
Every request generates exactly its own length (EOS ignored); the metric is output tokens
per wall second from first submission to last completion, after a warm-up; model load
and graph capture are excluded. Prints a table and ratios; ``--json`` writes the figures.

  python scripts/bench_offline.py --workload W_cpu --modes naive,static,hf_cb,ours
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time

import torch

SHAPES = {
    "qwen3_0.6b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       rope_theta=1000000.0, max_position_embeddings=8192,
                       tie_word_embeddings=True, rms_norm_eps=1e-6),
    "llama8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
                    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                    max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-5),
}
WORKLOADS = {
    "W_nano": dict(shape="qwen3_0.6b", n=256, inp=(100, 1024), out=(100, 1024)),
    "W_8b": dict(shape="llama8b", n=256, inp=(128, 1024), out=(64, 512)),
}
W_CPU_PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The three primary colors are", "Water boils at a temperature of",
    "Translate to French: I like apples.", "1, 2, 3, 4, 5,", "The best way to learn a language is",
    "Write a haiku about the sea.", "What is the tallest mountain on Earth?",
    "Name two prime numbers.", "Explain gravity to a child in one sentence.",
    "The history of the Roman Empire", "A recipe for pancakes:", "import numpy as np\n",
    "Dear hiring manager,",
]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_workload(n: int, inp: tuple[int, int], out: tuple[int, int], vocab: int):
    """The same requests as ../shared/anchors/hf_gpu_bench.py builds (random.Random(0))."""
    rng = random.Random(0)
    reqs = []
    for _ in range(n):
        length = rng.randint(*inp)
        reqs.append(([rng.randint(10, vocab - 10) for _ in range(length)], rng.randint(*out)))
    return reqs


def make_checkpoint(shape: str, dtype: torch.dtype, with_weights: bool) -> str:
    """A checkpoint dir for a random-weight model of a real shape. Without weights the
    engine initializes them itself (load_format="dummy"), which skips writing GBs."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(**{k: v for k, v in SHAPES[shape].items() if k != "architectures"})
    cfg.architectures = SHAPES[shape]["architectures"]
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 0
    path = tempfile.mkdtemp(prefix=f"qworker-{shape}-")
    cfg.save_pretrained(path)
    if with_weights:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype).save_pretrained(path)
    return path


def hf_model(path: str, dtype: torch.dtype, dev: str):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(path)
    cfg._attn_implementation = "sdpa"
    if any(p.endswith(".safetensors") for p in __import__("os").listdir(path)):
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, config=cfg).to(dev)
    else:
        torch.manual_seed(0)
        with torch.device(dev):
            m = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    m.eval()
    m.generation_config.pad_token_id = 0
    return m


@torch.no_grad()
def run_naive(m, reqs, dev):
    toks = 0
    sync()
    t = time.perf_counter()
    for ids, n in reqs:
        x = torch.tensor([ids], device=dev)
        y = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False)
        toks += y.shape[1] - x.shape[1]
    sync()
    return toks, time.perf_counter() - t


@torch.no_grad()
def run_static(m, reqs, dev, bs):
    useful = 0
    sync()
    t = time.perf_counter()
    for i in range(0, len(reqs), bs):
        chunk = reqs[i:i + bs]
        width = max(len(ids) for ids, _ in chunk)
        n = max(k for _, k in chunk)
        x = torch.zeros(len(chunk), width, dtype=torch.long, device=dev)
        mask = torch.zeros_like(x)
        for j, (ids, _) in enumerate(chunk):
            x[j, width - len(ids):] = torch.tensor(ids, device=dev)
            mask[j, width - len(ids):] = 1
        m.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        useful += sum(k for _, k in chunk)
    sync()
    return useful, time.perf_counter() - t


@torch.no_grad()
def run_hf_cb(m, reqs):
    from transformers import GenerationConfig
    gc = GenerationConfig(do_sample=False, max_new_tokens=max(k for _, k in reqs),
                          eos_token_id=-1, pad_token_id=0)
    mgr = m.init_continuous_batching(generation_config=gc)
    mgr.start()
    sync()
    t = time.perf_counter()
    for i, (ids, n) in enumerate(reqs):
        mgr.add_request(ids, request_id=f"r{i}", max_new_tokens=n)
    done = toks = 0
    while done < len(reqs):
        r = mgr.get_result(timeout=5)
        if r is None:
            if not mgr.is_running():
                break
            continue
        if r.is_finished():
            done += 1
            toks += len(r.generated_tokens)
    sync()
    dt = time.perf_counter() - t
    mgr.stop(block=True, timeout=10)
    return toks, dt


def run_ours(llm, reqs):
    from qworker import SamplingParams
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in reqs]
    sync()
    t = time.perf_counter()
    outs = llm.generate([ids for ids, _ in reqs], params)
    sync()
    return sum(len(o.token_ids) for o in outs), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workload", default="W_cpu", choices=["W_cpu", *WORKLOADS])
    ap.add_argument("--modes", default="naive,static,hf_cb,ours")
    ap.add_argument("--n", type=int, default=None, help="requests (default: the workload's)")
    ap.add_argument("--naive-n", type=int, default=None, help="requests for naive mode")
    ap.add_argument("--bs", type=int, default=32, help="static batch size")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    modes = a.modes.split(",")
    res: dict = {"workload": a.workload, "device": torch.cuda.get_device_name() if dev == "cuda"
                 else f"cpu x{torch.get_num_threads()}", "torch": torch.__version__}
    import transformers
    res["transformers"] = transformers.__version__

    if a.workload == "W_cpu":
        from qworker.model.hub import resolve_model
        path = str(resolve_model("smollm2-135m-instruct"))
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
        reqs = [(tok.encode(p), 48) for p in W_CPU_PROMPTS]
    else:
        w = WORKLOADS[a.workload]
        path = make_checkpoint(w["shape"], dtype, with_weights=False)
        reqs = random_workload(a.n or w["n"], w["inp"], w["out"], SHAPES[w["shape"]]["vocab_size"])
    reqs = reqs[: a.n] if a.n else reqs
    expected_tokens = sum(n for _, n in reqs)
    rows = []

    def record(name: str, toks: int, dt: float, n_reqs: int) -> None:
        rows.append((name, toks, dt, toks / dt, n_reqs))
        res[f"{name}_tok_s"] = round(toks / dt, 1)
        print(f"{name:8s} {toks:8d} tok {dt:8.2f} s {toks / dt:10.1f} tok/s", flush=True)

    hf_modes = [m for m in modes if m in ("naive", "static", "hf_cb")]
    if hf_modes:
        m = hf_model(path, dtype, dev)
        run_naive(m, [(reqs[0][0][:16], 4)], dev)                     # warm-up
        if "naive" in modes:
            sub = reqs[: a.naive_n or len(reqs)]
            record("naive", *run_naive(m, sub, dev), len(sub))
        if "static" in modes:
            record("static", *run_static(m, reqs, dev, a.bs), len(reqs))
        if "hf_cb" in modes:
            try:
                toks, dt = run_hf_cb(m, reqs)
                record("hf_cb", toks, dt, len(reqs))
            except Exception as e:  # record, don't hide
                res["hf_cb_error"] = repr(e)[:300]
                print("hf_cb failed:", repr(e)[:300], file=sys.stderr)
        del m
        if dev == "cuda":
            torch.cuda.empty_cache()
    if "ours" in modes:
        from qworker import LLM
        kw = {"load_format": "dummy"} if a.workload != "W_cpu" else {}
        if a.max_num_batched_tokens:
            kw["max_num_batched_tokens"] = a.max_num_batched_tokens
        llm = LLM(path, device=dev, dtype=str(dtype).removeprefix("torch."),
                  max_num_seqs=a.max_num_seqs, **kw)
        run_ours(llm, [(reqs[0][0][:16], 4)])                          # warm-up
        toks, dt = run_ours(llm, reqs)
        if toks != expected_tokens:
            raise SystemExit(f"ours produced {toks} tokens, expected {expected_tokens}")
        record("ours", toks, dt, len(reqs))

    print(f"\n{a.workload} on {res['device']}")
    print(f"{'mode':8s} {'requests':>8s} {'tokens':>8s} {'seconds':>8s} {'tok/s':>10s}")
    for name, toks, dt, rate, n in rows:
        print(f"{name:8s} {n:8d} {toks:8d} {dt:8.2f} {rate:10.1f}")
    if "ours_tok_s" in res:
        for base in ("naive", "static", "hf_cb"):
            if f"{base}_tok_s" in res:
                ratio = res["ours_tok_s"] / res[f"{base}_tok_s"]
                res[f"ours_vs_{base}"] = round(ratio, 2)
                print(f"ours / {base}: {ratio:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
