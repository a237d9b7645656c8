"""The whole path through Redis vs the in-process engine, and serving latency.

1. Throughput: the same workload (all requests at once, each generating exactly its own
   length) through the in-process ``Engine`` and through Redis (``qworker worker``
   subprocess + XADD / pub/sub), output tokens per wall second from first submission to
   last completion; the ratio redis / engine is the figure (target >= 0.95). Every run
   gets its own first prompt token, so no run is served from an earlier one's prefix cache.
2. Serving: Poisson arrivals at each ``--rates`` (requests/s) through Redis; TTFT
   (submission to first streamed token), TPOT ((end-to-end - TTFT) / (tokens - 1)) and
   ITL (gaps between streamed events), p50 / p99, and goodput at --slo-ttft-ms and
   --slo-tpot-ms (as vLLM's serving benchmark defines them).

Workloads: W_cpu (SmolLM2-135M-Instruct, real weights, the 16 test prompts, 48 tokens
each), W_nano / W_8b (real shapes, random weights, random token prompts, as in
bench_offline.py) or ``random`` (random token prompts on ``--model``). Model load and
warm-up are excluded. Starts its own redis-server on a free port unless --redis-url is given.

  python scripts/bench_queue.py --workload W_cpu --rates 1,2,4 --json out/bench_queue.json
  python scripts/bench_queue.py --workload W_nano --device cuda --max-num-seqs 256 --rates 8,16,32
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import redis
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offline import (  # noqa: E402
    SHAPES,
    W_CPU_PROMPTS,
    WORKLOADS,
    make_checkpoint,
    random_workload,
)

from qworker.latency import RequestTiming, summarize  # noqa: E402


def pct(dist: dict, q: str) -> float | None:
    v = dist.get(q)
    return None if v is None else round(v, 2)


def start_redis() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--dir", tempfile.mkdtemp()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def engine_args(a) -> list[str]:
    args = ["--device", a.device, "--dtype", a.dtype, "--max-num-seqs", str(a.max_num_seqs),
            "--load-format", a.load_format,
            # the budget is a share of the whole card, the engine's part included
            "--gpu-memory-utilization", str(min(0.95, 2 * a.gpu_memory_utilization + 0.05))]
    return args + (["--num-kv-blocks", str(a.num_kv_blocks)] if a.num_kv_blocks else [])


def make_engine(a):
    """The in-process baseline: ``go(reqs)`` adds every request and steps until done."""
    from qworker import EngineConfig, SamplingParams
    from qworker.engine.engine import Engine

    eng = Engine(a.model, EngineConfig(max_num_seqs=a.max_num_seqs, num_kv_blocks=a.num_kv_blocks,
                                       load_format=a.load_format,
                                       gpu_memory_utilization=a.gpu_memory_utilization),
                 device=a.device, dtype=a.dtype)
    runs = [0]

    def go(batch) -> tuple[int, float]:
        runs[0] += 1
        t = time.perf_counter()
        for i, (ids, n) in enumerate(batch):
            eng.add_request(f"r{runs[0]}-{i}", ids, SamplingParams(max_tokens=n, temperature=0.0,
                                                                   ignore_eos=True))
        toks = 0
        while eng.has_unfinished():
            toks += sum(len(o.new_token_ids) for o in eng.step())
        return toks, time.perf_counter() - t

    go([([1, 2, 3, 4], 4)])                                       # warm-up
    go.engine = eng
    return go


class Listener(threading.Thread):
    """Records the arrival of every event of every job (one PSUBSCRIBE, set up first)."""

    def __init__(self, r: redis.Redis, prefix: str):
        super().__init__(daemon=True)
        self.ps = r.pubsub(ignore_subscribe_messages=True)
        self.ps.psubscribe(f"{prefix}:out:*")
        self.events: dict[str, list[tuple[float, int, bool]]] = {}
        self.done: set[str] = set()
        self.cond = threading.Condition()

    def run(self) -> None:
        while True:
            try:
                m = self.ps.get_message(timeout=1.0)
            except redis.ConnectionError:    # the bench is over and Redis is gone
                return
            if not m:
                continue
            now = time.perf_counter()
            ev = msgpack.unpackb(m["data"])
            with self.cond:
                self.events.setdefault(ev["id"], []).append((now, len(ev["token_ids"]),
                                                            ev["finished"]))
                if ev["finished"]:
                    self.done.add(ev["id"])
                    self.cond.notify_all()

    def wait(self, ids: set[str], bar: tqdm | None, timeout: float) -> None:
        end = time.monotonic() + timeout
        with self.cond:
            while not ids <= self.done:
                if time.monotonic() > end:
                    raise SystemExit(f"timed out: {len(ids - self.done)} jobs unfinished")
                self.cond.wait(0.5)
                if bar is not None:
                    bar.n = len(ids & self.done)
                    bar.refresh()


def submit(r: redis.Redis, prefix: str, job_id: str, ids: list[int], n: int) -> None:
    job = {"v": 1, "id": job_id, "prompt_token_ids": ids, "submitted_ms": int(time.time() * 1000),
           "params": {"max_tokens": n, "temperature": 0.0, "ignore_eos": True}}
    r.xadd(f"{prefix}:jobs", {"job": msgpack.packb(job)})


def salted(reqs: list[tuple[list[int], int]], run: int) -> list[tuple[list[int], int]]:
    """The workload with a first token of its own per run: no run reuses another's
    prefix-cache entries (each side keeps its cache across runs), so every run pays for
    all of its prefill."""
    return [([3 + run % 1000, *ids[1:]], n) for ids, n in reqs]


def run_redis(r, lis, prefix, reqs, tag, timeout) -> tuple[int, float]:
    ids = {f"{tag}-{i}" for i in range(len(reqs))}
    t = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for i, (p, n) in enumerate(reqs):
        job = {"v": 1, "id": f"{tag}-{i}", "prompt_token_ids": p,
               "params": {"max_tokens": n, "temperature": 0.0, "ignore_eos": True}}
        pipe.xadd(f"{prefix}:jobs", {"job": msgpack.packb(job)})
    pipe.execute()
    with tqdm(total=len(ids), desc=f"redis {tag}", leave=False) as bar:
        lis.wait(ids, bar, timeout)
    dt = time.perf_counter() - t
    return sum(n for j in ids for _, n, _ in lis.events[j]), dt


def run_poisson(r, lis, prefix, reqs, rate, a) -> dict:
    rng = random.Random(1)
    sent: dict[str, float] = {}
    tag = f"p{rate}"
    t0 = time.perf_counter()
    with tqdm(total=len(reqs), desc=f"poisson {rate}/s", leave=False) as bar:
        for i, (p, n) in enumerate(reqs):
            jid = f"{tag}-{i}"
            sent[jid] = time.perf_counter()
            submit(r, prefix, jid, p, n)
            bar.update(1)
            time.sleep(rng.expovariate(rate))
        lis.wait(set(sent), None, a.timeout)
    dur = time.perf_counter() - t0
    reqs = [RequestTiming(t_sub, [(t, n) for t, n, _ in lis.events[jid] if n > 0])
            for jid, t_sub in sent.items()]
    s = summarize(reqs, dur, (50, 99), a.slo_ttft_ms, a.slo_tpot_ms)   # qworker.latency
    return {"rate": rate, "requests": len(sent), "duration_s": round(dur, 2),
            **{k: {"p50": pct(s[k], "p50"), "p99": pct(s[k], "p99")}
               for k in ("ttft_ms", "tpot_ms", "itl_ms")},
            "goodput_rps": round(s["goodput_rps"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workload", default="W_cpu", choices=["W_cpu", *WORKLOADS, "random"])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=None, help="requests (random: default 64)")
    ap.add_argument("--input-len", default="32,256", help="random: uniform lo,hi")
    ap.add_argument("--output-len", default="16,128", help="random: uniform lo,hi")
    ap.add_argument("--rates", default="1,2,4", help="Poisson arrival rates (req/s)")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                    help="each side's share: the engine and the worker share one GPU")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--slo-ttft-ms", type=float, default=200.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=50.0)
    ap.add_argument("--repeat", type=int, default=3, help="engine/redis throughput pairs")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--json", default="")
    ap.add_argument("--profile-worker", default="",
                    help="write a cProfile of the worker's engine loop to this file "
                         "(slows the worker: for where the time goes, not for the ratio)")
    a = ap.parse_args()
    a.load_format = "auto"
    if a.workload in WORKLOADS:          # real shapes, random weights, random token prompts
        w = WORKLOADS[a.workload]
        a.model, a.load_format = make_checkpoint(w["shape"], None, with_weights=False), "dummy"
        reqs = random_workload(a.n or w["n"], w["inp"], w["out"],
                               SHAPES[w["shape"]]["vocab_size"])
    else:
        from transformers import AutoTokenizer

        from qworker.model.hub import resolve_model
        a.model = str(resolve_model(a.model))
        tok = AutoTokenizer.from_pretrained(a.model)
        if a.workload == "W_cpu":
            reqs = [(tok.encode(p), 48) for p in W_CPU_PROMPTS][: a.n]
        else:
            lo_hi = [tuple(int(x) for x in s.split(",")) for s in (a.input_len, a.output_len)]
            reqs = random_workload(a.n or 64, lo_hi[0], lo_hi[1], len(tok))

    res: dict = {"workload": a.workload, "model": a.model, "requests": len(reqs),
                 "device": a.device, "max_num_seqs": a.max_num_seqs, "pairs": []}
    engine = make_engine(a)
    server, url = (None, a.redis_url) if a.redis_url else start_redis()
    prefix = f"bench{os.getpid()}"
    # --profile-worker: the worker's main thread (the engine loop) under cProfile
    prof = ["-m", "cProfile", "-o", a.profile_worker] if a.profile_worker else []
    worker = subprocess.Popen([sys.executable, *prof, "-m", "qworker.cli", "worker",
                               "--model", a.model,
                               "--redis-url", url, "--prefix", prefix, "--name", "bench",
                               "--log-level", "warning", *engine_args(a)])
    try:
        r = redis.Redis.from_url(url)
        lis = Listener(r, prefix)
        lis.start()
        run_redis(r, lis, prefix, [(reqs[0][0][:16], 4)], "warmup", 600)   # worker is up
        engine(salted(reqs, 0))         # warm-up with the workload itself: compilation,
        run_redis(r, lis, prefix, salted(reqs, 0), "warmup-full", a.timeout)   # graphs...
        beat = f"{prefix}:worker:bench"         # the worker's heartbeat hash (keys.py)

        def worker_steps() -> tuple[int, float]:
            """The worker engine's steps and seconds waited on the GPU, from its heartbeat."""
            time.sleep(1.5)                     # a heartbeat tick after the run ended
            h = r.hmget(beat, ["steps", "gpu_wait_s"])
            return int(h[0] or 0), float(h[1] or 0.0)

        steps_r, wait_r = worker_steps()
        for k in range(a.repeat):       # alternate, so load from elsewhere hits both sides
            eng = engine.engine
            steps_e, wait_e = eng.num_steps, eng.wait_seconds
            toks_e, dt_e = engine(salted(reqs, 1 + 2 * k))
            steps_e, wait_e = eng.num_steps - steps_e, eng.wait_seconds - wait_e
            toks_r, dt_r = run_redis(r, lis, prefix, salted(reqs, 2 + 2 * k), f"tput{k}",
                                     a.timeout)
            (steps_r, wait_now), n_r = worker_steps(), steps_r
            wait_r, waited_r = wait_now, wait_now - wait_r
            if toks_r != toks_e:
                raise SystemExit(f"redis produced {toks_r} tokens, the engine {toks_e}")
            pair = {"engine_tok_s": round(toks_e / dt_e, 1), "redis_tok_s": round(toks_r / dt_r, 1),
                    "ratio": round(dt_e / dt_r, 3), "engine_steps": steps_e,
                    "redis_steps": steps_r - n_r,
                    "engine_ms_per_step": round(dt_e / max(1, steps_e) * 1e3, 2),
                    "redis_ms_per_step": round(dt_r / max(1, steps_r - n_r) * 1e3, 2),
                    # share of the wall time the loop waited on the GPU (0: host-bound)
                    "engine_gpu_wait": round(wait_e / dt_e, 3),
                    "redis_gpu_wait": round(waited_r / dt_r, 3)}
            res["pairs"].append(pair)
            print(f"run {k}: engine {toks_e} tok {dt_e:.2f} s ({pair['engine_tok_s']} tok/s, "
                  f"{steps_e} steps), redis {dt_r:.2f} s ({pair['redis_tok_s']} tok/s, "
                  f"{pair['redis_steps']} steps), ratio {pair['ratio']}", flush=True)
        for key in ("engine_tok_s", "redis_tok_s", "ratio"):
            res[f"median_{key}"] = statistics.median(p[key] for p in res["pairs"])
        print(f"median ratio redis / engine: {res['median_ratio']}", flush=True)
        res["serving"] = []
        for rate in [float(x) for x in a.rates.split(",") if x]:
            row = run_poisson(r, lis, prefix, salted(reqs, 100 + int(rate * 1000)), rate, a)
            res["serving"].append(row)
            print(f"rate {rate:5.2f}/s  TTFT p50/p99 {row['ttft_ms']['p50']}/{row['ttft_ms']['p99']}"
                  f" ms  TPOT {row['tpot_ms']['p50']}/{row['tpot_ms']['p99']} ms  ITL "
                  f"{row['itl_ms']['p50']}/{row['itl_ms']['p99']} ms  goodput "
                  f"{row['goodput_rps']} req/s", flush=True)
    finally:
        worker.terminate()
        worker.wait(60)
        if server is not None:
            server.kill()
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
