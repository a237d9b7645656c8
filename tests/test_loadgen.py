"""``qworker bench`` against a real worker (tiny checkpoint) and a real redis-server:
counts, percentiles, errors, --json and --plot; and the statistics of qworker.latency."""

from __future__ import annotations

import json
import random
import sys

import pytest
from click.testing import CliRunner
from redis_support import InProcessWorker

from qworker.cli import main
from qworker.config import EngineConfig
from qworker.latency import (
    RequestTiming,
    bin_seconds,
    percentile,
    summarize,
    throughput_series,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pool(tiny_checkpoint, server):
    from qworker.engine.engine import Engine

    engine = Engine(str(tiny_checkpoint("llama")), EngineConfig(max_num_seqs=16,
                    num_kv_blocks=512), device="cpu", dtype="float32")
    w = InProcessWorker(engine, server.url, "w-bench")
    yield server.url
    w.stop()


def bench(url: str, *args: str):
    return CliRunner().invoke(main, ["bench", "--redis-url", url, "--vocab-size", "49152",
                                     "--no-progress", *args], catch_exceptions=False)


def test_bench_at_a_concurrency_reports_counts_percentiles_json_and_a_png(pool, tmp_path):
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    res = bench(pool, "-n", "12", "--concurrency", "4", "--input-len", "4,12",
                "--output-len", "6", "--json", str(js), "--plot", str(png))
    assert res.exit_code == 0, res.output
    assert "Successful requests:                    12" in res.output
    assert "P99 TTFT (ms):" in res.output and "P50 ITL (ms):" in res.output
    doc = json.loads(js.read_text())
    s, reqs = doc["summary"], doc["requests"]
    assert (s["completed"], s["failed"], s["errors"]) == (12, 0, {})
    assert s["total_output_tokens"] == 12 * 6                  # ignore_eos: exactly max_tokens
    assert all(r["output_tokens"] == 6 and r["finish_reason"] == "length" for r in reqs)
    assert 12 * 4 <= s["total_input_tokens"] <= 12 * 12
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        d = s[key]
        assert 0 < d["p50"] <= d["p99"] and d["mean"] > 0, (key, d)
    assert all(r["ttft_ms"] <= r["e2el_ms"] for r in reqs)
    assert s["e2el_ms"]["p99"] <= s["duration_s"] * 1000
    assert s["request_throughput"] == pytest.approx(12 / s["duration_s"])
    assert s["output_throughput"] == pytest.approx(72 / s["duration_s"])
    bin_s = bin_seconds(s["duration_s"])
    assert sum(n for _, n in doc["throughput_series"]) * bin_s == pytest.approx(72)
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_bench_at_a_poisson_rate_spreads_the_arrivals(pool, tmp_path):
    js = tmp_path / "rate.json"
    res = bench(pool, "-n", "8", "--rate", "20", "--input-len", "8", "--output-len", "3",
                "--json", str(js))
    assert res.exit_code == 0, res.output
    assert "Poisson 20 req/s" in res.output
    doc = json.loads(js.read_text())
    sent = [r["sent_s"] for r in doc["requests"]]
    assert sent == sorted(sent) and sent[0] < 0.05 and sent[-1] > 0.05
    assert doc["summary"]["completed"] == 8
    assert doc["summary"]["total_input_tokens"] == 8 * 8


def test_bench_counts_failed_jobs_by_error_code(pool):
    # token ids drawn from [0, 10**6) fall outside the model's 49152: every job is refused
    res = CliRunner().invoke(main, ["bench", "--redis-url", pool, "-n", "4", "--input-len",
                                    "8", "--output-len", "4", "--vocab-size", "1000000",
                                    "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 1, res.output                     # nothing succeeded
    assert "Failed requests:                        4" in res.output
    assert "  invalid_prompt:                       4" in res.output


def test_bench_rejects_bad_lengths_and_explains_a_missing_matplotlib(monkeypatch):
    res = CliRunner().invoke(main, ["bench", "--input-len", "9,2"])
    assert res.exit_code == 2 and "LO <= HI" in res.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib fails
    res = CliRunner().invoke(main, ["bench", "--plot", "x.png"])
    assert res.exit_code == 1 and "pip install 'qworker[plot]'" in res.output


def test_percentile_interpolates_like_numpy():
    np = pytest.importorskip("numpy")
    rng = random.Random(3)
    for n in (1, 2, 7, 100):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None


def test_request_timing_follows_vllm_definitions():
    t = RequestTiming(sent=10.0, prompt_tokens=5)
    for at, n in ((10.5, 1), (10.6, 0), (10.7, 2), (11.0, 1)):   # an empty event is ignored
        t.add(at, n)
    assert t.output_tokens == 4
    assert t.ttft == pytest.approx(0.5) and t.e2el == pytest.approx(1.0)
    assert t.tpot == pytest.approx((1.0 - 0.5) / 3)
    assert t.itls == pytest.approx([0.2, 0.3])
    assert RequestTiming(sent=0.0, chunks=[(1.0, 1)]).tpot is None


def test_summarize_counts_errors_apart_and_measures_goodput():
    ok = RequestTiming(0.0, [(0.1, 1), (0.2, 1)], prompt_tokens=3)
    slow = RequestTiming(0.0, [(0.5, 1), (0.6, 1)], prompt_tokens=3)
    bad = RequestTiming(0.0, [(0.1, 1)], error="invalid_prompt")
    s = summarize([ok, slow, bad], duration=2.0, slo_ttft_ms=200)
    assert (s["completed"], s["failed"], s["errors"]) == (2, 1, {"invalid_prompt": 1})
    assert s["total_output_tokens"] == 4 and s["output_throughput"] == 2.0
    assert s["total_token_throughput"] == 5.0 and s["request_throughput"] == 1.0
    assert s["ttft_ms"]["p50"] == pytest.approx(300) and s["goodput_rps"] == 0.5
    assert throughput_series([ok, slow], start=0.0, bin_s=0.25) == [(0.0, 8.0), (0.25, 0.0),
                                                                    (0.5, 8.0)]
