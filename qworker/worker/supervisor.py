"""One worker process per GPU (or per group of ``tensor_parallel_size`` GPUs), kept running.

``plan_children`` turns ``--gpus all|0,1,...`` into child specs: each child sees only its
GPUs (``CUDA_VISIBLE_DEVICES``) and is its own consumer in the group (``{name}-gpu{i}``;
``{name}-gpu{i}-{j}`` for a tensor-parallel pair). ``Supervisor.run`` starts them, restarts
a child that exits with exponential backoff (reset once it has run ``stable_s``), and on
SIGTERM/SIGINT forwards SIGTERM to every child so each drains (finishes its running jobs
within its drain timeout and hands the rest back), waits, and kills what is left only
after ``stop_timeout``. A second signal kills at once. A child exiting with a usage error
(status 2: bad options will not fix themselves) stops them all.

Names are stable across restarts; that is safe because a child is restarted only after it
has exited, so no two live processes ever share a consumer name.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

GPUS_ENV = "QWORKER_SUPERVISOR_GPUS"     # the GPU ids "all" means (tests; hosts without torch)
USAGE_ERROR = 2                          # click's exit status for bad options


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
    """GPU ids ``--gpus all`` stands for: ``$QWORKER_SUPERVISOR_GPUS``, else
    ``$CUDA_VISIBLE_DEVICES``, else ``0..torch.cuda.device_count()-1``."""
    for var in (GPUS_ENV, "CUDA_VISIBLE_DEVICES"):
        if environ.get(var) is not None:
            return [g.strip() for g in environ[var].split(",") if g.strip()]
    import torch  # only here: the supervisor itself never initializes CUDA

    return [str(i) for i in range(torch.cuda.device_count())]


def parse_gpus(spec: str, environ: Mapping[str, str] = os.environ) -> list[str]:
    """``"all"`` or a comma list of ids, checked against ``visible_gpus``."""
    visible = visible_gpus(environ)
    gpus = visible if spec.strip() == "all" else [g.strip() for g in spec.split(",")]
    if not gpus or "" in gpus:
        raise ValueError(f"--gpus {spec!r}: no GPU ids (give 'all' or e.g. '0,1'); "
                         f"visible: {','.join(visible) or 'none'}")
    unknown = [g for g in gpus if g not in visible]
    if unknown:
        raise ValueError(f"--gpus {spec!r}: GPU {unknown[0]} is not visible "
                         f"(visible: {','.join(visible) or 'none'})")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus {spec!r} names a GPU twice")
    return gpus


@dataclass(slots=True)
class ChildSpec:
    """One supervised process: its consumer name, GPUs, command and environment."""

    name: str
    gpus: list[str]
    argv: list[str]
    env: dict[str, str]


def plan_children(argv: Sequence[str], gpus: str, name: str | None = None,
                  tensor_parallel_size: int = 1,
                  environ: Mapping[str, str] = os.environ) -> list[ChildSpec]:
    """A child per ``tensor_parallel_size`` consecutive GPUs of ``gpus``, running ``argv``
    with ``QWORKER_NAME`` and ``CUDA_VISIBLE_DEVICES`` set and ``QWORKER_GPUS`` unset (so
    a child never supervises in turn) and NVLink multicast off. Raises ``ValueError`` for an unusable plan."""
    ids = parse_gpus(gpus, environ)
    if tensor_parallel_size < 1 or len(ids) % tensor_parallel_size:
        raise ValueError(f"{len(ids)} GPU(s) ({','.join(ids)}) cannot be split into groups of "
                         f"tensor_parallel_size {tensor_parallel_size}")
    base = name or socket.gethostname()
    env = {k: v for k, v in environ.items() if k not in ("QWORKER_GPUS", GPUS_ENV)}
    env["NCCL_NVLS_ENABLE"] = "0"        # NVLink multicast off: see docs/scaling.md
    out = []
    for i in range(0, len(ids), tensor_parallel_size):
        group = ids[i:i + tensor_parallel_size]
        child = f"{base}-gpu{'-'.join(group)}"
        out.append(ChildSpec(child, group, list(argv),
                             {**env, "QWORKER_NAME": child,
                              "CUDA_VISIBLE_DEVICES": ",".join(group)}))
    return out


def worker_argv(args: Sequence[str], drop: Sequence[str] = ("--gpus", "--name"),
                entry: Sequence[str] | None = None) -> list[str]:
    """The child command for ``qworker worker <args>``: the same options minus ``drop``
    (``--opt value`` and ``--opt=value`` forms), run by ``entry`` (default
    ``python -m qworker.cli``)."""
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in drop:
            skip = True
        elif not any(a.startswith(d + "=") for d in drop):
            kept.append(a)
    return [*(entry or (sys.executable, "-m", "qworker.cli")), "worker", *kept]


@dataclass(slots=True)
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float = 0.0
    failures: int = 0                    # quick exits in a row: the backoff exponent
    restarts: int = 0


class Supervisor:
    """Start the children, restart the ones that exit, drain them all on SIGTERM."""

    def __init__(self, children: Sequence[ChildSpec], backoff_s: float = 1.0,
                 max_backoff_s: float = 30.0, stable_s: float = 60.0,
                 stop_timeout_s: float = 60.0, poll_s: float = 0.1) -> None:
        self.children = [_Child(c) for c in children]
        self.backoff_s, self.max_backoff_s, self.stable_s = backoff_s, max_backoff_s, stable_s
        self.stop_timeout_s, self.poll_s = stop_timeout_s, poll_s
        self.signals = 0                 # stop requests so far: 1 drains, 2 kills
        self.status = 0

    def stop(self, *_: object) -> None:
        """Request a drain (a second call kills). Only sets a counter: signal-safe."""
        self.signals += 1

    def run(self, install_signals: bool = True) -> int:
        """Supervise until stopped; returns 0 when every child drained cleanly."""
        if install_signals:
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        for c in self.children:
            self._start(c)
        while not self.signals:
            now = time.monotonic()
            for c in self.children:
                if c.proc is not None and c.proc.poll() is not None:
                    self._exited(c, now)
                if c.proc is None and not self.signals and now >= c.restart_at:
                    c.restarts += 1
                    self._start(c)
            time.sleep(self.poll_s)
        return self._drain()

    def _start(self, c: _Child) -> None:
        log.info("starting %s on GPU %s", c.spec.name, ",".join(c.spec.gpus))
        c.proc = subprocess.Popen(c.spec.argv, env=c.spec.env, start_new_session=True,
                                  preexec_fn=_die_with_parent)
        c.started = time.monotonic()

    def _exited(self, c: _Child, now: float) -> None:
        code, ran = c.proc.returncode, now - c.started
        c.proc = None
        if code == USAGE_ERROR:
            log.error("%s exited with a usage error (status 2); stopping all", c.spec.name)
            self.status = USAGE_ERROR
            self.stop()
            return
        c.failures = 0 if ran >= self.stable_s else c.failures + 1
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** max(0, c.failures - 1))
        c.restart_at = now + delay
        log.warning("%s exited with status %s after %.1fs; restarting in %.1fs",
                    c.spec.name, code, ran, delay)

    def _drain(self) -> int:
        live = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        log.info("stopping: SIGTERM to %d worker(s), waiting up to %.0fs", len(live),
                 self.stop_timeout_s)
        for c in live:
            c.proc.send_signal(signal.SIGTERM)
        deadline, drained = time.monotonic() + self.stop_timeout_s, self.signals
        while any(c.proc.poll() is None for c in live):
            if time.monotonic() >= deadline or self.signals > drained:
                for c in live:
                    if c.proc.poll() is None:
                        log.error("%s did not stop in time; killing it", c.spec.name)
                        c.proc.kill()
                        c.proc.wait()
                        self.status = self.status or 1
                break
            time.sleep(self.poll_s)
        bad = [c for c in live if c.proc.returncode != 0]
        return self.status or (1 if bad else 0)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM (and drain) if the supervisor dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qworker.worker.supervisor --gpus all [--name N] -- command ...``"""
    p = argparse.ArgumentParser(prog="python -m qworker.worker.supervisor")
    p.add_argument("--gpus", default="all")
    p.add_argument("--name", default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--backoff", type=float, default=1.0)
    p.add_argument("--stop-timeout", type=float, default=60.0)
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        p.error("give the child command after --")
    try:
        children = plan_children(command, a.gpus, a.name, a.tensor_parallel_size)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(message)s")
    return Supervisor(children, backoff_s=a.backoff, stop_timeout_s=a.stop_timeout).run()


if __name__ == "__main__":
    sys.exit(main())
