"""Host time of incremental detokenization per engine step, the two decoders side by side.

Every step of a decode batch detokenizes one new token per request (``OutputProcessor``,
inside ``Engine.step()``), on the same host thread that feeds the GPU. This times a step
of ``--requests`` requests, one token each, through the Rust ``DecodeStream`` path (a
Hugging Face fast tokenizer) and through the Python window decodes (the same tokenizer
seen through ``decode`` only), alternating the two ``--rounds`` times in one process.
Tokens are random ids of the model's vocabulary (multi-byte fragments included).

  python scripts/bench_detokenize.py --model smollm2-135m-instruct --requests 256
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from transformers import AutoTokenizer

from qworker.engine.output import OutputProcessor
from qworker.model.hub import resolve_model
from qworker.sampling_params import SamplingParams


class WindowDecodesOnly:
    """The tokenizer seen through ``decode`` alone: OutputProcessor's Python path."""

    def __init__(self, tok) -> None:
        self.decode = tok.decode


def ms_per_step(tok, ids: list[list[int]], steps: int) -> float:
    proc = OutputProcessor(tok)
    for i in range(len(ids)):
        proc.add_request(str(i), [1], SamplingParams())
    t = time.perf_counter()
    for step in range(steps):
        for i, row in enumerate(ids):
            proc.process(str(i), [row[step]], False)
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(resolve_model(a.model))
    rng = random.Random(0)
    ids = [[rng.randrange(len(tok)) for _ in range(a.steps)] for _ in range(a.requests)]
    fast, window = [], []
    for _ in range(a.rounds):
        fast.append(ms_per_step(tok, ids, a.steps))
        window.append(ms_per_step(WindowDecodesOnly(tok), ids, a.steps))
    f, w = statistics.median(fast), statistics.median(window)
    print(f"{a.requests} requests, one token each, median of {a.rounds} rounds of "
          f"{a.steps} steps:")
    print(f"  Rust DecodeStream   {f:6.2f} ms/step")
    print(f"  Python windows      {w:6.2f} ms/step")
    print(f"  windows / stream    {w / f:6.2f}x")


if __name__ == "__main__":
    main()
