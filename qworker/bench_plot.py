"""The PNG of ``qworker bench --plot``: output throughput over time and the TTFT, TPOT
and ITL distributions (matplotlib, the optional extra ``qworker[plot]``)."""

from __future__ import annotations

from collections.abc import Sequence

import click

from qworker.latency import RequestTiming, bin_seconds, throughput_series


def require_matplotlib():
    """``matplotlib.pyplot`` on the file-only Agg backend, or a ClickException saying how
    to install it."""
    try:
        import matplotlib
    except ImportError:
        raise click.ClickException("--plot needs matplotlib: pip install 'qworker[plot]'") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(path: str, timings: Sequence[RequestTiming], start: float, summary: dict,
         title: str) -> None:
    """Write a 2x2 figure to ``path``: throughput over time (with requests in flight) and
    histograms of TTFT, TPOT and ITL in ms, each with its p50 and p99 marked."""
    plt = require_matplotlib()
    ok = [t for t in timings if t.error is None]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    fig.suptitle(f"{title}\n{summary['completed']} ok, {summary['failed']} failed, "
                 f"{summary['output_throughput']:.1f} output tok/s, "
                 f"{summary['request_throughput']:.2f} req/s")

    ax = axes[0][0]
    bin_s = bin_seconds(summary["duration_s"])
    series = throughput_series(timings, start, bin_s)
    if series:
        xs, ys = zip(*series, strict=True)
        ax.step([*xs, xs[-1] + bin_s], [*ys, ys[-1]], where="post", color="tab:blue",
                label=f"output tok/s ({bin_s:g} s bins)")
        ax2 = ax.twinx()
        ts = [x + bin_s / 2 for x in xs]
        ax2.plot(ts, [_in_flight(timings, start + t) for t in ts], color="tab:orange",
                 alpha=0.7, label="requests in flight")
        ax2.set_ylabel("requests in flight")
        ax2.set_ylim(bottom=0)
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="lower left", fontsize="small")
    ax.set(title="Throughput over time", xlabel="time since start (s)", ylabel="tokens/s")

    for ax, key, label, values in (
            (axes[0][1], "ttft_ms", "TTFT", [t.ttft for t in ok if t.ttft is not None]),
            (axes[1][0], "tpot_ms", "TPOT", [t.tpot for t in ok if t.tpot is not None]),
            (axes[1][1], "itl_ms", "ITL", [x for t in ok for x in t.itls])):
        ms = [v * 1000 for v in values]
        if ms:
            ax.hist(ms, bins=min(50, max(5, len(ms) // 4)), color="tab:green", alpha=0.8)
            for q, style in (("p50", "--"), ("p99", ":")):
                v = summary[key].get(q)
                if v is not None:
                    ax.axvline(v, color="black", linestyle=style, label=f"{q} {v:.1f} ms")
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=f"{label} distribution ({len(ms)} samples)", xlabel=f"{label} (ms)",
               ylabel="count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _in_flight(timings: Sequence[RequestTiming], t: float) -> int:
    """Requests sent by ``t`` whose last chunk had not arrived yet."""
    return sum(1 for r in timings
               if r.sent and r.sent <= t and (not r.chunks or r.chunks[-1][0] > t))
