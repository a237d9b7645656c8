"""``qworker worker``: serve jobs from the stream with one engine, or, with ``--gpus``,
supervise one worker process per GPU (or per group of ``--tensor-parallel-size`` GPUs)."""

from __future__ import annotations

import sys

import click

from qworker.worker.keys import DEFAULT_GROUP, DEFAULT_PREFIX


def _opt(*decls: str, env: str, **kw):
    return click.option(*decls, envvar=f"QWORKER_{env}", show_envvar=True,
                        show_default=True, **kw)


def redis_options(f):
    """--redis-url and --prefix, shared by every command that talks to Redis."""
    f = _opt("--prefix", env="PREFIX", default=DEFAULT_PREFIX, help="Key prefix.")(f)
    return _opt("--redis-url", env="REDIS_URL", default="redis://127.0.0.1:6379/0",
                help="redis://, rediss:// or unix:// URL.")(f)


@click.command()
@redis_options
@_opt("--model", env="MODEL", default="smollm2-135m-instruct",
      help="Model alias or Hugging Face checkpoint directory.")
@_opt("--name", env="NAME", default=None, help="Consumer name (default: host-pid); unique.")
@_opt("--group", env="GROUP", default=DEFAULT_GROUP, help="Consumer group.")
@_opt("--gpus", env="GPUS", default=None,
      help="'all' or GPU ids ('0,1'): run one worker process per GPU (per group of "
           "--tensor-parallel-size GPUs) under a supervisor that restarts them and drains "
           "them all on SIGTERM; each is its own consumer, {name}-gpu{i}. Default: one "
           "worker in this process.")
@_opt("--tensor-parallel-size", env="TENSOR_PARALLEL_SIZE", type=click.IntRange(min=1),
      default=1, help="GPUs of one host one model is sharded across (docs/scaling.md).")
@_opt("--device", env="DEVICE", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
      help="Where the model runs; auto: cuda when a GPU is visible.")
@_opt("--dtype", env="DTYPE", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
      default="auto",
      help="Weights and KV cache dtype; auto: bfloat16 on CUDA, float32 on the CPU.")
@_opt("--lease-ms", env="LEASE_MS", type=click.IntRange(min=200), default=30_000,
      help="A job idle this long without renewal is reclaimed by another worker.")
@_opt("--max-deliveries", env="MAX_DELIVERIES", type=click.IntRange(min=1), default=3,
      help="Deliveries before a job is dead-lettered.")
@_opt("--drain-timeout", env="DRAIN_TIMEOUT", type=click.FloatRange(min=0), default=30.0,
      help="Seconds to finish running jobs after SIGTERM before handing them back.")
@_opt("--result-ttl", env="RESULT_TTL", type=click.IntRange(min=1), default=86_400,
      help="Seconds results and replay logs are kept.")
@_opt("--max-num-seqs", env="MAX_NUM_SEQS", type=click.IntRange(min=1), default=256,
      help="Most requests running at once.")
@_opt("--max-num-batched-tokens", env="MAX_NUM_BATCHED_TOKENS", type=click.IntRange(min=1),
      default=2048, help="Token budget of one step (decodes + prefill chunks).")
@_opt("--block-size", env="BLOCK_SIZE", type=click.Choice(["8", "16", "32", "64", "128"]),
      default="16", help="Tokens per KV-cache block.")
@_opt("--num-kv-blocks", env="NUM_KV_BLOCKS", type=click.IntRange(min=1), default=None,
      help="KV pool size (default: sized from memory).")
@_opt("--enable-prefix-caching/--disable-prefix-caching", env="PREFIX_CACHING", default=True,
      help="Reuse the KV blocks of identical prompt prefixes.")
@_opt("--max-model-len", env="MAX_MODEL_LEN", type=click.IntRange(min=2), default=None,
      help="Longest prompt + output (default: the model's own limit).")
@_opt("--gpu-memory-utilization", env="GPU_MEMORY_UTILIZATION",
      type=click.FloatRange(0.05, 0.99), default=0.90,
      help="Fraction of GPU memory for weights + KV cache.")
@_opt("--load-format", env="LOAD_FORMAT", type=click.Choice(["auto", "dummy"]), default="auto",
      help="dummy: random weights of the checkpoint's shape (benchmarks).")
@_opt("--async-scheduling", env="ASYNC_SCHEDULING", type=click.Choice(["auto", "on", "off"]),
      default="auto",
      help="Launch each step before reading the previous one's tokens (overlaps the host "
           "with the GPU); auto: on for CUDA without tensor parallelism.")
@_opt("--metrics-port", env="METRICS_PORT", type=click.IntRange(0, 65535), default=None,
      help="Serve Prometheus /metrics and /healthz on this port (0: any free port; with "
           "--gpus the worker of group i serves on PORT+i). Default: off.")
