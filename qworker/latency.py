"""Serving-latency statistics as vLLM's serving benchmark defines them (pure Python).

One ``RequestTiming`` per request, as the client saw it: when it was sent and when each
streamed chunk (an event carrying tokens) arrived. From those:

- TTFT: sent -> first chunk with tokens;
- E2EL: sent -> last chunk;
- TPOT: (E2EL - TTFT) / (output tokens - 1), for requests with more than one token;
- ITL: the gaps between successive chunks of a request (every gap of every request);

and over a run, ``summarize`` gives request and token throughput, and mean, median and
percentiles of each (``numpy.percentile``'s linear interpolation). Used by ``qworker
bench``, ``qworker demo`` and scripts/bench_queue.py.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``xs``, interpolated linearly between the two
    nearest ranks (``numpy.percentile``'s default); None for no data."""
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass(slots=True)
class RequestTiming:
    """One request's timeline (seconds on one monotonic clock, e.g. ``perf_counter``)."""

    sent: float
    chunks: list[tuple[float, int]] = field(default_factory=list)   # (arrival, tokens)
    prompt_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None        # an error code; None for a request that succeeded

    def add(self, t: float, n_tokens: int) -> None:
        """Record a streamed event at ``t`` carrying ``n_tokens`` (empty ones are ignored)."""
        if n_tokens > 0:
            self.chunks.append((t, n_tokens))

    @property
    def output_tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def ttft(self) -> float | None:
        return self.chunks[0][0] - self.sent if self.chunks else None

    @property
    def e2el(self) -> float | None:
        return self.chunks[-1][0] - self.sent if self.chunks else None

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        return (self.e2el - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b[0] - a[0] for a, b in zip(self.chunks, self.chunks[1:], strict=False)]


def distribution(xs: Sequence[float], percentiles: Iterable[float] = (50, 99),
                 scale: float = 1000.0) -> dict[str, float | None]:
    """mean, median, std and ``p{q}`` of ``xs`` times ``scale`` (seconds -> ms)."""
    v = [x * scale for x in xs]
    out: dict[str, float | None] = {
        "mean": statistics.fmean(v) if v else None,
        "median": statistics.median(v) if v else None,
        "std": statistics.pstdev(v) if v else None}
    for q in percentiles:
        out[f"p{q:g}"] = percentile(v, q)
    return out


def summarize(reqs: Sequence[RequestTiming], duration: float,
              percentiles: Iterable[float] = (50, 99), slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None) -> dict:
    """Throughput and latency distributions (ms) of a run that took ``duration`` s.

    Failed requests (``error`` set) count in ``failed`` and ``errors`` only. Goodput is
    the rate of successful requests within both SLOs (when either is given)."""
    ok = [r for r in reqs if r.error is None]
    errors: dict[str, int] = {}
    for r in reqs:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    out_toks = sum(r.output_tokens for r in ok)
    in_toks = sum(r.prompt_tokens for r in ok)
    dur = max(duration, 1e-9)
    ps = tuple(percentiles)
    res = {
        "completed": len(ok), "failed": len(reqs) - len(ok), "errors": errors,
        "duration_s": duration, "total_input_tokens": in_toks,
        "total_output_tokens": out_toks, "request_throughput": len(ok) / dur,
        "output_throughput": out_toks / dur, "total_token_throughput": (in_toks + out_toks) / dur,
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None], ps),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None], ps),
        "itl_ms": distribution([x for r in ok for x in r.itls], ps),
        "e2el_ms": distribution([r.e2el for r in ok if r.e2el is not None], ps),
    }
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(1 for r in ok
                   if (slo_ttft_ms is None or (r.ttft or 0) * 1000 <= slo_ttft_ms)
                   and (slo_tpot_ms is None or (r.tpot or 0) * 1000 <= slo_tpot_ms))
        res["goodput_rps"] = good / dur
    return res


def bin_seconds(duration_s: float, bins: int = 20) -> float:
    """Width of throughput-over-time bins: about ``bins`` over the run, rounded to two
    significant digits (at least 1 ms)."""
    width = max(duration_s / bins, 1e-3)
    return float(f"{width:.2g}")


def throughput_series(reqs: Sequence[RequestTiming], start: float,
                      bin_s: float = 1.0) -> list[tuple[float, float]]:
    """Output tokens per second in ``bin_s`` bins from ``start``: [(bin start s, tok/s)]."""
    chunks = [(t - start, n) for r in reqs for t, n in r.chunks]
    if not chunks:
        return []
    bins = [0] * (int(max(t for t, _ in chunks) // bin_s) + 1)
    for t, n in chunks:
        bins[int(max(t, 0.0) // bin_s)] += n
    return [(i * bin_s, n / bin_s) for i, n in enumerate(bins)]
