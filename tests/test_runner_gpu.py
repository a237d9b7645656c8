"""The CUDA runner on a GPU (skipped without CUDA; CI has none): run on the device with
``pytest -q -s tests/test_runner_gpu.py``.

A random-weight Llama-shaped model (load_format="dummy", bf16) serves every test:
- a CUDA-graph replay computes bit for bit what the eager forward computes on the same
  padded batch, and decode batches of every size run through their graph;
- the KV pool is sized from gpu_memory_utilization after the profiling forward;
- a step queues its work without waiting on the GPU;
- a request's output does not depend on the rest of its batch (greedy and seeded): it
  held on the H200 for this model, alone vs with 3, 17 and 50 others. The model's
  linears are bitwise batch-invariant up to 16 rows (the skinny GEMM computes a row the
  same way for any row count; cuBLAS keeps its rows for the shape it still serves). Past
  that the building blocks are not (cuBLAS switches kernels at M >= 64 and the skinny
  GEMM hands over to cuBLAS above 16 rows; the attention's split count follows the batch
  size): those tests are expected failures that print where the bits change, so beyond
  16 rows the guarantee is empirical, not by construction. Mismatches are printed with
  where they start.
"""

from __future__ import annotations

import gc
import random

import pytest
import torch

from qworker.config import EngineConfig
from qworker.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, vocab_size=8192,
             max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def dummy_dir(tmp_path_factory):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SHAPE)
    cfg.architectures = ["LlamaForCausalLM"]
    path = tmp_path_factory.mktemp("dummy-llama")
    cfg.save_pretrained(path)
    return str(path)


def make_engine(path: str, **kw):
    from qworker.engine.engine import Engine

    kw = {"load_format": "dummy", "max_num_seqs": 64, "num_kv_blocks": 2048,
          "max_model_len": 2048, **kw}
    return Engine(path, EngineConfig(**kw), device="cuda", dtype="bfloat16")


def prompts(n: int, seed: int, lo: int = 5, hi: int = 300) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(10, SHAPE["vocab_size"] - 10) for _ in range(rng.randint(lo, hi))]
            for _ in range(n)]


def generate(engine, batch: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    ids = [f"r{i}-{random.random()}" for i in range(len(batch))]
    for rid, p, sp in zip(ids, batch, params, strict=True):
        engine.add_request(rid, p, sp)
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return [out[rid] for rid in ids]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@pytest.fixture(scope="module")
def engine(dummy_dir):
    """Synchronous: these tests drive single steps by hand (schedule, execute, update)."""
    e = make_engine(dummy_dir, async_scheduling=False)
    yield e
    del e
    torch.cuda.empty_cache()


def run_to_decode(engine, batch: list[list[int]], max_tokens: int = 64) -> list[str]:
    ids = [f"d{i}-{random.random()}" for i in range(len(batch))]
    for rid, p in zip(ids, batch, strict=True):
        engine.add_request(rid, p, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                  ignore_eos=True))
    s = engine.scheduler
    while s.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in s.running):
        engine.step()
    return ids


def test_graph_replay_is_bitwise_the_eager_forward_of_the_same_padded_batch(engine):
    runner = engine.runner
    assert runner.graphs is not None, "graphs were not captured"
    ids = run_to_decode(engine, prompts(5, 1))
    out = engine.scheduler.schedule()
    assert len(out.scheduled) == 5 and all(s.num_new_tokens == 1 for s in out.scheduled)
    g = runner.graphs
    bucket = g.bucket_for(5, 1)
    assert bucket == 8
    logits = runner.execute(out)                                  # graph replay
    with torch.inference_mode():
        eager = runner.model(g.input_ids[:bucket], g.positions[:bucket], g._attn(bucket))
        ref = runner.model.compute_logits(eager[:5])
    assert torch.equal(logits, ref)
    assert torch.isfinite(logits).all()
    engine.scheduler.update_from_output(out, logits.argmax(-1).tolist())
    for rid in ids:
        engine.abort(rid)


