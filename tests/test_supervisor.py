"""The GPU supervisor: one child per GPU (or GPU group), each its own consumer with its own
CUDA_VISIBLE_DEVICES; a crashed child is restarted; SIGTERM drains them all. Real
processes: the supervisor's own entry point and a small Python child that behaves like a
worker (records its starts, drains on SIGTERM). GPUs are faked with
QWORKER_SUPERVISOR_GPUS, so nothing here needs CUDA."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qworker.worker.supervisor import GPUS_ENV, parse_gpus, plan_children, worker_argv

CHILD = """
import os, signal, sys, time
from pathlib import Path

d, name = Path(sys.argv[1]), os.environ["QWORKER_NAME"]
starts = d / f"{name}.starts"
n = len(starts.read_text().splitlines()) if starts.exists() else 0
with starts.open("a") as f:
    f.write(f"{os.getpid()} {os.environ['CUDA_VISIBLE_DEVICES']}\\n")
if n == 0 and name.endswith(os.environ.get("CRASH_FIRST", "-")):
    sys.exit(3)                                   # a crash on the first start
if os.environ.get("EXIT_CODE"):
    sys.exit(int(os.environ["EXIT_CODE"]))

def drain(*_):
    if os.environ.get("IGNORE_TERM"):
        return
    time.sleep(0.2)                               # finishing its running jobs
    (d / f"{name}.drained").write_text(str(os.getpid()))
    sys.exit(0)

signal.signal(signal.SIGTERM, drain)
(d / f"{name}.ready").write_text(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


def supervise(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen:
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, "-m", "qworker.worker.supervisor", "--name", "t", "--backoff", "0.2",
         *args, "--", sys.executable, str(child), str(tmp_path)],
        env={**os.environ, GPUS_ENV: "0,1", **env})


def wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def starts(tmp_path: Path, name: str) -> list[list[str]]:
    f = tmp_path / f"{name}.starts"
    return [line.split() for line in f.read_text().splitlines()] if f.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_plan_gives_each_gpu_group_its_own_consumer_and_devices():
    env = {GPUS_ENV: "0,1,2,3", "QWORKER_GPUS": "all", "KEEP": "1"}
    one = plan_children(["w"], "all", "host", environ=env)
    assert [(c.name, c.env["CUDA_VISIBLE_DEVICES"]) for c in one] == [
        ("host-gpu0", "0"), ("host-gpu1", "1"), ("host-gpu2", "2"), ("host-gpu3", "3")]
    assert all(c.env["QWORKER_NAME"] == c.name and "QWORKER_GPUS" not in c.env
               and c.env["KEEP"] == "1" and c.env["NCCL_NVLS_ENABLE"] == "0"
               and c.argv == ["w"] for c in one)
    pairs = plan_children(["w"], "2,3,0,1", "host", tensor_parallel_size=2, environ=env)
    assert [(c.name, c.env["CUDA_VISIBLE_DEVICES"]) for c in pairs] == [
        ("host-gpu2-3", "2,3"), ("host-gpu0-1", "0,1")]


@pytest.mark.parametrize("spec, tp, error", [
    ("0,7", 1, "GPU 7 is not visible"), ("0,0", 1, "twice"), ("", 1, "no GPU ids"),
    ("0,1,2", 2, "groups of tensor_parallel_size 2")])
def test_unusable_gpu_plans_are_clear_errors(spec, tp, error):
    with pytest.raises(ValueError, match=error):
        plan_children(["w"], spec, "h", tp, environ={GPUS_ENV: "0,1,2,3"})


def test_all_follows_cuda_visible_devices():
    assert parse_gpus("all", {"CUDA_VISIBLE_DEVICES": "4,6"}) == ["4", "6"]


def test_worker_argv_drops_the_supervisor_options():
    argv = worker_argv(["--gpus", "all", "--model", "m", "--name=x", "--tensor-parallel-size",
                        "2", "--gpus=0"])
    assert argv == [sys.executable, "-m", "qworker.cli", "worker", "--model", "m",
                    "--tensor-parallel-size", "2"]