@_opt("--metrics-host", env="METRICS_HOST", default="0.0.0.0",
      help="Address the metrics server listens on.")
@_opt("--log-format", env="LOG_FORMAT", type=click.Choice(["auto", "json", "console"]),
      default="auto", help="auto: readable on a terminal, JSON lines otherwise.")
@_opt("--log-level", env="LOG_LEVEL", type=click.Choice(["debug", "info", "warning", "error"]),
      default="info", help="Lowest level logged.")
def worker(redis_url, prefix, model, name, group, gpus, tensor_parallel_size, device, dtype,
           lease_ms, max_deliveries, drain_timeout, result_ttl, max_num_seqs,
           max_num_batched_tokens, block_size, num_kv_blocks, enable_prefix_caching,
           max_model_len, gpu_memory_utilization, load_format, async_scheduling, metrics_port,
           metrics_host, log_format, log_level):
    """Serve jobs from the Redis stream until SIGTERM (then drain and hand back)."""
    from qworker.config import EngineConfig
    from qworker.logs import configure_logging, get_logger, redact_url
    from qworker.metrics import MetricsServer, WorkerMetrics
    from qworker.worker.connection import RedisAccessError, RedisSettings
    from qworker.worker.keys import Keys
    from qworker.worker.worker import Worker, WorkerCrashed, WorkerSettings, check_redis_access

    configure_logging(log_level, json={"auto": None, "json": True, "console": False}[log_format])
    log = get_logger("qworker.cli")
    try:
        settings = WorkerSettings(RedisSettings.from_url(redis_url), keys=Keys(prefix, group),
                                  lease_ms=lease_ms, max_deliveries=max_deliveries,
                                  drain_timeout=drain_timeout, result_ttl_s=result_ttl)
        if name:
            settings.name = name
        config = EngineConfig(max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens,
                              block_size=int(block_size), num_kv_blocks=num_kv_blocks,
                              enable_prefix_caching=enable_prefix_caching,
                              max_model_len=max_model_len,
                              gpu_memory_utilization=gpu_memory_utilization,
                              load_format=load_format,
                              tensor_parallel_size=tensor_parallel_size,
                              async_scheduling={"auto": None, "on": True,
                                                "off": False}[async_scheduling])
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if gpus is not None:
        _supervise(gpus, name, tensor_parallel_size, drain_timeout, metrics_port)
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise click.BadParameter("--device cuda, but no CUDA device is visible",
                                     param_hint="--device")
    try:   # before the model loads: a wrong password or ACL must not wait for it
        unreachable = check_redis_access(settings)
    except RedisAccessError as e:
        raise AccessRefused(str(e)) from None
    if unreachable:
        log.warning("redis unreachable; the worker starts anyway and keeps retrying",
                    redis=redact_url(redis_url), error=unreachable)
    metrics = WorkerMetrics(worker=settings.name, model=str(model))
    if metrics_port is not None:
        try:
            port = MetricsServer(metrics, metrics_port, metrics_host).start()
        except OSError as e:
            raise click.ClickException(f"cannot serve metrics on {metrics_host}:{metrics_port}: "
                                       f"{e}") from None
        log.info("serving metrics", worker=settings.name,
                 url=f"http://{metrics_host}:{port}/metrics")
    from qworker.engine.engine import Engine
    try:
        engine = Engine(model, config, device=device, dtype=dtype)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise click.ClickException(f"cannot load model {model!r}: {e}") from None
    try:
        Worker(engine, settings, model_name=str(model), metrics=metrics).run()
    except RedisAccessError as e:
        raise AccessRefused(str(e)) from None
    except WorkerCrashed as e:   # logged with its traceback where it happened; exit 1, so
        raise click.ClickException(f"{e}; the worker stopped") from None   # it is restarted
    finally:
        engine.close()


class AccessRefused(click.ClickException):
    """Redis refused the credentials or a command: exit status 2, as for a bad option (a
    ``--gpus`` supervisor then stops instead of restarting the worker forever)."""

    exit_code = 2


def _supervise(gpus: str, name: str | None, tensor_parallel_size: int, drain_timeout: float,
               metrics_port: int | None) -> None:
    """Become the supervisor of one worker process per GPU group (never returns)."""
    from qworker.worker.supervisor import Supervisor, plan_children, worker_argv

    try:
        children = plan_children(worker_argv(sys.argv[2:], drop=("--gpus", "--name",
                                                                 "--metrics-port")),
                                 gpus, name, tensor_parallel_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--gpus") from None
    for i, child in enumerate(children):     # one metrics port each (0: each picks one)
        if metrics_port is not None:
            child.env["QWORKER_METRICS_PORT"] = str(metrics_port + i if metrics_port else 0)
        else:
            child.env.pop("QWORKER_METRICS_PORT", None)
    sys.exit(Supervisor(children, stop_timeout_s=drain_timeout + 30).run())