def test_programmatic_dependent_launch_changes_no_bit(engine, monkeypatch):
    """On Hopper the Triton kernels launch with programmatic dependent launch: each may
    start while the kernel before it drains and must wait before touching memory. A
    missing wait would read stale inputs; the graphs (captured with PDL) must compute
    exactly what an eager forward launched without it computes."""
    from qworker_kernels._utils import use_pdl

    runner = engine.runner
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert use_pdl(torch.device("cuda")) == hopper
    ids = run_to_decode(engine, prompts(7, 2))
    out = engine.scheduler.schedule()
    g = runner.graphs
    bucket = g.bucket_for(7, 1)
    logits = runner.execute(out)                                  # graph replay, PDL
    monkeypatch.setenv("QWORKER_PDL", "0")
    assert not use_pdl(torch.device("cuda"))
    with torch.inference_mode():
        eager = runner.model(g.input_ids[:bucket], g.positions[:bucket], g._attn(bucket))
        ref = runner.model.compute_logits(eager[:7])
    assert torch.equal(logits, ref)
    engine.scheduler.update_from_output(out, logits.argmax(-1).tolist())
    for rid in ids:
        engine.abort(rid)


# Measured on the H200 (2026-11-29): 37/40 requests identical over 12 greedy tokens, the
# other three diverging at tokens 4-6. Eager decode runs other shapes than the graphs (M
# unpadded, the batch's own block-table width, hence another attention split count), so
# rounding differs and near-ties can flip; see the two batch-size tests below.
@pytest.mark.xfail(reason="eager and graph decode round differently (other shapes)",
                   strict=False)
def test_every_decode_bucket_replays_its_graph_and_matches_eager_tokens(dummy_dir, engine):
    eager = make_engine(dummy_dir, enforce_eager=True)
    assert eager.runner.graphs is None
    batch = prompts(40, 2)
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)] * len(batch)
    a, b = generate(engine, batch, params), generate(eager, batch, params)
    diverged = {i: first_divergence(x, y) for i, (x, y) in enumerate(zip(a, b, strict=True))
                if x != y}
    print(f"\ngraphs vs eager: {len(batch) - len(diverged)}/{len(batch)} identical; first "
          f"divergence per differing request: {diverged}")
    del eager
    gc.collect()
    torch.cuda.empty_cache()
    assert not diverged


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
def test_a_requests_output_does_not_depend_on_its_batch(engine, mode):
    target = prompts(1, 3, 200, 200)[0]
    if mode == "greedy":
        sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    else:
        sp = SamplingParams(max_tokens=32, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    other = SamplingParams(max_tokens=48, temperature=0.8, seed=1, ignore_eos=True)
    alone = generate(engine, [target], [sp])[0]
    results = {}
    for n_others in (3, 17, 50):
        batch = prompts(n_others, 100 + n_others, 5, 600)
        pos = n_others // 2
        batch.insert(pos, target)
        params = [other] * n_others
        params.insert(pos, sp)
        results[n_others] = generate(engine, batch, params)[pos]
    bad = {n: first_divergence(alone, r) for n, r in results.items() if r != alone}
    print(f"\n{mode}: alone vs with 3/17/50 others: first divergence {bad or 'none'}")
    assert not bad


# Measured on the H200 (torch 2.11 / cuBLAS, bf16): row 0 changes from M=1 at M >= 64 for
# N=4096 (K=4096 and K=14336), i.e. cuBLAS switches kernels with the batch size.
@pytest.mark.xfail(reason="cuBLAS picks kernels by batch size", strict=False)
def test_matmul_rows_do_not_depend_on_the_batch_size():
    """The building block of batch invariance: row 0 of x[:M] @ W.T for every M."""
    torch.manual_seed(0)
    report, bad = [], []
    for k, n in [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256),
                 (1024, 4096), (512, 1024)]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(256, k, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x[:1], w)
        differ = [m for m in (2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
                  if not torch.equal(torch.nn.functional.linear(x[:m], w)[:1], ref)]
        report.append(f"K={k} N={n}: row 0 differs from M=1 at M={differ or 'none'}")
        bad += differ
    print("\n" + "\n".join(report))
    assert not bad


def test_decode_linears_rows_do_not_depend_on_the_batch_up_to_16_rows():
    """What the model's linears compute for a row (the skinny GEMM where it wins, cuBLAS
    elsewhere) is bitwise the same for every decode batch of 1 to 16 rows."""
    from qworker.model.ops_dispatch import SKINNY_MAX_ROWS, linear

    torch.manual_seed(0)
    bad = []
    for k, n in [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256),
                 (SHAPE["hidden_size"], SHAPE["vocab_size"])]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
        x = torch.randn(SKINNY_MAX_ROWS, k, device="cuda", dtype=torch.bfloat16)
        full = linear(x, w)
        bad += [(k, n, m) for m in (1, 2, 4, 8, 15) if not torch.equal(linear(x[:m], w),
                                                                       full[:m])]
    assert not bad, f"rows changed with the row count at (K, N, M): {bad}"


