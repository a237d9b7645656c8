"""The worker's per-step publishing cost, on the host: what one engine step of N running
jobs costs the worker process in Python (the GIL it takes from the loop that feeds the
GPU), against a real redis-server.

Per step: N jobs' events (one token each, as the loop makes them), the metrics'
``step_tokens``, and ``Publisher._send`` of those events (one fenced PUBLISH script call,
reply handling). Two ways, alternated step by step in one run:
- ``rows``: what the loop does (``ActiveJob.delta``): a row per job, one deltas op per step,
  the event maps built by the PUBLISH script inside redis-server;
- ``maps``: the same bookkeeping, then an event map and an ``Op`` per job, msgpack-encoded
  by the publisher thread (the path of final events, and of every event before the
  script built deltas).
Reports, per step, the wall time and the process CPU time of each part, and the ratio.
``--breakdown`` then times copies of the PUBLISH script with one command left out each
(the fence, XADD, PUBLISH, EXPIRE), to show what an event costs redis-server.
Starts its own redis-server on a free port.

  python scripts/bench_publisher.py --jobs 256 --steps 200
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import msgpack
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_queue import start_redis  # noqa: E402

from qworker.metrics import WorkerMetrics  # noqa: E402
from qworker.worker.connection import RedisSettings  # noqa: E402
from qworker.worker.intake import Admission  # noqa: E402
from qworker.worker.jobs import ActiveJob  # noqa: E402
from qworker.worker.keys import Keys  # noqa: E402
from qworker.worker.protocol import Event, log_entry_id  # noqa: E402
from qworker.worker.publisher import Holdings, Op, Publisher  # noqa: E402
from qworker.worker.scripts import PUBLISH  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the script with each command left out")
    a = ap.parse_args()
    proc, url = start_redis()
    try:
        keys, consumer = Keys(), "bench"
        r = redis.Redis.from_url(url)
        r.xgroup_create(keys.jobs, keys.group, id="0", mkstream=True)
        entries = [r.xadd(keys.jobs, {"job": b"x"}).decode() for _ in range(a.jobs)]
        r.xreadgroup(keys.group, consumer, {keys.jobs: ">"}, count=a.jobs)   # ours now
        holdings = Holdings()
        jobs = []
        for i, entry in enumerate(entries):
            holdings.add(entry, f"job-{i}")
            jobs.append(ActiveJob.from_admission(Admission(entry, b"", job_id=f"job-{i}",
                                                           prompt_token_ids=[1] * 500)))
        metrics = WorkerMetrics()
        for job in jobs:
            metrics.job_started(job.id)
        lost: list[str] = []
        pub = Publisher(RedisSettings.from_url(url), keys, consumer,
                        holdings, lost.append, ttl_s=600)
        gc.collect()      # as the worker does before its loop: what lives now is frozen
        gc.freeze()
        parts = [f"{way}_{part}" for way in ("rows", "maps") for part in ("loop", "publish")]
        wall = dict.fromkeys(parts, 0.0)
        cpu = dict(wall)
        lua = {"rows": 0, "maps": 0}        # redis-server's own time in the script (us)

        def lua_usec() -> int:
            return r.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0)
        for step in range(2 * (a.steps + 5)):          # the first 5 of each warm up
            way = ("rows", "maps")[step % 2]
            t0, c0 = time.perf_counter(), time.process_time()
            if way == "rows":
                ops = [Op("deltas", "", rows=[job.delta([1000 + step], " tok") for job in jobs])]
            else:            # the same bookkeeping, then a map and an Op per job
                ops = []
                for job in jobs:
                    entry, job_id, seq, ids, text = job.delta([1000 + step], " tok")
                    ops.append(Op("publish", entry, job_id, log_entry_id(seq),
                                  Event(job_id, seq, ids, text).to_map()))
            metrics.step_tokens([(job.id, 1) for job in jobs])
            u1 = lua_usec()
            t1, c1 = time.perf_counter(), time.process_time()
            pub._send(ops)
            t2, c2 = time.perf_counter(), time.process_time()
            if step >= 10:
                lua[way] += lua_usec() - u1
                wall[f"{way}_loop"] += t1 - t0
                wall[f"{way}_publish"] += t2 - t1
                cpu[f"{way}_loop"] += c1 - c0
                cpu[f"{way}_publish"] += c2 - c1
        if lost:
            raise SystemExit(f"{len(lost)} entries were fenced off: the bench is broken")
        events = r.xlen(keys.log(jobs[0].id))
        if events != 2 * (a.steps + 5):
            raise SystemExit(f"job 0's replay log holds {events} events, "
                             f"expected {2 * (a.steps + 5)}")
        ms = {k: v / a.steps * 1e3 for k, v in wall.items()}
        cpu_ms = {k: v / a.steps * 1e3 for k, v in cpu.items()}
        print(f"per step of {a.jobs} jobs (one token each), ms | loop: ops + metrics (cpu) | "
              "publish: wall, Python cpu | loop + publish cpu | redis-server in the script")
        for way in ("maps", "rows"):
            total = cpu_ms[f"{way}_loop"] + cpu_ms[f"{way}_publish"]
            print(f"{way:5s} | {cpu_ms[f'{way}_loop']:.3f} | {ms[f'{way}_publish']:.3f}, "
                  f"{cpu_ms[f'{way}_publish']:.3f} | {total:.3f} | {lua[way] / a.steps / 1e3:.3f}")
        ratio = ((cpu_ms["maps_loop"] + cpu_ms["maps_publish"])
                 / (cpu_ms["rows_loop"] + cpu_ms["rows_publish"]))
        print(f"worker-process CPU per step, maps / rows: {ratio:.2f}x")
        if a.breakdown:
            script_breakdown(r, keys, consumer, entries, a.steps)
    finally:
        proc.terminate()


# the PUBLISH script with one command left out (the Lua it replaces -> a no-op)
LEFT_OUT = {"fence": ("if not owned(jobs, group, entry, consumer) then", "if false then"),
            "XADD": ("local added = redis.pcall('XADD', log, logid, 'event', ev)",
                     "local added = 1"),
            "PUBLISH": ("redis.call('PUBLISH', prefix .. ':out:' .. id, ev)", ""),
            "EXPIRE": ("redis.call('EXPIRE', log, ttl)", "")}


def script_breakdown(r: redis.Redis, keys: Keys, consumer: str, entries: list[str],
                     steps: int) -> None:
    """redis-server's time per call of the PUBLISH script on one step of deltas, whole and
    with each command left out in turn (alternated call by call; each variant writes its
    own jobs' logs)."""
    variants = {"whole": PUBLISH}
    for name, (lua, instead) in LEFT_OUT.items():
        if lua not in PUBLISH:
            raise SystemExit(f"the PUBLISH script no longer holds {lua!r}: update LEFT_OUT")
        variants[name] = PUBLISH.replace(lua, instead)
    shas = {k: r.script_load(v) for k, v in variants.items()}
    usec = dict.fromkeys(variants, 0)
    for step in range(steps + 5):
        for name, sha in shas.items():
            rows = [(e, f"{name}-{i}", step, [1000 + step], " tok") for i, e in enumerate(entries)]
            before = r.info("commandstats")["cmdstat_evalsha"]["usec"]
            r.evalsha(sha, 0, keys.prefix, keys.group, consumer, 600,
                      msgpack.packb(rows, use_bin_type=False))
            if step >= 5:
                usec[name] += r.info("commandstats")["cmdstat_evalsha"]["usec"] - before
    whole = usec["whole"] / steps / 1e3
    print(f"PUBLISH script, one call of {len(entries)} deltas: {whole:.3f} ms in redis-server")
    for name in LEFT_OUT:
        saved = whole - usec[name] / steps / 1e3
        print(f"  {name:8s} {saved:.3f} ms ({saved / whole:.0%})")


if __name__ == "__main__":
    main()
