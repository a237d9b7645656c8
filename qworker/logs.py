"""Structured logging: configured once, one bound logger per job, one summary line per job.

``configure_logging()`` sets up structlog and the standard library's root logger together,
so lines from qworker and from libraries (redis, transformers) come out in one format:
JSON when stderr is not a terminal (containers, CI, log shippers), a readable console when
it is. One engine loop serves many jobs at once, so the job id is bound on a per-job
logger (``job_logger``), not on the thread or a context variable.

Credentials never reach the output: the last processor before rendering masks password
fields and the password of every URL (``redis://user:***@host``), wherever it appears.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import structlog

MASK = "***"
_SECRET_KEYS = frozenset({"password", "passwd", "pwd", "secret", "api_key", "apikey", "auth",
                          "authorization", "credentials", "access_token", "redis_password"})
# userinfo of a URL: scheme://user:password@host. The password runs to the last "@" of the
# non-blank run, so a raw "@" inside a password is still masked whole.
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*):(?P<pw>\S*)@")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:password|pass|pwd)=)[^&#\s]*", re.IGNORECASE)
_HANDLER_MARK = "_qworker_handler"


def redact_url(url: str) -> str:
    """Mask the password of a URL: ``redis://user:pass@host/0`` -> ``redis://user:***@host/0``.

    Also masks ``?password=...`` query parameters (``unix://`` URLs carry it there). Works
    on any text, so a message that quotes a URL is safe to log too.
    """
    if "://" in url:
        url = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", url)
    if "=" in url:
        url = _QUERY_PASSWORD.sub(lambda m: m["head"] + MASK, url)
    return url


def _is_secret_key(key: str) -> bool:
    k = key.lower()
    return k in _SECRET_KEYS or k.endswith(("_password", "_secret", "_passwd"))


def _scrub(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact_url(value) if ("://" in value or "=" in value) else value
    if depth >= 3:
        return value
    if isinstance(value, dict):
        return {k: MASK if isinstance(k, str) and _is_secret_key(k) and v else _scrub(v, depth + 1)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v, depth + 1) for v in value)
    return value


def redact_secrets(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: mask secret-named fields, and URL passwords in every string."""
    for key, value in event_dict.items():
        if _is_secret_key(key) and value:
            event_dict[key] = MASK
        elif isinstance(value, (str, dict, list, tuple)):
            event_dict[key] = _scrub(value)
    return event_dict


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    return number


def configure_logging(level: str | int = "info", json: bool | None = None,
                      stream: TextIO | None = None) -> None:
    """Set up structlog and stdlib logging for the whole process.

    ``json=None`` picks JSON lines when ``stream`` (default stderr) is not a terminal and
    the readable (coloured) console format when it is. Calling it again replaces the
    previous set-up (tests and the CLI may both call it).
    """
    stream = stream or sys.stderr
    number = _level_number(level)
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        renderer: Any = structlog.processors.JSONRenderer()
    else:
        # plain tracebacks: a rich traceback would print local variables (passwords).
        renderer = structlog.dev.ConsoleRenderer(
            colors=bool(getattr(stream, "isatty", lambda: False)()),
            exception_formatter=structlog.dev.plain_traceback)
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.StackInfoRenderer(),
                    structlog.processors.format_exc_info,
                    redact_secrets, renderer])
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(number)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(number),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "qworker", **bound: Any) -> Any:
    """A structlog logger, with ``bound`` key-values on every line."""
    return structlog.get_logger(name).bind(**bound) if bound else structlog.get_logger(name)


def job_logger(job_id: str, base: Any = None, **bound: Any) -> Any:
    """A logger for one job: ``job_id`` (and ``bound``) on every line it writes."""
    return (base if base is not None else structlog.get_logger("qworker.job")).bind(
        job_id=job_id, **bound)


@dataclass(slots=True)
class JobStats:
    """Timings of one finished job (seconds); ``None`` where a phase did not happen."""

    job_id: str
    finish_reason: str
    prompt_tokens: int = 0
    output_tokens: int = 0          # tokens generated by this worker for this job
    queue_s: float | None = None    # enqueued -> admitted to the engine
    ttft_s: float | None = None     # admitted -> first token
    duration_s: float = 0.0         # admitted -> finished

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return max(0.0, self.duration_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def tokens_per_s(self) -> float | None:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else None

    def timings(self) -> dict[str, float]:
        """The timings as a map (rounded to 0.1 ms), e.g. for the last event of a job."""
        raw = {"queue_s": self.queue_s, "ttft_s": self.ttft_s, "tpot_s": self.tpot_s,
               "duration_s": self.duration_s, "tokens_per_s": self.tokens_per_s}
        return {k: round(v, 4) for k, v in raw.items() if v is not None}


def job_summary(log: Any, stats: JobStats, **extra: Any) -> dict[str, Any]:
    """Write the canonical line of a finished job (event ``job finished``); returns its
    fields. Error finishes log at warning level, everything else at info."""
    fields: dict[str, Any] = {"job_id": stats.job_id, "finish_reason": stats.finish_reason,
                              "prompt_tokens": stats.prompt_tokens,
                              "output_tokens": stats.output_tokens, **stats.timings(), **extra}
    emit = log.warning if stats.finish_reason == "error" else log.info
    # a per-job logger already carries job_id; do not pass it twice
    bound = getattr(log, "_context", {})
    emit("job finished", **{k: v for k, v in fields.items() if k not in bound})
    return fields