def test_crashed_child_is_restarted_and_sigterm_drains_all(tmp_path):
    sup = supervise(tmp_path, "--gpus", "all", CRASH_FIRST="gpu1")
    try:
        wait_for(lambda: (tmp_path / "t-gpu0.ready").exists()
                 and (tmp_path / "t-gpu1.ready").exists())
        assert [gpu for _, gpu in starts(tmp_path, "t-gpu0")] == ["0"]
        assert [gpu for _, gpu in starts(tmp_path, "t-gpu1")] == ["1", "1"]   # crash, restart
        pids = {n: int((tmp_path / f"{n}.ready").read_text()) for n in ("t-gpu0", "t-gpu1")}
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=15) == 0
    finally:
        sup.kill()
    for name, pid in pids.items():
        assert int((tmp_path / f"{name}.drained").read_text()) == pid
        assert not alive(pid)


def test_child_that_ignores_sigterm_is_killed_after_the_stop_timeout(tmp_path):
    sup = supervise(tmp_path, "--gpus", "0", "--stop-timeout", "0.5", IGNORE_TERM="1")
    try:
        wait_for(lambda: (tmp_path / "t-gpu0.ready").exists())
        pid = int((tmp_path / "t-gpu0.ready").read_text())
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=15) == 1
    finally:
        sup.kill()
    assert not alive(pid)


def test_a_usage_error_stops_every_child_instead_of_restarting(tmp_path):
    sup = supervise(tmp_path, "--gpus", "0", EXIT_CODE="2")
    try:
        assert sup.wait(timeout=15) == 2
    finally:
        sup.kill()
    assert len(starts(tmp_path, "t-gpu0")) == 1


# ---- qworker worker --gpus: the real worker under the supervisor, on the CPU -------------
def two_free_ports() -> int:
    """A port p with p and p+1 free (worker i of --gpus serves metrics on p+i)."""
    import socket

    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
            return p
    raise AssertionError("no two consecutive free ports")


def test_worker_gpus_runs_a_consumer_per_gpu_on_one_redis_and_sigterm_drains_both(
        tmp_path, tiny_checkpoint):
    from redis_support import ROOT, RedisServer, wait_ready
    from test_worker_metrics import scrape

    from qworker.worker.client import Client

    srv, port = RedisServer(), two_free_ports()
    log = open(tmp_path / "sup.log", "wb")
    sup = subprocess.Popen(
        [sys.executable, "-m", "qworker.cli", "worker", "--gpus", "0,1", "--name", "sup",
         "--model", str(tiny_checkpoint("llama")), "--redis-url", srv.url, "--device", "cpu",
         "--max-num-seqs", "1", "--num-kv-blocks", "128", "--lease-ms", "1500",
         "--log-format", "json", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
        env={**os.environ, GPUS_ENV: "0,1", "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        stdout=log, stderr=subprocess.STDOUT)
    c, r = Client(srv.url), srv.client()
    try:
        wait_ready(r, ["sup-gpu0", "sup-gpu1"], timeout=120)
        short = [c.submit(prompt=f"gpu {i}", max_tokens=20, ignore_eos=True, temperature=0.0)
                 for i in range(6)]
        assert {c.result(j, timeout=60).finish_reason for j in short} == {"length"}
        served = [scrape(port + i)["qworker_jobs_finished_total{reason=length}"] for i in (0, 1)]
        assert sum(served) == 6 and min(served) >= 1, f"jobs per worker: {served}"
        # one long job each (--max-num-seqs 1): SIGTERM while both run; both finish
        long = [c.submit(prompt=f"long {i}", max_tokens=300, ignore_eos=True, temperature=0.0)
                for i in range(2)]
        wait_for(lambda: all(r.xlen(c.keys.log(j)) >= 2 for j in long), 60)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=90) == 0
        for j in long:
            res = c.get_result(j)
            assert res is not None and res.finish_reason == "length" and len(res.token_ids) == 300
        assert not r.exists("qworker:worker:sup-gpu0") and not r.exists("qworker:worker:sup-gpu1")
        assert r.xlen(c.keys.jobs) == 0
        out = (tmp_path / "sup.log").read_text()
        stopped = [line for line in out.splitlines() if '"worker stopped"' in line]
        assert sorted('"sup-gpu0"' in s for s in stopped) == [False, True]
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait(10)
        log.close()
        c.close()
        srv.close()
