"""Offline throughput: workloads through several serving strategies, side by side.

Strategies (``--modes``):
  naive   transformers ``generate``, one request at a time
  static  transformers ``generate`` on padded static batches (``--bs``), run to the longest
  hf_cb   transformers' own continuous batching (``init_continuous_batching``)
  ours    qworker's engine (continuous batching over a paged KV cache)
  decode  qworker's decode step at ``--decode-batches`` (e.g. 1,32,256) and
          ``--decode-context`` tokens, through ``Engine.step()``, split into host and GPU
          time, against the bandwidth floor (weights + KV bytes / copy bandwidth)
  ceil    the device ceilings measured in this run (copy bandwidth, bf16 matmul)

Workloads (docs/benchmarks.md, ../shared/docs/BENCHMARKS.md):
  W_cpu   SmolLM2-135M-Instruct, real weights, fp32, the 16 test prompts, 48 tokens each
  W_nano  Qwen3-0.6B shape, random weights, 256 requests, in/out uniform 100..1024
  W_8b    Llama-3.1-8B shape, random weights, 256 requests, in 128..1024, out 64..512
Every request generates exactly its own length (EOS ignored); the metric is output tokens
per wall second from first submission to last completion, after a warm-up; model load
and graph capture are excluded. ``--workload`` takes several, comma-separated: each
workload's engine is built, measured and freed before the next, and transformers runs
after all of ours (``--deadline`` skips transformers' modes once the run is that old).
Prints a table and ratios; ``--json`` writes the figures.

  python scripts/bench_offline.py --workload W_cpu --modes naive,static,hf_cb,ours
  python scripts/bench_offline.py --workload W_8b,W_nano --modes ceil,ours,decode,static,hf_cb \
      --static-n 32 --cb-n 32 --max-model-len 2048 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from collections import defaultdict

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
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, config=cfg).to(dev)
    else:
        torch.manual_seed(0)
        with torch.device(dev):
            m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
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
    if hasattr(mgr, "warmup") and not getattr(mgr, "warmed_up", True):
        mgr.warmup()                    # as ../shared/anchors/hf_gpu_bench.py does
    mgr.start()
    sync()
    t = time.perf_counter()
    for i, (ids, n) in enumerate(reqs):
        mgr.add_request(ids, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
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


def ceilings() -> tuple[float, float]:
    """Copy bandwidth (TB/s, bytes read + written) and bf16 matmul TFLOP/s, as
    ../shared/anchors/hf_gpu_bench.py measures them (random data, not zeros)."""
    x = torch.randint(0, 255, (2 * 1024**3,), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    bw = 2 * x.numel() / ((time.perf_counter() - t) / 10) / 1e12
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return bw, 2 * 8192**3 / ((time.perf_counter() - t) / 10) / 1e12


def run_ours(llm, reqs):
    from qworker import SamplingParams
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in reqs]
    sync()
    t = time.perf_counter()
    outs = llm.generate([ids for ids, _ in reqs], params)
    sync()
    return sum(len(o.token_ids) for o in outs), time.perf_counter() - t


class StepTimer:
    """Times one engine's steps by stage (bench only: shadows the instances' methods).

    Per ``Engine.step()`` call, in ms: ``wall``; ``schedule``; ``execute`` (build inputs
    + launch the forward); ``launch_rest`` (sampling batch + sampler launch + advance);
    ``wait``, the host blocked on the GPU for the sampled ids; ``resolve`` (update +
    detokenize, after the wait); ``gpu``, the CUDA-event span from the runner's launch to
    the end of the sampler; ``host`` = wall - wait. With asynchronous scheduling a call
    launches one step and resolves the one before, so ``wait`` is what the host work did
    not hide.
    """

    def __init__(self, engine) -> None:
        self.engine, self.totals, self.steps = engine, defaultdict(float), 0
        self._events: list = []
        sched, runner = engine.scheduler, engine.runner
        clock = time.perf_counter
        cuda = torch.cuda.is_available()

        def schedule():
            t0 = clock()
            r = type(sched).schedule(sched)
            self.totals["schedule"] += clock() - t0
            return r

        def execute(out, pending=None):
            t0 = clock()
            r = type(runner).execute(runner, out, pending)
            self.totals["execute"] += clock() - t0
            return r

        def launch(out, prev):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None
            if ev:
                ev[0].record()
            t0 = clock()
            r = type(engine)._launch(engine, out, prev)
            if ev:
                ev[1].record()
                self._events.append(ev)
            self.totals["launch_rest"] += clock() - t0
            return r

        def resolve(step):
            t0 = clock()
            if step.event is not None:
                step.event.synchronize()
            t1 = clock()
            r = type(engine)._resolve(engine, step)
            self.totals["wait"] += t1 - t0
            self.totals["resolve"] += clock() - t1
            return r

        sched.schedule, runner.execute = schedule, execute
        engine._launch, engine._resolve = launch, resolve

    def step(self):
        t0 = time.perf_counter()
        outs = self.engine.step()
        self.totals["wall"] += time.perf_counter() - t0
        self.steps += 1
        return outs

    def close(self) -> dict[str, float]:
        e = self.engine
        del e.scheduler.schedule, e.runner.execute, e._launch, e._resolve
        self.engine = None
        res = {k: round(v / self.steps * 1e3, 3) for k, v in self.totals.items()}
        res["launch_rest"] = round(res.get("launch_rest", 0.0) - res.get("execute", 0.0), 3)
        sync()                          # the last launch may still be running
        res["gpu"] = round(sum(a.elapsed_time(b) for a, b in self._events) / self.steps, 3) \
            if self._events else 0.0
        res["host"] = round(res["wall"] - res.get("wait", 0.0), 3)
        res["async"] = bool(e.async_scheduling)
        return res


class count_steps:  # noqa: N801 - used like a function
    """Counts an engine's steps and its decode-only (graph-eligible) steps; no syncs."""

    def __init__(self, engine) -> None:
        self.engine, self.steps, self.decode_steps, self.tokens = engine, 0, 0, 0
        self.seconds = {"decode": 0.0, "mixed": 0.0}    # wall time from one step to the next
        self._last: tuple[float, str] | None = None
        self.decode_rows = 0
        sched = engine.scheduler

        def schedule():
            now = time.perf_counter()
            if self._last is not None:
                self.seconds[self._last[1]] += now - self._last[0]
            out = type(sched).schedule(sched)
            if out.scheduled:
                self.steps += 1
                n = out.num_batched_tokens
                self.tokens += n
                kind = "decode" if n == len(out.scheduled) else "mixed"
                if kind == "decode":
                    self.decode_steps += 1
                    self.decode_rows += n
                self._last = (now, kind)
            return out
        sched.schedule = schedule

    def close(self) -> dict[str, float]:
        del self.engine.scheduler.schedule
        self.engine = None
        return {"steps": self.steps, "decode_only": self.decode_steps,
                "batched_tokens": self.tokens,
                "decode_only_s": round(self.seconds["decode"], 2),
                "mixed_s": round(self.seconds["mixed"], 2),
                "mean_decode_batch": round(self.decode_rows / max(1, self.decode_steps), 1)}


