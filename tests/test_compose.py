"""compose/: the compose file is valid (``docker compose config`` where the docker CLI
exists), its pieces fit together, and its Redis settings (redis.conf, users.acl through
start.sh) take effect on a real redis-server: ACL users, AOF, noeviction."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry
from secure_redis import COMPOSE, PASSWORDS, Server, wait_until

from qworker.acl import ROLES, password_env, username

PASSWORD_ENV = {password_env(role): PASSWORDS[role] for role in ROLES}


def compose_cli() -> list[str] | None:
    """``docker compose`` (v2 plugin) or ``docker-compose`` (v1), whichever works here."""
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWORKER_")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


# ---- the compose file --------------------------------------------------------------------
def test_docker_compose_config_accepts_the_file():
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    out = subprocess.run([*cli, "--env-file", ".env.example", "-f", "docker-compose.yml",
                          "config"], cwd=COMPOSE, capture_output=True, text=True,
                         env=clean_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert set(config["services"]) == {"redis", "worker", "prometheus", "producer"}
    assert "change-me-worker@redis:6379" in config["services"]["worker"]["environment"][
        "QWORKER_REDIS_URL"]


def test_docker_compose_config_refuses_a_missing_password(tmp_path):
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    (tmp_path / "empty.env").write_text("")
    out = subprocess.run([*cli, "--env-file", str(tmp_path / "empty.env"), "-f",
                          "docker-compose.yml", "config"], cwd=COMPOSE, capture_output=True,
                         text=True, env=clean_env(), timeout=60)
    assert out.returncode != 0 and "QWORKER_" in out.stderr


def test_the_worker_reserves_an_nvidia_gpu_and_exposes_metrics(compose):
    worker = compose["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert worker["build"] == {"context": "..", "dockerfile": "compose/Dockerfile"}
    port = int(worker["environment"]["QWORKER_METRICS_PORT"])
    assert "/healthz" in " ".join(worker["healthcheck"]["test"]) and str(port) in str(
        worker["healthcheck"]["test"])
    prom = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (sd,) = prom["scrape_configs"][0]["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["port"] == port


def test_redis_runs_start_sh_with_the_settings_and_users(compose):
    redis_svc = compose["services"]["redis"]
    assert redis_svc["image"].startswith("redis:7")
    assert redis_svc["command"] == ["sh", "/usr/local/etc/redis/start.sh"]
    assert "./redis:/usr/local/etc/redis:ro" in redis_svc["volumes"]
    assert set(redis_svc["environment"]) == set(PASSWORD_ENV)


def test_every_variable_the_stack_needs_is_in_env_example(compose):
    text = (COMPOSE / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{(QWORKER_[A-Z_]+)", text))
    example = {line.split("=", 1)[0] for line in (COMPOSE / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert used <= example and set(PASSWORD_ENV) <= example


def test_services_connect_as_their_own_acl_users(compose):
    env = {name: svc.get("environment", {}) for name, svc in compose["services"].items()}
    assert env["worker"]["QWORKER_REDIS_URL"].startswith(f"redis://{username('worker')}:")
    assert env["producer"]["QWORKER_REDIS_URL"].startswith(f"redis://{username('producer')}:")


def test_the_dockerfile_installs_the_project_and_runs_the_worker():
    text = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\S+cuda\S+", text, re.M)
    assert "FROM ${BASE_IMAGE}" in text
    assert 'ENTRYPOINT ["qworker", "worker"]' in text and "pip install" in text
    ignore = (COMPOSE / "Dockerfile.dockerignore").read_text()
    assert "!qworker/" in ignore and "!kernels/" in ignore


# ---- the same Redis settings on a real redis-server --------------------------------------
def start_compose_redis(workdir, env: dict[str, str], *extra: str) -> Server:
    env = clean_env(QWORKER_ACL_FILE=str(workdir / "users.acl"), **env)
    return Server(workdir, ["--save", "", *extra], cmd=["sh", str(COMPOSE / "redis" / "start.sh")],
                  env=env)


@pytest.fixture
def compose_redis(tmp_path):
    s = start_compose_redis(tmp_path, PASSWORD_ENV)
    yield s
    s.kill()


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def test_start_sh_refuses_to_start_without_passwords(tmp_path):
    env = clean_env(QWORKER_ACL_FILE=str(tmp_path / "users.acl"))
    out = subprocess.run(["sh", str(COMPOSE / "redis" / "start.sh"), "--port", "0"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "QWORKER_PRODUCER_PASSWORD is not set" in out.stderr


def test_start_sh_writes_only_password_hashes(compose_redis, tmp_path):
    acl = (tmp_path / "users.acl").read_text()
    assert not any(pw in acl for pw in PASSWORDS.values()) and "sha256" not in acl
    assert oct((tmp_path / "users.acl").stat().st_mode & 0o777) == "0o600"


def test_compose_redis_has_aof_noeviction_and_acl_users(compose_redis):
    admin = compose_redis.client("admin")
    conf = {_s(k): _s(v) for k, v in admin.config_get("*").items()}
    assert conf["appendonly"] == "yes" and conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction" and conf["acl-pubsub-default"] == "resetchannels"
    assert sorted(map(_s, admin.acl_users())) == sorted(["default", *map(username, ROLES)])
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=compose_redis.port, retry=Retry(NoBackoff(), 0)).ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        compose_redis.client("producer").flushall()


def test_compose_redis_keeps_accepted_jobs_across_a_crash(tmp_path):
    server = start_compose_redis(tmp_path, PASSWORD_ENV)
    try:
        producer = server.client("producer")
        ids = [producer.xadd("qworker:jobs", {"job": f"job-{i}".encode()}) for i in range(20)]
        assert list((tmp_path / "appendonlydir").glob("*.aof"))
        server.kill()                    # SIGKILL: no shutdown save, the AOF is all there is
        server.start()
        admin = server.client("admin")
        wait_until(lambda: admin.ping(), what="redis to load its AOF")
        assert [i for i, _ in admin.xrange("qworker:jobs")] == ids
    finally:
        server.kill()


def test_compose_redis_refuses_writes_at_maxmemory_instead_of_evicting(compose_redis):
    admin, producer = compose_redis.client("admin"), compose_redis.client("producer")
    admin.xadd("qworker:log:kept", {"event": b"x"}, id="0-1")
    used = admin.info("memory")["used_memory"]
    admin.config_set("maxmemory", used + 2_000_000)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        for _ in range(1000):
            producer.xadd("qworker:jobs", {"job": os.urandom(100_000)})
    assert admin.exists("qworker:log:kept") and admin.xlen("qworker:jobs") > 0
