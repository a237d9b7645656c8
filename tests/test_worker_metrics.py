"""A real ``qworker worker`` process with ``--metrics-port``: /metrics carries the figures
of the jobs it ran, /healthz answers 200 while it lives, and its log has exactly one
``job finished`` line per job, each with the job id."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections import Counter

from prometheus_client.parser import text_string_to_metric_families
from redis_support import WorkerProc, free_port, wait_for, wait_ready

from qworker.worker.client import Client
from qworker.worker.protocol import pack


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> dict[str, float]:
    status, text = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def summary_lines(output: str) -> list[dict]:
    lines = [json.loads(x) for x in output.splitlines() if x.startswith("{")]
    return [x for x in lines if x.get("event") == "job finished"]


def test_worker_serves_its_real_figures_and_logs_one_summary_per_job(server, tiny_checkpoint):
    port, model = free_port(), str(tiny_checkpoint("llama"))
    w = WorkerProc(model, server.url, "metrics-w",
                   extra=["--metrics-port", str(port), "--metrics-host", "127.0.0.1"])
    c = Client(server.url)
    try:
        r = server.client()
        wait_ready(r, ["metrics-w"])
        status, body = http_get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and json.loads(body)["worker"] == "metrics-w"

        done = [c.submit(prompt=f"metrics {n}", max_tokens=n, temperature=0.0, ignore_eos=True)
                for n in (1, 5, 12)]
        cancelled = c.submit(prompt="cancel me", max_tokens=400, ignore_eos=True)
        r.xadd(c.keys.jobs, {"job": pack({"v": 1, "id": "bad-params", "prompt": "x",
                                          "params": {"top_p": 7}})})
        wait_for(lambda: r.xlen(c.keys.log(cancelled)) >= 2, 60, what="the job to start")
        c.cancel(cancelled)
        events = {j: list(c.stream(j, timeout=60)) for j in [*done, cancelled, "bad-params"]}
        assert [events[j][-1].finish_reason for j in events] == \
            ["length"] * 3 + ["cancelled", "error"]
        streamed = sum(len(e.token_ids) for evs in events.values() for e in evs)
        prompt_tokens = sum(evs[-1].usage["prompt_tokens"] for evs in events.values())

        s = scrape(port)
        assert s["qworker_time_to_first_token_seconds_count"] == 4      # the jobs that ran
        assert s["qworker_queue_time_seconds_count"] == 4
        assert s["qworker_output_tokens_total"] == streamed
        assert s["qworker_prompt_tokens_total"] == prompt_tokens
        assert s["qworker_jobs_finished_total{reason=length}"] == 3
        assert s["qworker_jobs_finished_total{reason=cancelled}"] == 1
        assert s["qworker_jobs_finished_total{reason=error}"] == 1
        assert s["qworker_dead_letters_total{code=invalid_params}"] == 1
        assert s["qworker_job_duration_seconds_count"] == 4
        assert s[f"qworker_worker_info{{model={model},worker=metrics-w}}"] == 1
        assert s["qworker_kv_cache_usage_ratio"] >= 0
        # the queue gauges come from the feeder's maintenance tick
        wait_for(lambda: (lambda m: m["qworker_stream_length"] == 0
                          and m["qworker_pending_jobs"] == 0
                          and m["qworker_running_requests"] == 0)(scrape(port)), 10,
                 interval=0.2, what="the queue gauges to settle")
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200

        lines = summary_lines(w.output())
        assert Counter(x["job_id"] for x in lines) == Counter([*done, cancelled, "bad-params"])
        by_id = {x["job_id"]: x for x in lines}
        assert [by_id[j]["output_tokens"] for j in done] == [1, 5, 12]
        assert all("ttft_s" in by_id[j] and by_id[j]["level"] == "info" for j in done)
        assert by_id[cancelled]["finish_reason"] == "cancelled"
        bad = by_id["bad-params"]
        assert bad["level"] == "warning" and bad["error_code"] == "invalid_params"
        ids = {*done, cancelled, "bad-params"}
        for line in (x for x in w.output().splitlines() if x.startswith("{")):
            named = {j for j in ids if j in line}        # a line about a job carries its id
            assert not named or json.loads(line).get("job_id") in named, line
        w.signal(signal.SIGTERM)
        assert w.wait(30) == 0
    finally:
        c.close()
        w.stop()
