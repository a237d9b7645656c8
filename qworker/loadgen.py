"""``qworker bench``: a load generator against a live pool of workers.

Sends N jobs through ``qworker.Client`` (each followed with ``stream()`` on its own
thread) either at Poisson arrivals (``--rate``), under a cap of requests in flight
(``--concurrency``), both, or all at once; prompts are random token ids of a length range
or one text. Prints a summary as vLLM's serving benchmark does (throughput, TTFT, TPOT,
ITL, E2EL; statistics in ``qworker.latency``), optionally as JSON and as a PNG plot.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import click

from qworker.latency import RequestTiming, bin_seconds, summarize, throughput_series
from qworker.worker.cli_worker import redis_options


def parse_range(text: str, what: str) -> tuple[int, int]:
    """``"128"`` -> (128, 128); ``"32,256"`` -> (32, 256)."""
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 1 <= parts[0] <= parts[1]:
        raise click.BadParameter(f"expected LEN or LO,HI with 1 <= LO <= HI, got {text!r}",
                                 param_hint=what)
    return parts[0], parts[1]


def make_jobs(n: int, input_len: tuple[int, int], output_len: tuple[int, int],
              prompt: str | None, chat: bool, vocab_size: int, seed: int,
              **params: object) -> list[dict]:
    """``n`` keyword sets for ``Client.submit``: random token prompts (ids drawn from
    ``[0, vocab_size)``) or ``prompt`` (as one chat message with ``chat``)."""
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        kw: dict = {"max_tokens": rng.randint(*output_len), **params}
        if prompt is None:
            kw["prompt_token_ids"] = [rng.randrange(vocab_size)
                                      for _ in range(rng.randint(*input_len))]
        elif chat:
            kw["messages"] = [{"role": "user", "content": prompt}]
        else:
            kw["prompt"] = prompt
        jobs.append(kw)
    return jobs


def run_load(client, jobs: list[dict], rate: float | None, concurrency: int | None,
             timeout: float, seed: int = 0, progress=None) -> tuple[list[RequestTiming], float]:
    """Send ``jobs`` and follow each to its end; returns (timings in job order, start).

    Arrivals: exponential gaps of mean ``1/rate`` (None: no gaps); at most ``concurrency``
    in flight (None: no cap). A request's clock starts when it is actually sent."""
    rng = random.Random(seed + 1)
    slots = threading.BoundedSemaphore(concurrency) if concurrency else None
    timings = [RequestTiming(sent=0.0) for _ in jobs]
    threads = []

    def one(i: int) -> None:
        t = timings[i]
        try:
            t.sent = time.perf_counter()
            job_id = client.submit(**jobs[i])
            for ev in client.stream(job_id, timeout=timeout):
                t.add(time.perf_counter(), len(ev.token_ids))
                if ev.finished:
                    t.finish_reason = ev.finish_reason
                    t.prompt_tokens = (ev.usage or {}).get("prompt_tokens", 0)
                    if ev.error:
                        t.error = str(ev.error.get("code", "error"))
        except TimeoutError:
            t.error = "timeout"
        except Exception as e:    # Redis gone, bad job: counted, the run goes on
            t.error = type(e).__name__
        finally:
            if slots is not None:
                slots.release()
            if progress is not None:
                progress.update(1)

    start = time.perf_counter()
    next_at = start
    for i in range(len(jobs)):
        if rate and i:
            next_at += rng.expovariate(rate)
            time.sleep(max(0.0, next_at - time.perf_counter()))
        if slots is not None:
            slots.acquire()
        th = threading.Thread(target=one, args=(i,), daemon=True)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return timings, start


