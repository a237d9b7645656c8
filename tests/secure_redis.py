"""Test support for the security and compose tests: redis-server processes started with
ACL users, TLS or the compose start script, and a throwaway CA made with ``openssl``."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
PASSWORDS = {"producer": "producer-pw-1", "worker": "worker-pw-2", "admin": "admin-pw-3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A redis-server (or the compose start script) on a free port, in ``workdir``."""

    def __init__(self, workdir: Path, args: list[str], cmd: list[str] | None = None,
                 env: dict[str, str] | None = None, port: int | None = None):
        self.workdir, self.args, self.cmd, self.env = workdir, args, cmd, env
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = workdir / f"redis-{self.port}.log"
        self.start()

    def start(self) -> None:
        base = self.cmd or ["redis-server"]
        argv = [*base, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                str(self.workdir), "--daemonize", "no", "--logfile", str(self.log), *self.args]
        self.proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        end = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode()[-2000:]}{self.logtail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > end:
                    raise RuntimeError("redis-server did not listen: " + self.logtail()) from None
                time.sleep(0.02)

    def logtail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def url(self, role: str | None = None, password: str | None = None, scheme: str = "redis",
            query: str = "") -> str:
        auth = ""
        if role is not None:
            from qworker.acl import username
            auth = f"{username(role)}:{password or PASSWORDS[role]}@"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def client(self, role: str, **kw) -> redis.Redis:
        """A plain redis-py client logged in as ``role`` (bytes replies)."""
        from qworker.acl import username
        return redis.Redis(port=self.port, username=username(role), password=PASSWORDS[role],
                           socket_timeout=10, **kw)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()

    stop = kill


def wait_until(pred, timeout: float = 10.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        try:
            v = pred()
            if v:
                return v
        except (redis.ConnectionError, redis.BusyLoadingError):
            pass
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (cert, key)."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
            "-subj", f"/CN={name}", cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


def make_cert(d: Path, name: str, ca: str, server: bool) -> tuple[Path, Path]:
    """A certificate signed by CA ``ca`` (server: SAN 127.0.0.1 and localhost)."""
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
                   if server else "extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name, cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


def has_openssl() -> bool:
    return shutil.which("openssl") is not None
