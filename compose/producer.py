"""Example producer: enqueue a few prompts and print their tokens as they stream.

Only redis-py and msgpack, no qworker import: this is wire protocol v1 as any language
with a Redis client and msgpack speaks it (docs/design.md, "Wire protocol v1").

    QWORKER_REDIS_URL=redis://qworker-producer:PASSWORD@127.0.0.1:6379/0 python producer.py

It needs only the producer role's rights: XADD the jobs stream, SUBSCRIBE ``out:{id}``,
XRANGE ``log:{id}``, GET ``result:{id}``.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

import msgpack
import redis

URL = os.environ.get("QWORKER_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("QWORKER_PREFIX", "qworker")
TIMEOUT_S = float(os.environ.get("QWORKER_DEMO_TIMEOUT", "900"))  # first start loads the model
PROMPTS = [
    "Write a haiku about a message queue.",
    "In one sentence, what is continuous batching?",
    "Name three colours of the sea.",
]


def submit(r: redis.Redis, prompt: str) -> str:
    """XADD one job map; the id is ours, so we can subscribe before it even starts."""
    job_id = uuid.uuid4().hex
    job = {"v": 1, "id": job_id, "messages": [{"role": "user", "content": prompt}],
           "params": {"max_tokens": 64, "temperature": 0.7, "seed": 1},
           "submitted_ms": int(time.time() * 1000)}
    r.xadd(f"{PREFIX}:jobs", {"job": msgpack.packb(job, use_bin_type=True)})
    return job_id


def stream(r: redis.Redis, job_id: str, deadline: float):
    """Yield the job's events in seq order: subscribe to the live channel first, then
    read the replay log, and fill any gap from the log (replay entry id = 0-(seq+1))."""
    ps = r.pubsub(ignore_subscribe_messages=True)
    ps.subscribe(f"{PREFIX}:out:{job_id}")
    next_seq = 0
    try:
        while time.monotonic() < deadline:
            for _, fields in r.xrange(f"{PREFIX}:log:{job_id}", min=f"0-{next_seq + 1}"):
                ev = msgpack.unpackb(fields[b"event"], raw=False)
                if ev["seq"] == next_seq:
                    next_seq += 1
                    yield ev
                    if ev["finished"]:
                        return
            msg = ps.get_message(timeout=1.0)
            while msg is not None:
                ev = msgpack.unpackb(msg["data"], raw=False)
                if ev["seq"] != next_seq:       # early or late: the log has it in order
                    break
                next_seq += 1
                yield ev
                if ev["finished"]:
                    return
                msg = ps.get_message(timeout=1.0)
        raise TimeoutError(f"job {job_id} did not finish within {TIMEOUT_S:g} s")
    finally:
        ps.close()


def main() -> int:
    r = redis.Redis.from_url(URL)
    ids = [submit(r, p) for p in PROMPTS]   # all at once: the worker batches them
    deadline = time.monotonic() + TIMEOUT_S
    for prompt, job_id in zip(PROMPTS, ids, strict=True):
        print(f"\n>>> {prompt}\n", flush=True)
        for ev in stream(r, job_id, deadline):
            print(ev["text"], end="", flush=True)
            if ev["finished"]:
                timings = ev.get("timings") or {}
                print(f"\n[{ev['finish_reason']}; {timings}]", flush=True)
                if ev.get("error"):
                    print(f"error: {ev['error']}", file=sys.stderr)
        raw = r.get(f"{PREFIX}:result:{job_id}")   # the stored result, written once
        if raw is not None:
            result = msgpack.unpackb(raw, raw=False)
            print(f"[result: {len(result['token_ids'])} tokens, usage {result['usage']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
