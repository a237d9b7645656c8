"""The command line through click's CliRunner: env vars for every worker option, clear
errors without tracebacks, submit/status/dead-letter against a real redis-server."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from redis_support import InProcessWorker

from qworker.cli import main
from qworker.worker.keys import Keys
from qworker.worker.protocol import pack

KEYS = Keys()


def run(*args, env=None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_every_worker_option_has_a_qworker_env_var():
    out = run("worker", "--help").output
    options = set(re.findall(r"--([a-z][a-z-]+)", out)) - {"help", "disable-prefix-caching"}
    for opt in options:
        env = "QWORKER_" + opt.replace("enable-", "").replace("-", "_").upper()
        assert env in out, f"--{opt} has no env var {env}"
    for must in ("max-num-seqs", "max-num-batched-tokens", "block-size", "num-kv-blocks",
                 "enable-prefix-caching", "dtype", "device", "lease-ms", "max-deliveries",
                 "drain-timeout", "name", "redis-url", "model"):
        assert must in options


@pytest.mark.parametrize("env,needle", [
    ({"QWORKER_LEASE_MS": "soon"}, "lease-ms"),
    ({"QWORKER_BLOCK_SIZE": "7"}, "block-size"),
    ({"QWORKER_DEVICE": "tpu"}, "device"),
    ({"QWORKER_MAX_DELIVERIES": "0"}, "max-deliveries"),
    ({"QWORKER_REDIS_URL": "http://localhost"}, "Redis URL"),
    ({"QWORKER_TENSOR_PARALLEL_SIZE": "0"}, "tensor-parallel-size"),
    ({"QWORKER_ASYNC_SCHEDULING": "sometimes"}, "async-scheduling"),
    ({"QWORKER_ASYNC_SCHEDULING": "on", "QWORKER_TENSOR_PARALLEL_SIZE": "2"},
     "async_scheduling is not supported with tensor_parallel_size > 1"),
    ({"QWORKER_METRICS_PORT": "70000"}, "metrics-port"),
    ({"QWORKER_GPUS": "0,7", "QWORKER_SUPERVISOR_GPUS": "0,1"}, "--gpus"),
    ({"QWORKER_GPUS": "0,1,2", "QWORKER_SUPERVISOR_GPUS": "0,1,2",
      "QWORKER_TENSOR_PARALLEL_SIZE": "2"}, "groups of tensor_parallel_size 2"),
])
def test_bad_worker_settings_from_env_are_clear_errors(env, needle):
    res = run("worker", "--model", "/nonexistent", env=env)
    assert res.exit_code == 2 and needle in res.output
    assert "Traceback" not in res.output


def test_a_password_in_a_bad_redis_url_is_not_echoed():
    res = run("worker", "--redis-url", "http://u:TOPSECRET@h/0", "--model", "/nonexistent")
    assert res.exit_code == 2 and "TOPSECRET" not in res.output and "u:***@h" in res.output


def test_an_unloadable_model_is_a_clear_error(tmp_path):
    res = run("worker", env={"QWORKER_MODEL": str(tmp_path / "missing"), "QWORKER_DEVICE": "cpu"})
    assert res.exit_code == 1 and "cannot load model" in res.output
    assert "Traceback" not in res.output


def test_unreachable_redis_is_a_clear_error():
    res = run("status", "--redis-url", "redis://127.0.0.1:1/0")
    assert res.exit_code == 1 and "cannot reach Redis" in res.output


def test_dead_letters_can_be_listed_and_retried(server):
    r = server.client()
    r.xadd(KEYS.dead, {"job": pack({"v": 1, "id": "dl-1", "prompt": "x"}), "reason": "internal",
                       "message": "boom", "deliveries": 4, "worker": "w9", "id": "dl-1",
                       "entry": "1-1", "ts_ms": 1})
    r.set(KEYS.result("dl-1"), b"old")
    listed = run("dead-letter", "list", "--json", "--redis-url", server.url)
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert rows[0]["id"] == "dl-1" and rows[0]["reason"] == "internal"
    assert run("dead-letter", "retry", "--redis-url", server.url).exit_code == 2
    missing = run("dead-letter", "retry", "9-9", "--redis-url", server.url)
    assert missing.exit_code == 1 and "no dead letter" in missing.output
    done = run("dead-letter", "retry", rows[0]["entry"], "--redis-url", server.url)
    assert done.exit_code == 0 and "dl-1" in done.output
    assert r.xlen(KEYS.dead) == 0 and r.xlen(KEYS.jobs) == 1
    assert not r.exists(KEYS.result("dl-1"))
    r.delete(KEYS.jobs)


def test_submit_streams_text_and_status_shows_the_worker(server, tiny_checkpoint):
    from qworker.config import EngineConfig
    from qworker.engine.engine import Engine

    engine = Engine(str(tiny_checkpoint("llama")), EngineConfig(max_num_seqs=4,
                                                                num_kv_blocks=128),
                    device="cpu", dtype="float32")
    w = InProcessWorker(engine, server.url, "cli-w")
    try:
        res = run("submit", "Hello there", "--max-tokens", "5", "--json", "--job-id", "cli-1",
                  "--redis-url", server.url)
        assert res.exit_code == 0, res.output
        events = [json.loads(line) for line in res.output.splitlines()]
        assert [e["seq"] for e in events] == list(range(len(events)))
        assert events[-1]["finished"] and events[-1]["usage"]["completion_tokens"] == 5
        plain = run("submit", "Hi", "--chat", "--max-tokens", "3", "--redis-url", server.url)
        assert plain.exit_code == 0
        bad = run("submit", "Hi", "--param", "top_p=7", "--redis-url", server.url)
        assert bad.exit_code == 2 and "top_p" in bad.output and "Traceback" not in bad.output
        st = json.loads(run("status", "--json", "--redis-url", server.url).output)
        assert [x["name"] for x in st["workers"]] == ["cli-w"]
        assert st["groups"][0]["group"] == "workers" and st["length"] == 0
        assert "cli-w" in run("status", "--redis-url", server.url).output
    finally:
        w.stop()
