"""``qworker submit``, ``qworker status`` and ``qworker dead-letter list|retry``."""

from __future__ import annotations

import json
import sys
import time

import click

from qworker.logs import redact_url
from qworker.worker.cli_worker import redis_options
from qworker.worker.connection import REDIS_ERRORS


def _client(redis_url: str, prefix: str):
    from qworker.worker.client import Client

    try:
        c = Client(redis_url, prefix)
        c.r.ping()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--redis-url") from None
    except REDIS_ERRORS as e:
        raise click.ClickException(f"cannot reach Redis at {redact_url(redis_url)}: {e}") \
            from None
    return c


def _text(v: object) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


@click.command()
@click.argument("prompt")
@redis_options
@click.option("--chat", is_flag=True, help="Send PROMPT as one user message (chat template).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--top-p", type=float, default=1.0)
@click.option("--top-k", type=int, default=0)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--param", "extra", multiple=True, metavar="KEY=JSON",
              help="Any other SamplingParams field, e.g. --param min_tokens=4.")
@click.option("--priority", type=int, default=0, help="Lower is served first.")
@click.option("--deadline", type=click.FloatRange(min=0), default=None,
              help="Seconds from now after which the job expires.")
@click.option("--job-id", default=None)
@click.option("--timeout", type=click.FloatRange(min=0), default=600.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
def submit(prompt, redis_url, prefix, chat, max_tokens, temperature, top_p, top_k, seed, stop,
           extra, priority, deadline, job_id, timeout, as_json):
    """Enqueue PROMPT and stream the generated text to the terminal."""
    params = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  seed=seed, stop=list(stop))
    for kv in extra:
        key, sep, val = kv.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=JSON, got {kv!r}", param_hint="--param")
        try:
            params[key] = json.loads(val)
        except json.JSONDecodeError:
            params[key] = val
    c = _client(redis_url, prefix)
    kw = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    try:
        jid = c.submit(job_id=job_id, priority=priority, deadline=deadline, **kw, **params)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if not as_json:
        click.echo(f"job {jid}", err=True)
    last = None
    try:
        for ev in c.stream(jid, timeout=timeout):
            last = ev
            if as_json:
                click.echo(json.dumps({k: getattr(ev, k) for k in ev.__slots__}))
            else:
                click.echo(ev.text, nl=False)
                sys.stdout.flush()
    except TimeoutError as e:
        raise click.ClickException(str(e)) from None
    if not as_json:
        click.echo()
        click.echo(f"[{last.finish_reason}] {last.usage or ''}"
                   + (f" error: {last.error}" if last.error else ""), err=True)
    if last.error:
        sys.exit(1)


@click.command()
@redis_options
@click.option("--json", "as_json", is_flag=True)
def status(redis_url, prefix, as_json):
    """Stream length, pending per consumer, live workers and dead letters."""
    from qworker.worker.protocol import unpack

    c = _client(redis_url, prefix)
    r, k = c.r, c.keys
    info = {"stream": k.jobs, "length": r.xlen(k.jobs), "dead_letters": r.xlen(k.dead),
            "groups": [], "workers": []}
    try:
        for g in r.xinfo_groups(k.jobs):
            name = _text(g["name"])
            pend = r.xpending(k.jobs, name)
            info["groups"].append({"group": name, "pending": g["pending"], "lag": g.get("lag"),
                                   "consumers": {_text(x["name"]): x["pending"]
                                                 for x in pend.get("consumers", [])}})
    except REDIS_ERRORS as e:
        raise click.ClickException(str(e)) from None
    except Exception:  # no stream yet
        pass
    for key in sorted(r.scan_iter(match=k.worker_pattern, count=100)):
        h = {_text(a): b for a, b in r.hgetall(key).items()}
        w = {a: _text(b) for a, b in h.items() if a != "jobs"}
        w["name"] = _text(key)[len(k.worker("")):]
        w["jobs"] = unpack(h["jobs"]) if "jobs" in h else []
        info["workers"].append(w)
    if as_json:
        click.echo(json.dumps(info, default=str))
        return
    click.echo(f"{info['stream']}: {info['length']} entries, {info['dead_letters']} dead letters")
    for g in info["groups"]:
        click.echo(f"group {g['group']}: {g['pending']} pending, lag {g['lag']}")
        for name, n in g["consumers"].items():
            click.echo(f"  {name}: {n} pending")
    click.echo(f"{len(info['workers'])} live worker(s)")
    for w in info["workers"]:
        click.echo(f"  {w['name']}: model={w.get('model')} running={w.get('running')} "
                   f"waiting={w.get('waiting')} kv={w.get('kv_usage')} tok/s={w.get('tok_s')} "
                   f"jobs={w['jobs']}")


@click.group("dead-letter")
def dead_letter():
    """Inspect and retry dead-lettered jobs."""


@dead_letter.command("list")
@redis_options
@click.option("--count", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dl_list(redis_url, prefix, count, as_json):
    """The newest dead letters: entry, job id, reason, deliveries, worker."""
    c = _client(redis_url, prefix)
    for entry, f in c.r.xrevrange(c.keys.dead, count=count):
        row = {_text(a): _text(b) for a, b in f.items() if a != b"job"}
        row["entry"] = _text(entry)
        row["bytes"] = len(f.get(b"job", b""))
        if as_json:
            click.echo(json.dumps(row))
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S",
                                 time.localtime(int(row.get("ts_ms", 0)) / 1000))
            click.echo(f"{row['entry']} {when} id={row.get('id') or '-'} "
                       f"reason={row.get('reason')} deliveries={row.get('deliveries')} "
                       f"worker={row.get('worker')}: {row.get('message')}")


@dead_letter.command("retry")
@redis_options
@click.argument("entries", nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Retry every dead letter.")
def dl_retry(redis_url, prefix, entries, retry_all):
    """Re-enqueue dead letters (by entry id, or --all); their old result and log go."""
    if not entries and not retry_all:
        raise click.UsageError("give dead-letter entry ids, or --all")
    c = _client(redis_url, prefix)
    rows = c.r.xrange(c.keys.dead) if retry_all else \
        [row for e in entries for row in c.r.xrange(c.keys.dead, e, e)]
    missing = set(entries) - {_text(e) for e, _ in rows}
    if missing:
        raise click.ClickException(f"no dead letter with entry id(s) {sorted(missing)}")
    for entry, f in rows:
        jid = _text(f.get(b"id", b""))
        pipe = c.r.pipeline(transaction=True)
        if jid:
            pipe.delete(c.keys.result(jid), c.keys.log(jid), c.keys.cancelled(jid))
        pipe.xadd(c.keys.jobs, {"job": f.get(b"job", b"")})
        pipe.xdel(c.keys.dead, entry)
        pipe.execute()
        click.echo(f"retried {_text(entry)} (job {jid or '-'})")
