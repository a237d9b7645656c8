"""Test support for the Redis worker: throwaway redis-server processes, worker processes
run through the CLI, and small waiting helpers. Every wait is bounded."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll ``pred`` until truthy; return its value or fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A redis-server on a free port in its own directory (AOF optional)."""

    def __init__(self, aof: bool = False):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="qw-redis-")
        self.aof = aof
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--save", "", "--daemonize", "no", "--loglevel", "warning"]
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = redis.Redis(port=self.port)
        wait_for(lambda: self._ping(r), 10, what="redis-server to start")
        r.close()

    @staticmethod
    def _ping(r: redis.Redis) -> bool:
        try:
            return r.ping()
        except redis.RedisError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class WorkerProc:
    """``qworker worker`` as a subprocess (so it can be killed for real)."""

    def __init__(self, model_dir: str, url: str, name: str, lease_ms: int = 1500,
                 extra: list[str] | None = None, env: dict | None = None,
                 log_path: str | None = None):
        self.name = name
        self.log_path = log_path or os.path.join(tempfile.mkdtemp(prefix="qw-log-"), f"{name}.log")
        self.log = open(self.log_path, "wb")
        cmd = [sys.executable, str(ROOT / "tests" / "worker_entry.py"), "worker", "--model", model_dir,
               "--redis-url", url, "--name", name, "--device", "cpu", "--lease-ms", str(lease_ms),
               "--max-num-seqs", "16", "--num-kv-blocks", "512", "--log-format", "json",
               *(extra or [])]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=str(ROOT))

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        return Path(self.log_path).read_text(errors="replace")


def wait_ready(r: redis.Redis, names: list[str], prefix: str = "qworker", timeout: float = 60):
    """Until every named worker has written its heartbeat."""
    wait_for(lambda: all(r.exists(f"{prefix}:worker:{n}") for n in names), timeout,
             interval=0.1, what=f"workers {names} to start")


class InProcessWorker:
    """A Worker on a thread of the test process (its engine can be inspected)."""

    def __init__(self, engine, url: str, name: str, lease_ms: int = 1000, **kw):
        import threading

        from qworker.worker.connection import RedisSettings
        from qworker.worker.worker import Worker, WorkerSettings

        self.worker = Worker(engine, WorkerSettings(RedisSettings.from_url(url), name=name,
                                                    lease_ms=lease_ms, **kw))
        self.thread = threading.Thread(target=self.worker.run, kwargs={"install_signals": False},
                                       daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 20) -> None:
        self.worker.stop(drain_timeout=0)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "worker thread did not stop"
