"""The worker's per-step publishing cost, on the host: what one engine step of N running
jobs costs the worker process in Python (the GIL it takes from the loop that feeds the
GPU), against a real redis-server.

Per step: N ``ActiveJob.step`` ops (one token each, as the loop makes them), the metrics'
``step_tokens``, and ``Publisher._send`` of those ops (event encoding, one fenced PUBLISH
script call per batch, reply handling). Reports, per step, the wall time and the process
CPU time of each part. Starts its own redis-server on a free port.

  python scripts/bench_publisher.py --jobs 256 --steps 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_queue import start_redis  # noqa: E402

from qworker.metrics import WorkerMetrics  # noqa: E402
from qworker.worker.connection import RedisSettings  # noqa: E402
from qworker.worker.intake import Admission  # noqa: E402
from qworker.worker.jobs import ActiveJob  # noqa: E402
from qworker.worker.keys import Keys  # noqa: E402
from qworker.worker.publisher import Holdings, Publisher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
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
        wall = {"loop": 0.0, "publish": 0.0}
        cpu = dict(wall)
        for step in range(a.steps + 5):             # the first 5 warm up (script load)
            t0, c0 = time.perf_counter(), time.process_time()
            ops = [job.step([1000 + step], " tok", False, None) for job in jobs]
            metrics.step_tokens([(job.id, 1) for job in jobs])
            t1, c1 = time.perf_counter(), time.process_time()
            pub._send(ops)
            t2, c2 = time.perf_counter(), time.process_time()
            if step >= 5:
                wall["loop"] += t1 - t0
                wall["publish"] += t2 - t1
                cpu["loop"] += c1 - c0
                cpu["publish"] += c2 - c1
        if lost:
            raise SystemExit(f"{len(lost)} entries were fenced off: the bench is broken")
        events = r.xlen(keys.log(jobs[0].id))
        if events != a.steps + 5:
            raise SystemExit(f"job 0's replay log holds {events} events, expected {a.steps + 5}")
        ms = {k: round(v / a.steps * 1e3, 3) for k, v in wall.items()}
        cpu_ms = {k: round(v / a.steps * 1e3, 3) for k, v in cpu.items()}
        print(f"per step of {a.jobs} jobs (one token each): per-job ops + metrics "
              f"{ms['loop']} ms (cpu {cpu_ms['loop']}), publish {ms['publish']} ms wall, "
              f"{cpu_ms['publish']} ms of it Python CPU")
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
