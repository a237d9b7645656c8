"""``qworker worker``: serve jobs from the stream with one engine."""

from __future__ import annotations

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
@_opt("--device", env="DEVICE", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@_opt("--dtype", env="DTYPE", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
      default="auto")
@_opt("--lease-ms", env="LEASE_MS", type=click.IntRange(min=200), default=30_000,
      help="A job idle this long without renewal is reclaimed by another worker.")
@_opt("--max-deliveries", env="MAX_DELIVERIES", type=click.IntRange(min=1), default=3,
      help="Deliveries before a job is dead-lettered.")
@_opt("--drain-timeout", env="DRAIN_TIMEOUT", type=click.FloatRange(min=0), default=30.0,
      help="Seconds to finish running jobs after SIGTERM before handing them back.")
@_opt("--result-ttl", env="RESULT_TTL", type=click.IntRange(min=1), default=86_400,
      help="Seconds results and replay logs are kept.")
@_opt("--max-num-seqs", env="MAX_NUM_SEQS", type=click.IntRange(min=1), default=256)
@_opt("--max-num-batched-tokens", env="MAX_NUM_BATCHED_TOKENS", type=click.IntRange(min=1),
      default=2048)
@_opt("--block-size", env="BLOCK_SIZE", type=click.Choice(["8", "16", "32", "64", "128"]),
      default="16")
@_opt("--num-kv-blocks", env="NUM_KV_BLOCKS", type=click.IntRange(min=1), default=None,
      help="KV pool size (default: sized from memory).")
@_opt("--enable-prefix-caching/--disable-prefix-caching", env="PREFIX_CACHING", default=True)
@_opt("--max-model-len", env="MAX_MODEL_LEN", type=click.IntRange(min=2), default=None)
@_opt("--gpu-memory-utilization", env="GPU_MEMORY_UTILIZATION",
      type=click.FloatRange(0.05, 0.99), default=0.90)
@_opt("--load-format", env="LOAD_FORMAT", type=click.Choice(["auto", "dummy"]), default="auto",
      help="dummy: random weights of the checkpoint's shape (benchmarks).")
@_opt("--log-format", env="LOG_FORMAT", type=click.Choice(["auto", "json", "console"]),
      default="auto")
@_opt("--log-level", env="LOG_LEVEL", type=click.Choice(["debug", "info", "warning", "error"]),
      default="info")
def worker(redis_url, prefix, model, name, group, device, dtype, lease_ms, max_deliveries,
           drain_timeout, result_ttl, max_num_seqs, max_num_batched_tokens, block_size,
           num_kv_blocks, enable_prefix_caching, max_model_len, gpu_memory_utilization,
           load_format, log_format, log_level):
    """Serve jobs from the Redis stream until SIGTERM (then drain and hand back)."""
    from qworker.config import EngineConfig
    from qworker.logs import configure_logging
    from qworker.worker.connection import RedisSettings
    from qworker.worker.keys import Keys
    from qworker.worker.worker import Worker, WorkerSettings

    configure_logging(log_level, json={"auto": None, "json": True, "console": False}[log_format])
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
                              load_format=load_format)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise click.BadParameter("--device cuda, but no CUDA device is visible",
                                     param_hint="--device")
    from qworker.engine.engine import Engine
    try:
        engine = Engine(model, config, device=device, dtype=dtype)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise click.ClickException(f"cannot load model {model!r}: {e}") from None
    Worker(engine, settings, model_name=str(model)).run()
