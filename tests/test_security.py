"""Redis ACL roles (qworker/acl.py) against a real redis-server, and rediss:// with a CA.

Each role can run what the protocol needs on its own keys; anything else is NOPERM. The
worker role is exercised with the real Lua scripts and a real job end to end: worker
user for the worker, producer user for the Client, and Redis's ACL LOG must stay empty.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import threading
import time

import msgpack
import pytest
import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry
from secure_redis import COMPOSE, PASSWORDS, Server, free_port, has_openssl, make_ca, make_cert

from qworker.acl import ROLES, acl_file, rules, setuser_args, username
from qworker.worker.connection import RedisSettings
from qworker.worker.protocol import pack
from qworker.worker.scripts import ACK, DEAD_LETTER, HANDOFF, PUBLISH, RENEW

NOPERM = redis.exceptions.NoPermissionError
JOBS, DEAD, CANCEL = "qworker:jobs", "qworker:dead", "qworker:cancel"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("acl")
    (d / "users.acl").write_text(acl_file(passwords=PASSWORDS))
    s = Server(d, ["--save", "", "--aclfile", str(d / "users.acl")])
    yield s
    s.kill()


@pytest.fixture
def admin(server):
    r = server.client("admin")
    r.flushall()
    r.execute_command("ACL", "LOG", "RESET")
    yield r
    r.close()


@pytest.fixture
def producer(server, admin):
    r = server.client("producer")
    yield r
    r.close()


@pytest.fixture
def worker(server, admin):
    r = server.client("worker")
    yield r
    r.close()


def denials(admin: redis.Redis) -> list[tuple[str, str]]:
    """Redis's ACL LOG as (user, command or key) pairs. CLIENT SETINFO, which redis-py
    sends on connect to Redis >= 7.2 and ignores when refused, is not a protocol command."""
    return [(e["username"], e["object"]) for e in admin.acl_log()
            if e["object"] != "client|setinfo"]


def pending_entry(admin: redis.Redis, worker: redis.Redis, consumer: str = "w1") -> str:
    """One job entry, delivered to ``consumer`` as the worker user."""
    admin.xgroup_create(JOBS, "workers", id="0", mkstream=True)
    admin.xadd(JOBS, {"job": pack({"v": 1, "id": "j1", "prompt": "hi"})})
    ((_, [(entry, _)]),) = worker.xreadgroup("workers", consumer, {JOBS: ">"}, count=1)
    return entry.decode()


# ---- the rules are written down once ----------------------------------------------------
def test_compose_users_acl_is_generated_from_qworker_acl():
    assert (COMPOSE / "redis" / "users.acl").read_text() == acl_file(), \
        "regenerate it: python -m qworker.acl > compose/redis/users.acl"


def test_every_role_is_refused_without_a_password(server):
    once = Retry(NoBackoff(), 0)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=server.port, retry=once).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=server.port, username=username("producer"), password="wrong",
                    retry=once).ping()


def test_rules_follow_the_key_prefix():
    assert "(+xadd ~acme:jobs)" in rules("producer", prefix="acme")
    assert not any("qworker" in r for role in ROLES for r in rules(role, prefix="acme"))
    with pytest.raises(ValueError, match="unknown role"):
        rules("root")


# ---- producer ----------------------------------------------------------------------------
def test_producer_can_submit_read_and_cancel_through_the_client(server, admin):
    from qworker.worker.client import Client

    with Client(server.url("producer")) as c:
        job_id = c.submit("Hello", max_tokens=4)
        assert admin.xlen(JOBS) == 1
        assert c.get_result(job_id) is None
        c.cancel(job_id)
    assert admin.exists(f"qworker:cancelled:{job_id}")
    assert denials(admin) == []


def test_producer_reads_its_events_with_xrange_xread_and_subscribe(producer, admin):
    admin.xadd("qworker:log:j1", {"event": b"e0"}, id="0-1")
    assert producer.xrange("qworker:log:j1")[0][1] == {b"event": b"e0"}
    assert producer.xread({"qworker:log:j1": "0-0"}, count=1)[0][1][0][0] == b"0-1"
    ps = producer.pubsub()
    ps.subscribe("qworker:out:j1")
    assert ps.get_message(timeout=2)["type"] == "subscribe"
    ps.close()
    admin.set("qworker:result:j1", b"r")
    assert producer.get("qworker:result:j1") == b"r"


PRODUCER_REFUSED = {
    "FLUSHALL": lambda r: r.flushall(),
    "CONFIG GET": lambda r: r.config_get("*"),
    "KEYS": lambda r: r.keys("*"),
    "SCAN": lambda r: r.scan(),
    "INFO": lambda r: r.info(),
    "ACL LIST": lambda r: r.acl_list(),
    "CLIENT LIST": lambda r: r.client_list(),
    "DEL jobs": lambda r: r.delete(JOBS),
    "XDEL jobs": lambda r: r.xdel(JOBS, "1-1"),
    "XTRIM jobs": lambda r: r.xtrim(JOBS, maxlen=0),
    "EXPIRE jobs": lambda r: r.expire(JOBS, 1),
    "XRANGE jobs (other jobs' prompts)": lambda r: r.xrange(JOBS),
    "XREADGROUP jobs (steal jobs)": lambda r: r.xreadgroup("workers", "x", {JOBS: ">"}),
    "XGROUP DESTROY": lambda r: r.xgroup_destroy(JOBS, "workers"),
    "XADD dead": lambda r: r.xadd(DEAD, {"job": b"x"}),
    "XRANGE dead": lambda r: r.xrange(DEAD),
    "XADD log (forge an event)": lambda r: r.xadd("qworker:log:j1", {"event": b"x"}),
    "SET result (forge a result)": lambda r: r.set("qworker:result:j1", b"x"),
    "DEL result": lambda r: r.delete("qworker:result:j1"),
    "PUBLISH out (forge a live event)": lambda r: r.publish("qworker:out:j1", b"x"),
    "HSET heartbeat": lambda r: r.hset("qworker:worker:w1", "running", 1),
    "SET other key": lambda r: r.set("session:1", "x"),
    "GET other key": lambda r: r.get("session:1"),
    "EVAL": lambda r: r.eval("return 1", 0),
    "SCRIPT LOAD": lambda r: r.script_load("return 1"),
}


@pytest.mark.parametrize("name", PRODUCER_REFUSED)
def test_producer_is_refused_everything_else(producer, admin, name):
    with pytest.raises(NOPERM):
        PRODUCER_REFUSED[name](producer)
    assert denials(admin)[0][0] == "qworker-producer"     # and Redis logged it


def test_producer_cannot_listen_to_cancellations(producer):
    ps = producer.pubsub()
    ps.subscribe(CANCEL)
    with pytest.raises(NOPERM):
        ps.get_message(timeout=2)
    ps.close()


def test_a_tenant_producer_reaches_only_its_own_job_ids(server, admin):
    admin.execute_command("ACL", "SETUSER", *setuser_args("producer", "t-pw", user="acme",
                                                          job_ids="acme-*"))
    r = redis.Redis(port=server.port, username="acme", password="t-pw")
    r.xadd(JOBS, {"job": b"x"})
    assert r.get("qworker:result:acme-1") is None
    r.set("qworker:cancelled:acme-1", 1)
    for denied in (lambda: r.get("qworker:result:globex-1"),
                   lambda: r.xrange("qworker:log:globex-1"),
                   lambda: r.set("qworker:cancelled:globex-1", 1)):
        with pytest.raises(NOPERM):
            denied()
    r.close()


# ---- worker ------------------------------------------------------------------------------
def test_worker_runs_the_consumer_group_commands(worker, admin):
    worker.xgroup_create(JOBS, "workers", id="0", mkstream=True)
    admin.xadd(JOBS, {"job": b"x"})
    ((_, [(entry, _)]),) = worker.xreadgroup("workers", "w1", {JOBS: ">"}, count=1)
    assert worker.xpending(JOBS, "workers")["pending"] == 1
    assert worker.xpending_range(JOBS, "workers", "-", "+", 10, consumername="w1")
    assert worker.xautoclaim(JOBS, "workers", "w2", 0, "0-0")[1][0][0] == entry
    assert worker.xclaim(JOBS, "workers", "w1", 0, [entry], justid=True) == [entry]
    assert worker.xlen(JOBS) == 1 and worker.xinfo_groups(JOBS)[0]["pending"] == 1
    assert worker.xack(JOBS, "workers", entry) == 1 and worker.xdel(JOBS, entry) == 1
    assert worker.exists("qworker:result:j1") == worker.exists("qworker:cancelled:j1") == 0
    assert worker.xrange("qworker:log:j1") == []
    worker.hset("qworker:worker:w1", mapping={"running": 0})
    worker.expire("qworker:worker:w1", 5)
    worker.delete("qworker:worker:w1")
    ps = worker.pubsub()
    ps.subscribe(CANCEL)
    assert ps.get_message(timeout=2)["type"] == "subscribe"
    ps.close()
    assert denials(admin) == []


def test_worker_runs_every_protocol_script(worker, admin):
    entry = pending_entry(admin, worker)
    base = ("workers", "w1", entry)
    run = lambda src, keys, *args: worker.register_script(src)(keys=keys, args=list(base) + list(args))  # noqa: E731
    assert run(RENEW, [JOBS]) == []

    def publish(log_id, event, final, result):   # as the publisher sends it: one batch
        batch = msgpack.packb([(entry, "j1", log_id, event, final, result)], use_bin_type=False)
        return worker.register_script(PUBLISH)(args=["qworker", "workers", "w1", 60, batch])

    assert publish("0-1", b"event0", 0, b"") == b"o"
    assert admin.xlen("qworker:log:j1") == 1
    assert run(DEAD_LETTER, [JOBS, DEAD], 0, 1000, "reason", "invalid_job") == 1
    assert publish("0-2", b"event1", 1, b"result") == b"o"
    assert admin.get("qworker:result:j1") == b"result" and admin.xlen(JOBS) == 0
    entry = pending_entry_again(admin, worker)
    assert worker.register_script(HANDOFF)(keys=[JOBS], args=["workers", "w1", entry, b"j",
                                                              "w1"]) == 1
    entry = worker.xreadgroup("workers", "w1", {JOBS: ">"}, count=1)[0][1][0][0].decode()
    assert worker.register_script(ACK)(keys=[JOBS], args=["workers", "w1", entry]) == 1
    assert admin.xlen(JOBS) == 0 and admin.xlen(DEAD) == 1
    assert denials(admin) == []


def pending_entry_again(admin: redis.Redis, worker: redis.Redis) -> str:
    admin.xadd(JOBS, {"job": b"j"})
    return worker.xreadgroup("workers", "w1", {JOBS: ">"}, count=1)[0][1][0][0].decode()


WORKER_REFUSED = {
    "FLUSHALL": lambda r: r.flushall(),
    "CONFIG SET": lambda r: r.config_set("maxmemory-policy", "allkeys-lru"),
    "KEYS": lambda r: r.keys("*"),
    "INFO": lambda r: r.info(),
    "SHUTDOWN": lambda r: r.execute_command("SHUTDOWN", "NOSAVE"),
    "DEL jobs": lambda r: r.delete(JOBS),
    "XTRIM jobs": lambda r: r.xtrim(JOBS, maxlen=0),
    "XGROUP DESTROY": lambda r: r.xgroup_destroy(JOBS, "workers"),
    "XRANGE dead (read dead letters)": lambda r: r.xrange(DEAD),
    "GET result": lambda r: r.get("qworker:result:j1"),
    "DEL result": lambda r: r.delete("qworker:result:j1"),
    "SET cancelled (fake a cancel)": lambda r: r.set("qworker:cancelled:j1", 1),
    "PUBLISH cancel": lambda r: r.publish(CANCEL, "j1"),
    "SET other key": lambda r: r.set("session:1", "x"),
    "EVAL (ad hoc script)": lambda r: r.eval("return 1", 0),
}


@pytest.mark.parametrize("name", WORKER_REFUSED)
def test_worker_is_refused_everything_else(worker, admin, name):
    with pytest.raises(NOPERM):
        WORKER_REFUSED[name](worker)
    assert denials(admin)[0][0] == "qworker-worker"


def test_a_script_cannot_widen_the_worker_role(worker):
    sha = worker.script_load("return redis.call('FLUSHALL')")
    with pytest.raises(redis.ResponseError, match="can't run this command"):
        worker.evalsha(sha, 1, JOBS)


# ---- a real job, each side with its own role ---------------------------------------------
def test_a_job_runs_end_to_end_with_producer_and_worker_users(server, admin, tiny_checkpoint):
    from qworker.config import EngineConfig
    from qworker.engine.engine import Engine
    from qworker.logs import configure_logging
    from qworker.worker.client import Client
    from qworker.worker.worker import Worker, WorkerSettings

    logs = io.StringIO()
    configure_logging("debug", json=True, stream=logs)
    engine = Engine(str(tiny_checkpoint("llama")), EngineConfig(max_num_seqs=4, num_kv_blocks=64),
                    device="cpu", dtype="float32")
    w = Worker(engine, WorkerSettings(RedisSettings.from_url(server.url("worker")), name="acl-w",
                                      lease_ms=5000))
    t = threading.Thread(target=w.run, kwargs={"install_signals": False}, daemon=True)
    t.start()
    try:
        with Client(server.url("producer")) as c:
            job_id = c.submit("Hello there", max_tokens=6, temperature=0.0, ignore_eos=True)
            events = list(c.stream(job_id, timeout=60))
            result = c.result(job_id, timeout=10)
            assert [e.seq for e in events] == list(range(len(events)))
            assert result.finish_reason == "length" and len(result.token_ids) == 6
            # the compose example producer (plain redis-py + msgpack) with the same user
            producer = load_compose_producer()
            r = redis.Redis.from_url(server.url("producer"))
            other = producer.submit(r, "Hi")
            evs = list(producer.stream(r, other, time.monotonic() + 60))
            assert evs[-1]["finished"] and [e["seq"] for e in evs] == list(range(len(evs)))
            r.close()
    finally:
        w.stop(drain_timeout=0)
        t.join(30)
        reset_logging()
    assert denials(admin) == [], "a role lacks a command the protocol uses"
    assert PASSWORDS["worker"] not in logs.getvalue() and "acl-w" in logs.getvalue()


def reset_logging() -> None:
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_qworker_handler", False)]:
        root.removeHandler(h)
    structlog.reset_defaults()


def load_compose_producer():
    spec = importlib.util.spec_from_file_location("compose_producer", COMPOSE / "producer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- refused credentials or permissions stop a worker at once -----------------------------
def worker_cli(url: str):
    """``qworker worker`` with a model that does not exist: an error about Redis means the
    worker stopped before it tried to load the model."""
    from click.testing import CliRunner

    from qworker.cli import main

    return CliRunner().invoke(main, ["worker", "--redis-url", url, "--device", "cpu",
                                     "--model", "/nonexistent/model"], catch_exceptions=False)


def test_a_wrong_password_stops_the_worker_at_once_with_a_pointer_to_the_docs(server):
    t0 = time.monotonic()
    res = worker_cli(server.url("worker", password="Wr0ng-Passw0rd"))
    assert res.exit_code == 2, res.output
    assert "refused the credentials" in res.output and "docs/security.md" in res.output
    assert "Wr0ng-Passw0rd" not in res.output and "qworker-worker:***@" in res.output
    assert "cannot load model" not in res.output and time.monotonic() - t0 < 10


def test_a_user_without_the_worker_rules_stops_the_worker_at_once(server, admin):
    admin.execute_command("ACL", "SETUSER", "half-worker", "reset", "on", ">half-pw",
                          "+ping", "+hello", "+xpending", "~qworker:*")
    res = worker_cli(f"redis://half-worker:half-pw@127.0.0.1:{server.port}/0")
    assert res.exit_code == 2, res.output
    assert "lacks a permission" in res.output and "xgroup|create" in res.output
    assert "python -m qworker.acl --role worker" in res.output and "docs/security.md" in res.output


def test_an_unreachable_redis_is_retried_not_fatal():
    res = worker_cli(f"redis://127.0.0.1:{free_port()}/0")
    assert res.exit_code == 1 and "cannot load model" in res.output   # it went on past Redis


class IdleEngine:
    """Just enough of the Engine API for a worker that never gets a job."""

    tokenizer, vocab_size, max_model_len = None, 100, 64

    def has_unfinished(self) -> bool:
        return False

    def capacity(self) -> int:
        return 4


@pytest.mark.parametrize("broken", ["password", "cancel channel"])
def test_a_running_worker_that_redis_refuses_stops_instead_of_retrying(server, admin, broken):
    from qworker.worker.connection import RedisAccessError
    from qworker.worker.worker import Worker, WorkerSettings

    if broken == "password":
        url = server.url("worker", password="not-the-password")
    else:   # the worker role minus SUBSCRIBE on the cancel channel: only one thread notices
        rules = [x for x in setuser_args("worker", "w-pw", user="no-cancel")
                 if x != "(+subscribe &qworker:cancel)"]
        admin.execute_command("ACL", "SETUSER", *rules)
        url = f"redis://no-cancel:w-pw@127.0.0.1:{server.port}/0"
    w = Worker(IdleEngine(), WorkerSettings(RedisSettings.from_url(url), name="refused",
                                            lease_ms=3000))
    raised: list[BaseException] = []
    t = threading.Thread(target=lambda: _run_catching(w, raised), daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(20)
    assert not t.is_alive(), "the worker kept retrying"
    assert time.monotonic() - t0 < 10
    (err,) = raised
    assert isinstance(err, RedisAccessError) and "docs/security.md" in str(err)
    assert ("subscribe" in str(err)) is (broken == "cancel channel")


def _run_catching(w, raised: list) -> None:
    try:
        w.run(install_signals=False)
    except Exception as e:  # noqa: BLE001
        raised.append(e)


# ---- TLS ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    if not has_openssl():
        pytest.skip("the openssl command is needed to make a test CA")
    d = tmp_path_factory.mktemp("tls")
    ca, _ = make_ca(d, "ca")
    wrong_ca, _ = make_ca(d, "wrong-ca")
    cert, key = make_cert(d, "server", "ca", server=True)
    client_cert, client_key = make_cert(d, "client", "ca", server=False)
    (d / "users.acl").write_text(acl_file(passwords=PASSWORDS))
    servers = {}
    for auth_clients in ("optional", "yes"):   # client certificates: optional, required
        port = free_port()
        servers[auth_clients] = Server(d, [
            "--save", "", "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca), "--tls-auth-clients", auth_clients,
            "--aclfile", str(d / "users.acl")], port=port)
    yield {"ca": ca, "wrong_ca": wrong_ca, "cert": client_cert, "key": client_key, **servers}
    for s in servers.values():
        s.kill()


def test_rediss_with_the_servers_ca_connects(tls):
    url = tls["optional"].url("producer", scheme="rediss", query=f"ssl_ca_certs={tls['ca']}")
    r = RedisSettings.from_url(url).connect()
    assert r.ping() and r.connection_pool.connection_class.__name__ == "SSLConnection"
    r.close()


@pytest.mark.parametrize("which", ["wrong_ca", None])
def test_rediss_with_a_wrong_or_no_ca_is_refused(tls, which):
    query = f"ssl_ca_certs={tls[which]}" if which else ""
    r = RedisSettings.from_url(tls["optional"].url("producer", scheme="rediss",
                                                   query=query)).connect()
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        r.ping()


def test_client_certificate_when_the_server_requires_one(tls):
    server, ca = tls["yes"], f"ssl_ca_certs={tls['ca']}"
    without = RedisSettings.from_url(server.url("producer", scheme="rediss", query=ca)).connect()
    with pytest.raises(redis.ConnectionError):
        without.ping()
    query = f"{ca}&ssl_certfile={tls['cert']}&ssl_keyfile={tls['key']}"
    with_cert = RedisSettings.from_url(server.url("producer", scheme="rediss", query=query))
    assert with_cert.connect().ping()


def test_client_submits_over_tls_as_the_producer_user(tls):
    from qworker.worker.client import Client

    query = f"ssl_ca_certs={tls['ca']}"
    with Client(tls["optional"].url("producer", scheme="rediss", query=query)) as c:
        c.submit("over TLS", max_tokens=1)
        with pytest.raises(NOPERM):
            c.r.flushall()