# Measured on the H200: row 0 changes from batch 1 at batch >= 32, where choose_config
# gives fewer context splits (the split count follows the number of query blocks).
@pytest.mark.xfail(reason="the decode split count depends on the batch size", strict=False)
def test_attention_rows_do_not_depend_on_the_batch():
    import qworker_kernels as K

    torch.manual_seed(0)
    hq, hkv, d, bs, nblk = 32, 8, 128, 16, 4096
    kc = torch.randn(nblk, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = [512] + [random.Random(i).randint(1, 1000) for i in range(255)]   # <= 64 blocks
    bt = torch.arange(256 * 128, device="cuda", dtype=torch.int32).view(256, 128) % nblk
    q = torch.randn(256, hq, d, device="cuda", dtype=torch.bfloat16)
    sl = torch.tensor(lens, device="cuda", dtype=torch.int32)

    def row0(b: int, width: int) -> torch.Tensor:
        qsl = torch.arange(b + 1, device="cuda", dtype=torch.int32)
        return K.paged_attention(q[:b], kc, vc, qsl, sl[:b], bt[:b, :width].contiguous(),
                                 d ** -0.5)[0]
    ref = row0(1, 128)
    differ = [(b, w) for b in (2, 8, 32, 64, 256) for w in (64, 128)
              if not torch.equal(row0(b, w), ref)]
    print(f"\nattention row 0 (512 tokens) differs from batch 1 at (batch, width): "
          f"{differ or 'none'}")
    assert not differ


def test_kv_pool_is_sized_from_memory_after_profiling(dummy_dir):
    e = make_engine(dummy_dir, num_kv_blocks=None, gpu_memory_utilization=0.3,
                    enforce_eager=True)
    mem = e.runner.memory
    print(f"\nmemory: {mem}")
    free, total = torch.cuda.mem_get_info()
    used = torch.cuda.memory_allocated()
    assert mem["activation_gib"] > 0
    assert e.runner.num_kv_blocks * e.runner.bytes_per_block() <= 0.3 * total
    assert used <= 0.3 * total + (1 << 30)
    del e
    gc.collect()
    torch.cuda.empty_cache()


def test_a_decode_step_does_not_wait_for_the_gpu(engine):
    """The runner's launch returns while the GPU is still busy (no hidden sync)."""
    ids = run_to_decode(engine, prompts(32, 4))
    out = engine.scheduler.schedule()
    hog = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    for _ in range(50):                 # ~50 ms of queued GPU work ahead of the step
        hog @ hog
    logits = engine.runner.execute(out)
    from qworker.engine.sampler import SamplingBatch
    batch = SamplingBatch.from_requests(out.sampling_requests, engine.eos_token_ids,
                                        engine.vocab_size, logits.device)
    tokens = engine.sampler(logits, batch)
    busy = not torch.cuda.current_stream().query()
    engine.scheduler.update_from_output(out, tokens.tolist())
    for rid in ids:
        engine.abort(rid)
    assert busy, "the step waited for the GPU before its sampled ids were fetched"


def test_async_scheduling_gives_the_synchronous_tokens(dummy_dir, engine):
    """CUDA's default launches step N+1 (its decodes reading step N's sampled ids on the
    device) before step N's ids reach the host: the tokens are those of the synchronous
    engine, greedy and seeded, requests of many lengths finishing at different steps
    (batches stay under 32 rows: see the batch-size tests above)."""
    fast = make_engine(dummy_dir)
    assert fast.async_scheduling
    batch = prompts(12, 7)
    params = [SamplingParams(max_tokens=6 + 5 * i, temperature=1.0 if i % 2 else 0.0,
                             top_p=0.9, seed=i, ignore_eos=True) for i in range(12)]
    assert generate(fast, batch, params) == generate(engine, batch, params)
    assert fast.block_manager.num_free_blocks == fast.block_manager.num_blocks


def test_an_async_step_returns_while_the_next_step_runs(dummy_dir):
    """The overlap itself: ``step()`` launches step N+1 and hands back step N's tokens
    without waiting for N+1 (a synchronous engine would wait for it)."""
    fast = make_engine(dummy_dir)
    ids = run_to_decode(fast, prompts(16, 5))
    fast.step()                         # step N in flight
    torch.cuda.synchronize()            # ... and done
    hog = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(30):                 # ~30 ms of GPU work ahead of step N+1
        hog @ hog
    out = fast.step()                   # launches N+1 behind it, returns N's tokens
    busy = not torch.cuda.current_stream().query()
    assert len(out) == 16 and busy, "step() waited for the step it launched"
    for rid in ids:
        fast.abort(rid)