def decode_floor_bytes(engine, batch: int, context: int) -> tuple[int, int]:
    """Bytes one decode step must read: every weight once (not the embedding table, of
    which it reads B rows, unless it is tied to the output projection), and the K/V of
    ``batch`` x ``context`` tokens."""
    m = engine.runner.model
    weights = sum(p.numel() * p.element_size() for p in m.parameters())
    if not m.tie_word_embeddings:
        emb = m.model.embed_tokens
        emb = getattr(emb, "weight", emb)
        weights -= emb.numel() * emb.element_size()
    kv = batch * context * engine.runner.bytes_per_block() // engine.config.block_size
    return weights, kv


def bench_decode(engine, batches: list[int], context: int, bw_tbps: float | None,
                 steps: int = 16, warm: int = 3) -> list[dict]:
    """Decode steps of ``batch`` requests at about ``context`` tokens of context: full
    ``Engine.step()`` (StepTimer stages) and the model's graph replay alone."""
    from qworker import SamplingParams
    rng = random.Random(1)
    rows = []
    prompt_len = context - warm - steps // 2           # the timed steps centre on context
    for b in batches:
        rids = [f"decode-{b}-{i}" for i in range(b)]
        for rid in rids:
            engine.add_request(rid, [rng.randint(10, engine.vocab_size - 10)
                                     for _ in range(prompt_len)],
                               SamplingParams(max_tokens=context, temperature=0.0,
                                              ignore_eos=True))   # aborted when measured
        s = engine.scheduler
        while s.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in s.running):
            engine.step()
        for _ in range(warm):
            engine.step()
        timer = StepTimer(engine)
        for _ in range(steps):
            timer.step()
        row = {"batch": b, "context": context, **timer.close()}
        graphs = engine.runner.graphs
        bucket = graphs.bucket_for(b, -(-(context + steps) // engine.config.block_size)) \
            if graphs else None
        if bucket is not None and graphs._graphs:       # the captured forward alone
            g = graphs._graphs[bucket]
            row["graph_replay"] = round(cuda_ms(g.replay, steps), 3)
            # what the buffers hold (the last step's batch) and one layer's attention on it
            row.update(attention_on_graph_inputs(engine, b, bucket, steps))
        assert len(engine.scheduler.running) == b, "the batch shrank while being timed"
        mean_ctx = sum(r.num_tokens for r in engine.scheduler.running) / b
        row["mean_context"] = round(mean_ctx, 1)
        for rid in rids:
            engine.abort(rid)
        wbytes, kvbytes = decode_floor_bytes(engine, b, round(mean_ctx))
        row["weights_gb"], row["kv_gb"] = round(wbytes / 1e9, 2), round(kvbytes / 1e9, 3)
        if bw_tbps:
            row["floor"] = round((wbytes + kvbytes) / (bw_tbps * 1e12) * 1e3, 3)
            row["step_vs_floor"] = round(row["floor"] / row["wall"], 3)
        print("decode", json.dumps(row), flush=True)
        rows.append(row)
    return rows


def attention_on_graph_inputs(engine, b: int, bucket: int, reps: int) -> dict[str, float]:
    """One layer's paged attention on what the decode graph's buffers hold (the last
    step's batch): its time and the K/V bytes it must read per second."""
    from qworker.model.ops_dispatch import paged_attention
    g = engine.runner.graphs
    attn = engine.runner.model.model.layers[0].self_attn
    kc, vc = engine.runner.kv_caches[0]
    q = torch.randn(bucket, attn.hq, attn.d, device="cuda", dtype=kc.dtype)
    mean_len = g.seq_lens[:b].float().mean().item()

    def call():
        paged_attention(q, kc, vc, g.query_start_loc[:bucket + 1], g.seq_lens[:bucket],
                        g.block_tables[:bucket], attn.scale)
    call()
    graph = torch.cuda.CUDAGraph()          # as in the decode graph: no launch overhead
    with torch.cuda.graph(graph):
        for _ in range(reps):
            call()
    ms = cuda_ms(graph.replay, 3) / reps
    kv = b * mean_len * 2 * attn.hkv * attn.d * kc.element_size()
    return {"mean_seq_len": round(mean_len, 1), "attention_layer_ms": round(ms, 4),
            "attention_TBps": round(kv / (ms * 1e9), 2)}


def cuda_ms(fn, reps: int) -> float:
    """Mean ms of ``fn`` over ``reps`` back-to-back calls, timed with CUDA events."""
    fn()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    sync()
    return e0.elapsed_time(e1) / reps


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def make_llm(a, wl: str, path: str, dev: str, dtype: torch.dtype):
    from qworker import LLM
    kw = {"load_format": "dummy"} if wl != "W_cpu" else {}
    if a.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = a.max_num_batched_tokens
    return LLM(path, device=dev, dtype=str(dtype).removeprefix("torch."),
               max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len,
               enforce_eager=a.enforce_eager, **kw)


def bench_pairs(a, wl: str, path: str, reqs, dev: str, dtype: torch.dtype) -> dict:
    """ours and transformers' continuous batching, alternated ``a.pairs`` times in one
    process (the order flips every pair), so that a machine whose speed drifts (a shared
    VM) hits both sides alike; the figure is the median of the per-pair ratios."""
    llm, m = make_llm(a, wl, path, dev, dtype), hf_model(path, dtype, dev)
    warm = [(reqs[0][0][:16], 4)]
    run_ours(llm, warm)
    run_hf_cb(m, warm)
    pairs = []
    for i in range(a.pairs):
        sides = {}
        for side in (("ours", "hf_cb") if i % 2 == 0 else ("hf_cb", "ours")):
            toks, dt = run_ours(llm, reqs) if side == "ours" else run_hf_cb(m, reqs)
            sides[side] = round(toks / dt, 1)
        pairs.append({**sides, "ratio": round(sides["ours"] / sides["hf_cb"], 3)})
        print(f"{wl} pair {i}: {pairs[-1]}", flush=True)
    ratios = sorted(p["ratio"] for p in pairs)
    return {"pairs": pairs, "median_ratio": ratios[len(ratios) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workload", default="W_cpu",
                    help="one or more of W_cpu, W_nano, W_8b, comma-separated")
    ap.add_argument("--modes", default="naive,static,hf_cb,ours")
    ap.add_argument("--n", type=int, default=None, help="requests (default: the workload's)")
    ap.add_argument("--naive-n", type=int, default=None, help="requests for naive mode")
    ap.add_argument("--static-n", type=int, default=None, help="requests for static mode")
    ap.add_argument("--cb-n", type=int, default=None, help="requests for hf_cb mode")
    ap.add_argument("--bs", type=int, default=32, help="static batch size")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--sync-too", action="store_true",
                    help="also time ours and decode with asynchronous scheduling off (same "
                         "engine, same run), for a side-by-side ratio")
    ap.add_argument("--decode-batches", default="1,32,256")
    ap.add_argument("--decode-context", type=int, default=512)
    ap.add_argument("--decode-workload", default="W_8b", help="whose engine times decode")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds from start after which transformers' modes are skipped")
    ap.add_argument("--pairs", type=int, default=0,
                    help="also alternate ours and hf_cb this many times in one process and "
                         "report the median ratio (for machines whose speed drifts)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    t_start = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    modes = a.modes.split(",")
    workloads = a.workload.split(",")
    import transformers
    res: dict = {"device": torch.cuda.get_device_name() if dev == "cuda"
                 else f"cpu x{torch.get_num_threads()}", "torch": torch.__version__,
                 "transformers": transformers.__version__, "args": vars(a)}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        pass
    if "ceil" in modes and dev == "cuda":
        bw, tf = ceilings()
        res["copy_TBps"], res["bf16_TFLOPs"] = round(bw, 3), round(tf, 1)
        print(f"ceilings: copy {bw:.2f} TB/s, bf16 matmul {tf:.0f} TFLOP/s", flush=True)
    rows: list[tuple] = []

    def save() -> None:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)

    def record(wl: str, name: str, toks: int, dt: float, n_reqs: int) -> None:
        rows.append((wl, name, n_reqs, toks, dt, toks / dt))
        res.setdefault(wl, {})[f"{name}_tok_s"] = round(toks / dt, 1)
        res[wl][f"{name}_requests"] = n_reqs
        save()
        print(f"{wl:7s} {name:8s} {n_reqs:4d} req {toks:8d} tok {dt:8.2f} s "
              f"{toks / dt:10.1f} tok/s", flush=True)

    def workload(wl: str):
        if wl == "W_cpu":
            from qworker.model.hub import resolve_model
            path = str(resolve_model("smollm2-135m-instruct"))
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(path)
            reqs = [(tok.encode(p), 48) for p in W_CPU_PROMPTS]
        else:
            w = WORKLOADS[wl]
            path = make_checkpoint(w["shape"], dtype, with_weights=False)
            reqs = random_workload(a.n or w["n"], w["inp"], w["out"],
                                   SHAPES[w["shape"]]["vocab_size"])
        return path, reqs[: a.n] if a.n else reqs

    if "ours" in modes or "decode" in modes:
        for wl in workloads:
            path, reqs = workload(wl)
            t0 = time.perf_counter()
            llm = make_llm(a, wl, path, dev, dtype)
            runner = llm.engine.runner
            res.setdefault(wl, {})["engine_init_s"] = round(time.perf_counter() - t0, 1)
            res[wl]["kv_blocks"] = runner.num_kv_blocks
            res[wl]["memory"] = runner.memory
            print(f"{wl}: engine up in {res[wl]['engine_init_s']} s, {runner.num_kv_blocks} "
                  f"KV blocks, {runner.memory}", flush=True)
            eng = llm.engine
            # the engine's own setting, then (--sync-too) the same engine synchronous
            variants = [("", eng.async_scheduling)]
            if a.sync_too and eng.async_scheduling:
                variants.append(("_sync", False))
            if "ours" in modes:
                # Warm-up: the whole workload once, so that every Triton specialisation the
                # run needs is compiled before timing; then forget its cached prefixes.
                t0 = time.perf_counter()
                run_ours(llm, reqs if dev == "cuda" else [(reqs[0][0][:16], 4)])
                res[wl]["warmup_s"] = round(time.perf_counter() - t0, 1)
                for tag, on in variants:
                    eng.async_scheduling = on
                    eng.block_manager.reset_prefix_cache()
                    steps = count_steps(eng)
                    expected = sum(n for _, n in reqs)
                    toks, dt = run_ours(llm, reqs)
                    res[wl]["steps" + tag] = steps.close()
                    if toks != expected:
                        raise SystemExit(f"ours produced {toks} tokens, expected {expected}")
                    record(wl, "ours" + tag, toks, dt, len(reqs))
                res[wl]["preemptions"] = eng.scheduler.num_preemptions
            if "decode" in modes and wl == a.decode_workload:
                for tag, on in variants:
                    eng.async_scheduling = on
                    res[wl]["decode" + tag] = bench_decode(
                        eng, [int(b) for b in a.decode_batches.split(",")],
                        a.decode_context, res.get("copy_TBps"))
                    save()
            eng.async_scheduling = variants[0][1]
            del llm, runner, eng
            free_cuda()

    hf_modes = [m for m in modes if m in ("naive", "static", "hf_cb")]
    for wl in workloads if hf_modes else []:
        path, reqs = workload(wl)

        def in_time(mode: str, wl: str = wl) -> bool:
            if a.deadline and time.perf_counter() - t_start > a.deadline:
                print(f"{wl} {mode}: skipped, past the {a.deadline} s deadline", flush=True)
                res.setdefault(wl, {})[f"{mode}_skipped"] = "deadline"
                return False
            return True

        if not in_time("hf"):
            continue
        m = hf_model(path, dtype, dev)
        run_naive(m, [(reqs[0][0][:16], 4)], dev)                     # warm-up
        if "naive" in modes and in_time("naive"):
            sub = reqs[: a.naive_n or len(reqs)]
            record(wl, "naive", *run_naive(m, sub, dev), len(sub))
        if "hf_cb" in modes and in_time("hf_cb"):
            sub = reqs[: a.cb_n or len(reqs)]
            try:
                toks, dt = run_hf_cb(m, sub)
                record(wl, "hf_cb", toks, dt, len(sub))
            except Exception as e:  # record, don't hide
                res.setdefault(wl, {})["hf_cb_error"] = repr(e)[:300]
                print("hf_cb failed:", repr(e)[:300], file=sys.stderr)
        if "static" in modes and in_time("static"):
            sub = reqs[: a.static_n or len(reqs)]
            record(wl, "static", *run_static(m, sub, dev, a.bs), len(sub))
        del m
        free_cuda()

    for wl in workloads if a.pairs else []:
        path, reqs = workload(wl)
        res.setdefault(wl, {})["alternating"] = bench_pairs(a, wl, path, reqs, dev, dtype)
        save()
        free_cuda()

    print(f"\non {res['device']} (torch {res['torch']}, transformers {res['transformers']}"
          f"{', triton ' + res['triton'] if 'triton' in res else ''})")
    if "copy_TBps" in res:
        print(f"ceilings: copy {res['copy_TBps']} TB/s, bf16 {res['bf16_TFLOPs']} TFLOP/s")
    print(f"{'workload':8s} {'mode':8s} {'requests':>8s} {'tokens':>8s} {'seconds':>8s} "
          f"{'tok/s':>10s}")
    for wl, name, n, toks, dt, rate in rows:
        print(f"{wl:8s} {name:8s} {n:8d} {toks:8d} {dt:8.2f} {rate:10.1f}")
    for wl in workloads:
        r = res.get(wl, {})
        for base in ("naive", "static", "hf_cb"):
            if "ours_tok_s" in r and f"{base}_tok_s" in r:
                r[f"ours_vs_{base}"] = round(r["ours_tok_s"] / r[f"{base}_tok_s"], 2)
                print(f"{wl} ours / {base}: {r[f'ours_vs_{base}']:.2f}x")
        if "ours_sync_tok_s" in r:
            r["async_vs_sync"] = round(r["ours_tok_s"] / r["ours_sync_tok_s"], 3)
            print(f"{wl} ours async / sync scheduling: {r['async_vs_sync']:.3f}x")
        for tag in ("", "_sync"):
            for d in r.get("decode" + tag, []):
                print(f"{wl} decode{tag} batch {d['batch']:3d} ctx {d['context']}: step "
                      f"{d['wall']:.2f} ms (graph replay {d.get('graph_replay', float('nan')):.2f},"
                      f" gpu {d['gpu']:.2f}, host {d['host']:.2f}, wait {d.get('wait', 0):.2f}; "
                      f"schedule {d.get('schedule', 0):.2f}, execute {d.get('execute', 0):.2f}, "
                      f"sampling {d.get('launch_rest', 0):.2f}, resolve "
                      f"{d.get('resolve', 0):.2f}); floor {d.get('floor', float('nan')):.2f} ms "
                      f"({d.get('step_vs_floor', 0):.0%}); one layer's attention "
                      f"{d.get('attention_layer_ms', float('nan')):.3f} ms at "
                      f"{d.get('attention_TBps', float('nan'))} TB/s over mean context "
                      f"{d.get('mean_seq_len')}")
        if "alternating" in r:
            print(f"{wl} ours / hf_cb, median of {a.pairs} alternating pairs: "
                  f"{r['alternating']['median_ratio']:.2f}x")
        if "steps" in r:
            print(f"{wl} timed run: {r['steps']}, warm-up {r.get('warmup_s')} s, init "
                  f"{r.get('engine_init_s')} s, preemptions {r.get('preemptions')}")
    save()


if __name__ == "__main__":
    main()
