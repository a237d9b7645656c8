"""SmolLM2-135M-Instruct on the GPU (bf16) against the CPU float32 path and transformers.

Greedy, 48 tokens (EOS ignored) for each of the 16 W_cpu prompts. On the CPU, write the
float32 references: qworker's engine and transformers' ``generate`` (token-exact with each
other, as tests/test_engine.py checks). On the GPU, run qworker in bf16 with all prompts
in one batch and each prompt alone, and transformers in bf16 one prompt at a time, then
report per prompt whether the token ids agree fully with each reference and, where not,
the first position that differs (bf16 rounding flips near-ties; after that the texts
simply go their own ways).

  python scripts/smollm2_agreement.py --write-reference ref.json          # CPU, ~1 min
  python scripts/smollm2_agreement.py --reference ref.json --json out.json  # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offline import W_CPU_PROMPTS  # noqa: E402

MAX_TOKENS = 48


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, None when the lists are equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def qworker_greedy(path: str, device: str, dtype: str, prompts: list[list[int]],
                   alone: bool = False) -> list[list[int]]:
    from qworker import LLM, SamplingParams
    llm = LLM(path, device=device, dtype=dtype, max_num_seqs=32, max_model_len=512)
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    if alone:
        return [llm.generate([p], sp)[0].token_ids for p in prompts]
    return [o.token_ids for o in llm.generate(prompts, sp)]


def hf_greedy(path: str, device: str, dtype: torch.dtype,
              prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    outs = []
    with torch.no_grad():
        for p in prompts:       # one at a time: no padding in the numerics
            ids = torch.tensor([p], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids),  # EOS ignored,
                                 max_new_tokens=MAX_TOKENS, do_sample=False,  # not banned
                                 eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs


def compare(name: str, got: list[list[int]], ref: list[list[int]]) -> dict:
    firsts = [first_divergence(g, r) for g, r in zip(got, ref, strict=True)]
    agree = sum(f is None for f in firsts)
    row = {"against": name, "prompts": len(ref), "agree_fully": agree,
           "first_divergence": firsts}
    diverged = sorted(f for f in firsts if f is not None)
    print(f"{name:44s} {agree:2d}/{len(ref)} agree fully; first divergence at token "
          f"{diverged if diverged else '-'}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--write-reference", default="", help="CPU: write float32 references")
    ap.add_argument("--reference", default="", help="GPU: compare against this file")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from qworker.model.hub import resolve_model
    path = str(resolve_model(a.model))
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok.encode(p) for p in W_CPU_PROMPTS]
    if a.write_reference:
        ref = {"prompts": prompts,
               "qworker_cpu_fp32": qworker_greedy(path, "cpu", "float32", prompts),
               "transformers_cpu_fp32": hf_greedy(path, "cpu", torch.float32, prompts)}
        compare("qworker fp32 vs transformers fp32 (CPU)", ref["qworker_cpu_fp32"],
                ref["transformers_cpu_fp32"])
        Path(a.write_reference).write_text(json.dumps(ref))
        return
    if not a.reference or not torch.cuda.is_available():
        raise SystemExit("give --write-reference (CPU) or --reference on a CUDA machine")
    ref = json.loads(Path(a.reference).read_text())
    if ref["prompts"] != prompts:
        raise SystemExit("the reference was written for other prompts or another tokenizer")
    batched = qworker_greedy(path, "cuda", "bfloat16", prompts)
    alone = qworker_greedy(path, "cuda", "bfloat16", prompts, alone=True)
    hf_bf16 = hf_greedy(path, "cuda", torch.bfloat16, prompts)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [
        compare("qworker bf16 batched vs alone (GPU)", batched, alone),
        compare("qworker bf16 vs qworker fp32 (CPU)", batched, ref["qworker_cpu_fp32"]),
        compare("qworker bf16 vs transformers fp32 (CPU)", batched,
                ref["transformers_cpu_fp32"]),
        compare("transformers bf16 (GPU) vs transformers fp32", hf_bf16,
                ref["transformers_cpu_fp32"]),
        compare("qworker bf16 vs transformers bf16 (GPU)", batched, hf_bf16)]}
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