def format_summary(s: dict, percentiles: tuple[float, ...]) -> str:
    """The summary table (vLLM's layout)."""
    rows = [("Successful requests:", s["completed"]), ("Failed requests:", s["failed"])]
    rows += [(f"  {code}:", n) for code, n in sorted(s["errors"].items())]
    rows += [("Benchmark duration (s):", f"{s['duration_s']:.2f}"),
             ("Total input tokens:", s["total_input_tokens"]),
             ("Total generated tokens:", s["total_output_tokens"]),
             ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
             ("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
             ("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")]
    lines = [" Serving Benchmark Result ".center(50, "=")]
    lines += [f"{k:<40}{v:<10}" for k, v in rows]
    for key, title in (("ttft_ms", "Time to First Token"),
                       ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        short = key.split("_")[0].upper()
        lines.append(f" {title} ".center(50, "-"))
        d = s[key]
        rows = [("Mean", "mean")] + ([] if 50 in percentiles else [("Median", "median")])
        for label, k in rows + [(f"P{q:g}", f"p{q:g}") for q in percentiles]:
            v = d.get(k)
            lines.append(f"{f'{label} {short} (ms):':<40}{'-' if v is None else f'{v:.2f}':<10}")
    lines.append("=" * 50)
    return "\n".join(lines)


@click.command()
@redis_options
@click.option("-n", "--num-requests", type=click.IntRange(min=1), default=100,
              show_default=True, help="Jobs to send.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Poisson arrival rate, requests/s (default: all at once).")
@click.option("--concurrency", type=click.IntRange(min=1), default=None,
              help="Most requests in flight at once (default: no cap).")
@click.option("--input-len", default="128", show_default=True, metavar="LEN|LO,HI",
              help="Random prompt length in tokens (uniform in LO..HI).")
@click.option("--output-len", default="128", show_default=True, metavar="LEN|LO,HI",
              help="max_tokens of each job (uniform in LO..HI).")
@click.option("--prompt", default=None, help="Send this text instead of random tokens.")
@click.option("--chat", is_flag=True, help="Send --prompt as one user message.")
@click.option("--vocab-size", type=click.IntRange(min=2), default=32_000, show_default=True,
              help="Random prompt token ids are drawn from [0, N): keep N <= the model's.")
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
              help="Generate exactly max_tokens (ignore end-of-sequence).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Workload and arrivals.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600.0,
              show_default=True, help="Seconds one job may take before it counts as failed.")
@click.option("--percentiles", default="50,99", show_default=True,
              help="Comma list of percentiles to report.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the summary, settings and per-request timings here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Save throughput over time and latency distributions as a PNG "
                   "(needs matplotlib: pip install 'qworker[plot]').")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def bench(redis_url, prefix, num_requests, rate, concurrency, input_len, output_len, prompt,
          chat, vocab_size, ignore_eos, temperature, seed, timeout, percentiles, json_path,
          plot_path, progress):
    """Load a live worker pool with N jobs and report throughput and latency."""
    from qworker.worker.cli_admin import _client

    try:
        pcts = tuple(float(q) for q in percentiles.split(","))
    except ValueError:
        pcts = (-1.0,)
    if not all(0 <= q <= 100 for q in pcts):
        raise click.BadParameter(f"expected numbers in [0, 100], got {percentiles!r}",
                                 param_hint="--percentiles")
    if chat and prompt is None:
        raise click.UsageError("--chat needs --prompt")
    if plot_path:
        from qworker.bench_plot import require_matplotlib
        require_matplotlib()                 # fail now, not after the run
    jobs = make_jobs(num_requests, parse_range(input_len, "--input-len"),
                     parse_range(output_len, "--output-len"), prompt, chat, vocab_size, seed,
                     temperature=temperature, ignore_eos=ignore_eos)
    client = _client(redis_url, prefix)
    try:
        from qworker.worker.streaming import build_job
        build_job(**jobs[0])                 # a bad parameter is a usage error, once
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if not any(True for _ in client.r.scan_iter(match=client.keys.worker_pattern, count=100)):
        click.echo(f"warning: no live worker under prefix {prefix!r}: jobs wait for one",
                   err=True)
    mode = (f"Poisson {rate:g} req/s" if rate else "all at once") + \
        (f", at most {concurrency} in flight" if concurrency else "")
    click.echo(f"bench: {num_requests} jobs, {mode}", err=True)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=num_requests, desc="requests", unit="req", file=click.get_text_stream(
            "stderr"), dynamic_ncols=True)
    try:
        timings, start = run_load(client, jobs, rate, concurrency, timeout, seed, bar)
    finally:
        if bar is not None:
            bar.close()
        client.close()
    end = max([start] + [t.chunks[-1][0] for t in timings if t.chunks])
    summary = summarize(timings, end - start, pcts)
    click.echo(format_summary(summary, pcts))
    settings = dict(num_requests=num_requests, rate=rate, concurrency=concurrency,
                    input_len=input_len, output_len=output_len, prompt=prompt, chat=chat,
                    vocab_size=vocab_size, ignore_eos=ignore_eos, temperature=temperature,
                    seed=seed, prefix=prefix)
    if json_path:
        bin_s = bin_seconds(summary["duration_s"])
        Path(json_path).write_text(json.dumps({
            "settings": settings, "summary": summary,
            "throughput_series": throughput_series(timings, start, bin_s),
            "requests": [{"sent_s": t.sent - start, "ttft_ms": _ms(t.ttft),
                          "tpot_ms": _ms(t.tpot), "e2el_ms": _ms(t.e2el),
                          "prompt_tokens": t.prompt_tokens, "output_tokens": t.output_tokens,
                          "finish_reason": t.finish_reason, "error": t.error}
                         for t in timings]}, indent=1))
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        from qworker.bench_plot import plot
        plot(plot_path, timings, start, summary, f"qworker bench: {num_requests} jobs, {mode}")
        click.echo(f"wrote {plot_path}", err=True)
    if summary["completed"] == 0:
        raise SystemExit(1)


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1000
