"""Tensor parallelism on the CPU with gloo: the sharding math of each parallel layer (ranks
simulated in one process), and whole engines with ``tensor_parallel_size=2`` (rank 0 here,
a spawned follower) that generate exactly the tokens of one process, greedy, float32."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from qworker.config import EngineConfig
from qworker.engine.engine import Engine
from qworker.engine.llm import LLM
from qworker.model.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    TPContext,
    VocabParallelEmbedding,
    even_shard,
    head_shard,
)
from qworker.sampling_params import SamplingParams

H, D, HQ, HKV = 6, 3, 4, 2
GEN = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


@pytest.mark.parametrize("size", [2, 4])    # 4 ranks > 2 KV heads: each KV head on 2 ranks
def test_merged_qkv_column_shards_are_the_rank_head_groups(size):
    w = {p: rand(n * D, H) for p, n in (("q", HQ), ("k", HKV), ("v", HKV))}
    b = {p: rand(t.shape[0]) for p, t in w.items()}
    x = rand(5, H)
    full = {p: F.linear(x, w[p], b[p]).view(5, -1, D) for p in w}    # [T, heads, D]
    qs = []
    for r in range(size):
        tp = TPContext(r, size)
        q, kv = head_shard(HQ, D, tp), head_shard(HKV, D, tp)
        layer = ColumnParallelLinear(H, {"q": q, "k": kv, "v": kv}, bias=True)
        for p in w:
            layer.load("weight", w[p], p)
            layer.load("bias", b[p], p)
        oq, ok, ov = layer(x).split([q.length, kv.length, kv.length], dim=-1)
        qs.append(oq)
        kv_head = r * HKV // size                 # the KV head its query heads read
        kv_heads = slice(kv_head, kv_head + max(1, HKV // size))
        torch.testing.assert_close(ok.view(5, -1, D), full["k"][:, kv_heads])
        torch.testing.assert_close(ov.view(5, -1, D), full["v"][:, kv_heads])
    torch.testing.assert_close(torch.cat(qs, dim=-1).view(5, HQ, D), full["q"])


def test_gate_up_column_shards_pair_up_for_silu_and_mul():
    inter, x = 8, rand(5, H)
    gate, up = rand(inter, H), rand(inter, H)
    full = F.silu(x @ gate.T) * (x @ up.T)                          # [T, I]
    outs = []
    for r in range(2):
        part = even_shard(inter, TPContext(r, 2))
        layer = ColumnParallelLinear(H, {"gate": part, "up": part}, bias=False)
        layer.load("weight", gate, "gate")
        layer.load("weight", up, "up")
        g, u = layer(x).chunk(2, dim=-1)                            # local [gate_r | up_r]
        outs.append(F.silu(g) * u)
    torch.testing.assert_close(torch.cat(outs, dim=-1), full)


def test_row_parallel_partial_sums_add_up_to_the_full_projection():
    w, b, x = rand(H, 8), rand(H), rand(5, 8)
    total = torch.zeros(5, H)
    for r in range(4):
        layer = RowParallelLinear(8, H, bias=True, tp=TPContext(r, 4))
        layer.load("weight", w)
        layer.load("bias", b)
        total += layer.local_forward(x[:, layer.start:layer.start + layer.n_in])
    torch.testing.assert_close(total + b, F.linear(x, w, b))


def test_vocab_parallel_embedding_and_lm_head_with_a_padded_last_shard():
    vocab, size = 10, 4                        # 3 rows per rank; rank 3 has 1 real, 2 padding
    table, ids, hidden = rand(vocab, H), torch.tensor([0, 9, 4, 3, 7, 2, 9]), rand(3, H)
    looked_up, logits = torch.zeros(len(ids), H), []
    for r in range(size):
        emb = VocabParallelEmbedding(vocab, H, TPContext(r, size))
        emb.load("weight", table)
        looked_up += emb.local_forward(ids)
        logits.append(ParallelLMHead(vocab, H, TPContext(r, size), tied=emb)
                      .local_forward(hidden))                       # [N, 3]
    torch.testing.assert_close(looked_up, F.embedding(ids, table))
    gathered = torch.cat(logits, dim=-1)                            # [N, 12]
    torch.testing.assert_close(gathered[:, :vocab], hidden @ table.T)
    assert gathered[:, vocab:].eq(0).all()


def test_heads_that_do_not_split_are_a_clear_error_before_any_process_starts(smollm2_dir):
    with pytest.raises(ValueError, match="9 attention heads cannot be split"):
        Engine(str(smollm2_dir), EngineConfig(tensor_parallel_size=2), device="cpu")
    assert not dist.is_initialized()


def engine(path, **kw) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=64,
               max_num_batched_tokens=32, **kw)        # chunked prefill beside decodes


def greedy_tokens(llm: LLM) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (5, 17, 33, 40)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params)]


def tensor_parallel_tokens(path, size: int) -> list[list[int]]:
    """Generate with ``size`` ranks, then check that close() left no process or group."""
    llm = engine(path, tensor_parallel_size=size)
    followers = llm.engine.tp.procs
    try:
        return greedy_tokens(llm)
    finally:
        llm.close()
        assert not any(p.is_alive() for p in followers) and not dist.is_initialized()


# qwen3: tied lm_head, q/k norms, o_proj bias (row-parallel bias); llama: its own lm_head.
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_tensor_parallel_2_generates_the_tokens_of_one_process(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    assert tensor_parallel_tokens(path, 2) == greedy_tokens(engine(path))


@pytest.mark.slow
def test_tensor_parallel_4_replicates_kv_heads_and_matches(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")                      # 2 KV heads, each on 2 of 4 ranks
    assert tensor_parallel_tokens(path, 4) == greedy_tokens(engine(path))
