"""Logging (JSON vs console, job id binding, summary line, redaction) and the metrics and
health endpoints, over real HTTP."""

from __future__ import annotations

import io
import json
import logging
import time
import urllib.error
import urllib.request

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from qworker.logs import (
    JobStats,
    configure_logging,
    get_logger,
    job_logger,
    job_summary,
    redact_url,
)
from qworker.metrics import MetricsServer, WorkerMetrics


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging():
    yield
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_qworker_handler", False)]:
        root.removeHandler(h)
    root.setLevel(logging.WARNING)
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


# ---- logging -------------------------------------------------------------------------
def test_json_lines_when_the_stream_is_not_a_terminal(restore_logging):
    out = io.StringIO()
    configure_logging("info", stream=out)
    get_logger().info("worker started", worker="w1", slots=8)
    get_logger().debug("too detailed")
    logging.getLogger("redis.connection").warning("from a library")
    first, second = lines(out)
    assert first["event"] == "worker started" and first["worker"] == "w1"
    assert first["slots"] == 8 and first["level"] == "info" and "timestamp" in first
    assert second["event"] == "from a library" and second["logger"] == "redis.connection"


def test_readable_console_when_the_stream_is_a_terminal(restore_logging):
    out = TtyStream()
    configure_logging("info", stream=out)
    get_logger().info("worker started", worker="w1")
    text = out.getvalue()
    assert not text.lstrip().startswith("{")
    assert "worker started" in text and "worker" in text and "w1" in text


def test_json_can_be_forced_on_a_terminal(restore_logging):
    out = TtyStream()
    configure_logging("info", json=True, stream=out)
    get_logger().info("hello")
    assert lines(out)[0]["event"] == "hello"


def test_unknown_level_is_refused_with_a_usable_message():
    with pytest.raises(ValueError, match="log level"):
        configure_logging("loud")


def test_every_line_of_a_job_logger_carries_the_job_id(restore_logging):
    out = io.StringIO()
    configure_logging("debug", stream=out)
    log = job_logger("job-42", tenant="acme")
    log.debug("admitted")
    log.info("first token")
    assert [(x["job_id"], x["tenant"]) for x in lines(out)] == [("job-42", "acme")] * 2


def test_one_canonical_summary_line_per_finished_job(restore_logging):
    out = io.StringIO()
    configure_logging("info", stream=out)
    stats = JobStats("job-7", "length", prompt_tokens=12, output_tokens=11, queue_s=0.25,
                     ttft_s=0.1, duration_s=1.1)
    job_summary(job_logger("job-7"), stats, deliveries=1)
    (line,) = lines(out)
    assert line["event"] == "job finished" and line["job_id"] == "job-7"
    assert line["finish_reason"] == "length" and line["level"] == "info"
    assert line["prompt_tokens"] == 12 and line["output_tokens"] == 11
    assert line["queue_s"] == 0.25 and line["ttft_s"] == 0.1 and line["duration_s"] == 1.1
    assert line["tpot_s"] == pytest.approx(0.1) and line["tokens_per_s"] == 10.0
    assert line["deliveries"] == 1


def test_an_error_finish_is_summarised_as_a_warning(restore_logging):
    out = io.StringIO()
    configure_logging("info", stream=out)
    job_summary(get_logger(), JobStats("bad", "error"), error_code="invalid_params")
    (line,) = lines(out)
    assert line["level"] == "warning" and line["job_id"] == "bad"
    assert "ttft_s" not in line and line["error_code"] == "invalid_params"


# ---- redaction -----------------------------------------------------------------------
@pytest.mark.parametrize("url, safe", [
    ("redis://user:pass@host:6379/0", "redis://user:***@host:6379/0"),
    ("rediss://:s3cret@redis.internal/1?ssl_ca_certs=/ca.pem",
     "rediss://:***@redis.internal/1?ssl_ca_certs=/ca.pem"),
    ("redis://worker:p@ss@word@host", "redis://worker:***@host"),
    ("unix:///run/redis.sock?db=0&password=hunter2", "unix:///run/redis.sock?db=0&password=***"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("redis://user@host", "redis://user@host"),
    ("cannot reach redis://w:pw@h:1 (timeout)", "cannot reach redis://w:***@h:1 (timeout)"),
])
def test_redact_url_masks_only_the_password(url, safe):
    assert redact_url(url) == safe


@pytest.mark.parametrize("as_json", [True, False])
def test_credentials_never_reach_the_log_output(restore_logging, as_json):
    out = io.StringIO()
    configure_logging("debug", json=as_json, stream=out)
    log = get_logger()
    log.info("connecting", redis_url="redis://worker:TOPSECRET1@redis:6379/0")
    log.info("auth", password="TOPSECRET2", settings={"password": "TOPSECRET3", "db": 0})
    log.info("lost rediss://producer:TOPSECRET4@10.0.0.9:6380/0, retrying")
    logging.getLogger("redis").error("AUTH failed for redis://u:TOPSECRET5@h")
    try:
        raise ConnectionError("Error connecting to redis://u:TOPSECRET6@h:6379")
    except ConnectionError:
        log.exception("gave up", url="unix:///s.sock?password=TOPSECRET7")
    text = out.getvalue()
    assert "TOPSECRET" not in text
    assert "redis://worker:***@redis:6379/0" in text and "db" in text


# ---- metrics -------------------------------------------------------------------------
@pytest.fixture
def served():
    metrics = WorkerMetrics(worker="w1", model="tiny", stale_after_s=5.0)
    server = MetricsServer(metrics, port=0, host="127.0.0.1")
    port = server.start()
    yield metrics, f"http://127.0.0.1:{port}"
    server.stop()


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def scrape(base: str) -> dict[str, float]:
    status, ctype, text = get(base + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def test_metrics_endpoint_serves_the_figures_the_worker_reported(served):
    m, base = served
    t0 = time.monotonic()
    m.job_started("a", enqueued_ms=int(time.time() * 1000) - 2000, now=t0)
    m.job_started("b", now=t0)
    m.step_tokens([("a", 1), ("b", 1)], now=t0 + 0.5)        # TTFT 0.5 s each
    for i in range(1, 5):                                      # ITL 0.03 s
        m.step_tokens([("a", 1), ("b", 1)], now=t0 + 0.5 + 0.03 * i)
    stats = m.job_finished("a", "length", prompt_tokens=7, now=t0 + 0.62)
    m.job_finished("b", "stop", prompt_tokens=3, now=t0 + 0.62)
    m.job_finished("never-admitted", "error")
    m.set_engine({"running": 3, "waiting": 2, "kv_usage": 0.375, "preemptions": 4,
                  "prefix_hit_rate": 0.5})
    m.set_engine({"running": 3, "waiting": 2, "kv_usage": 0.375, "preemptions": 6})
    m.set_queue(stream_length=41, pending=5)
    m.reclaimed(2)
    m.dead_lettered("invalid_payload")
    s = scrape(base)
    assert s["qworker_stream_length"] == 41 and s["qworker_pending_jobs"] == 5
    assert s["qworker_running_requests"] == 3 and s["qworker_waiting_requests"] == 2
    assert s["qworker_kv_cache_usage_ratio"] == 0.375
    assert s["qworker_preemptions_total"] == 6 and s["qworker_reclaims_total"] == 2
    assert s["qworker_dead_letters_total{code=invalid_payload}"] == 1
    assert s["qworker_jobs_finished_total{reason=length}"] == 1
    assert s["qworker_jobs_finished_total{reason=stop}"] == 1
    assert s["qworker_jobs_finished_total{reason=error}"] == 1
    assert s["qworker_jobs_finished_total{reason=cancelled}"] == 0
    assert s["qworker_output_tokens_total"] == 10 and s["qworker_prompt_tokens_total"] == 10
    assert s["qworker_time_to_first_token_seconds_count"] == 2
    assert s["qworker_time_to_first_token_seconds_sum"] == pytest.approx(1.0)
    assert s["qworker_inter_token_latency_seconds_count"] == 8
    assert s["qworker_inter_token_latency_seconds_bucket{le=0.02}"] == 0
    assert s["qworker_inter_token_latency_seconds_bucket{le=0.04}"] == 8
    assert s["qworker_time_per_output_token_seconds_count"] == 2
    assert s["qworker_time_per_output_token_seconds_sum"] == pytest.approx(0.06)
    assert s["qworker_queue_time_seconds_count"] == 1
    assert 1.9 < s["qworker_queue_time_seconds_sum"] < 10
    assert s["qworker_tokens_per_second"] > 0
    assert s["qworker_worker_info{model=tiny,worker=w1}"] == 1
    assert stats.output_tokens == 5 and stats.ttft_s == pytest.approx(0.5)
    assert stats.tpot_s == pytest.approx(0.03) and stats.duration_s == pytest.approx(0.62)


def test_tokens_per_second_counts_the_recent_window():
    m = WorkerMetrics(rate_window_s=10.0)
    m._t0 -= 100                                  # an old worker: the full window applies
    now = time.monotonic()
    m.step_tokens([("x", 400)], now=now - 30)     # outside the window: ignored
    m.step_tokens([("x", 60), ("y", 40)], now=now - 1)
    assert m.registry.get_sample_value("qworker_tokens_per_second") == pytest.approx(10.0)


def test_health_is_503_before_the_loop_first_ticks(served):
    m, base = served
    status, ctype, body = get(base + "/healthz")
    assert status == 503 and ctype == "application/json"
    assert json.loads(body)["status"] == "starting"


def test_health_is_200_while_the_loop_ticks(served):
    m, base = served
    m.job_started("a")
    m.loop_tick()
    status, _, body = get(base + "/healthz")
    info = json.loads(body)
    assert status == 200 and info["status"] == "ok" and info["worker"] == "w1"
    assert info["running"] == 1 and 0 <= info["last_step_age_s"] < 5


def test_health_is_503_when_the_loop_stalls(served):
    m, base = served
    m.loop_tick(now=time.monotonic() - 6.0)       # last iteration 6 s ago, limit 5 s
    status, _, body = get(base + "/healthz")
    info = json.loads(body)
    assert status == 503 and info["status"] == "stalled" and info["last_step_age_s"] >= 6
    m.loop_tick()
    assert get(base + "/healthz")[0] == 200


def test_unknown_paths_are_404(served):
    assert get(served[1] + "/nope")[0] == 404


def test_two_workers_in_one_process_keep_separate_registries():
    a, b = WorkerMetrics(worker="a"), WorkerMetrics(worker="b")
    a.reclaimed(3)
    assert b"qworker_reclaims_total 3.0" in a.render()
    assert b"qworker_reclaims_total 0.0" in b.render()
