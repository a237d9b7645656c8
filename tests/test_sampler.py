"""Sampler: vLLM's sampling semantics, with draws that depend only on (seed, position)."""

from __future__ import annotations

import itertools

import pytest
import torch

from qworker.engine.request import Request
from qworker.engine.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    hash_uniform,
)
from qworker.sampling_params import SamplingParams

V = 64
EOS = 2
_arrival = itertools.count()


def req(seed: int = 0, prompt: list[int] | None = None, output: list[int] | None = None,
        **params) -> Request:
    return Request(request_id=f"r{next(_arrival)}", prompt_token_ids=prompt or [5, 6, 7],
                   sampling_params=SamplingParams(**params), arrival=next(_arrival),
                   seed=seed, output_token_ids=list(output or []))


def sample(logits: torch.Tensor, requests: list[Request], eos=(EOS,)) -> list[int]:
    batch = SamplingBatch.from_requests(requests, set(eos), logits.shape[-1], "cpu")
    out = Sampler()(logits, batch)
    assert out.dtype == torch.int64 and out.shape == (len(requests),)
    return out.tolist()


def draws(row: torch.Tensor, n: int, **params) -> list[int]:
    """n draws from one logits row: n requests with seeds 0..n-1 in one batch."""
    return sample(row.expand(n, -1).clone(), [req(seed=s, **params) for s in range(n)])


def probs_row(probs: list[float]) -> torch.Tensor:
    """A logits row whose softmax is ``probs`` on the first tokens and ~0 elsewhere."""
    row = torch.full((V,), -1e4)
    row[: len(probs)] = torch.log(torch.tensor(probs))
    return row


# -- the counter-based hash ---------------------------------------------------------------

_M64 = (1 << 64) - 1


def _mix64_ref(x: int) -> int:
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def test_hash_is_bit_exact_splitmix64_of_seed_position_and_vocab_index():
    seeds = [0, 1, 123456789, 2**62 + 7, 2**63 - 1]
    positions = [0, 5, 3, 10**6, 2**40]
    got = hash_uniform(torch.tensor(seeds), torch.tensor(positions), 300)
    for row, (seed, pos) in enumerate(zip(seeds, positions, strict=True)):
        key = _mix64_ref(_mix64_ref(seed) ^ pos)
        want = [((_mix64_ref(key + (i + 1) * 0x9E3779B97F4A7C15) >> 41) + 0.5) / 2**23
                for i in range(300)]
        assert got[row].tolist() == want


def test_hash_uniform_is_strictly_inside_unit_interval_and_roughly_uniform():
    u = hash_uniform(torch.arange(64), torch.arange(64) * 7, 4096)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.005


# -- greedy -------------------------------------------------------------------------------

def test_greedy_is_exact_argmax_whatever_the_seed_and_filters():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(0))
    rows = [req(seed=s, temperature=0.0, top_k=3, top_p=0.5) for s in range(6)]
    assert sample(logits, rows) == logits.argmax(-1).tolist()


def test_greedy_row_next_to_sampling_rows_is_still_argmax():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    rows = [req(seed=1), req(temperature=0.0), req(seed=2, top_k=5)]
    assert sample(logits, rows)[1] == logits[1].argmax().item()


# -- support of top-k / top-p / min-p -------------------------------------------------------

PROBS = [0.4, 0.3, 0.2, 0.1]


def test_top_k_support_is_the_k_largest_logits():
    row = torch.linspace(0, 3, V)            # token V-1 is the largest
    seen = set(draws(row, 2000, top_k=3))
    assert seen == {V - 1, V - 2, V - 3}


def test_top_p_keeps_smallest_prefix_reaching_p():
    # mass before token 1 is 0.4 < 0.65, before token 2 it is 0.7 >= 0.65
    seen = set(draws(probs_row(PROBS), 2000, top_p=0.65))
    assert seen == {0, 1}


def test_min_p_keeps_tokens_above_fraction_of_max_probability():
    # threshold 0.3 * 0.4 = 0.12: tokens 0, 1, 2
    assert set(draws(probs_row(PROBS), 2000, min_p=0.3)) == {0, 1, 2}


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # alone, top-p 0.75 keeps token 2 (mass before it is 0.7); after top-k 3 the
    # distribution is 4/9, 3/9, 2/9 and the mass before token 2 is 7/9 >= 0.75
    assert set(draws(probs_row(PROBS), 2000, top_p=0.75)) == {0, 1, 2}
    assert set(draws(probs_row(PROBS), 2000, top_k=3, top_p=0.75)) == {0, 1}


def test_without_filters_every_token_with_mass_is_reachable():
    assert set(draws(probs_row(PROBS), 2000)) == {0, 1, 2, 3}


def test_tiny_top_p_or_top_k_one_is_greedy_like():
    row = probs_row(PROBS)
    assert set(draws(row, 300, top_p=0.01)) == {0}
    assert set(draws(row, 300, top_k=1)) == {0}


# -- temperature: empirical distribution matches softmax(logits / T) ------------------------

@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_empirical_distribution_matches_softmax(temperature):
    n, k = 20000, 8
    row = torch.full((V,), float("-inf"))
    row[:k] = torch.tensor([1.0, 0.5, 0.0, -0.3, -1.0, 0.8, 0.2, -2.0])
    counts = torch.bincount(torch.tensor(draws(row, n, temperature=temperature)),
                            minlength=V).double()
    expected = torch.softmax(row[:k].double() / temperature, -1) * n
    assert counts[k:].sum() == 0
    chi2 = ((counts[:k] - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.3   # chi-square, 7 degrees of freedom: P(chi2 > 24.3) = 0.001


# -- seeded draws: only (seed, position) matter -----------------------------------------------

def _flat_row(n: int = V) -> torch.Tensor:
    return torch.zeros(n)   # uniform: every token is a possible draw


def test_same_seed_and_position_same_token_in_another_batch_and_row():
    target = req(seed=42, output=[1, 2])
    alone = sample(_flat_row()[None], [target])[0]
    gen = torch.Generator().manual_seed(3)
    others = [req(seed=s, top_k=4) for s in range(5)]
    logits = torch.randn(6, V, generator=gen)
    for row in range(6):
        batch = others[:row] + [target] + others[row:]
        logits_b = torch.cat([logits[:row], _flat_row()[None], logits[row:5]])
        assert sample(logits_b, batch)[row] == alone


def test_other_rows_params_do_not_change_a_row():
    target = req(seed=7, top_p=0.9)
    row = torch.randn(V, generator=torch.Generator().manual_seed(4))
    got = {sample(torch.stack([row, row]), [target, other])[0] for other in [
        req(seed=1), req(temperature=0.0), req(seed=3, repetition_penalty=1.5, min_tokens=2),
        req(seed=9, top_k=2, min_p=0.2)]}
    assert got == {sample(row[None], [target])[0]}


def test_mixed_batch_gives_every_row_the_token_it_gets_alone():
    rows = [req(seed=1), req(temperature=0.0), req(seed=2, top_k=3),
            req(seed=3, top_p=0.5, temperature=0.7), req(seed=4, min_p=0.3),
            req(seed=5, output=[9, 9, 8], repetition_penalty=1.8, frequency_penalty=1.0),
            req(seed=6, output=[1], min_tokens=3, presence_penalty=-1.5),
            req(seed=7, temperature=0.0, output=[3], repetition_penalty=3.0)]
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(5)) * 2
    alone = [sample(logits[i:i + 1], [r])[0] for i, r in enumerate(rows)]
    assert sample(logits, rows) == alone


def test_token_depends_on_position_not_on_prompt_output_split():
    # a request resumed with its outputs as "already generated" samples the same token as the
    # original one at the same position (num_tokens)
    a = req(seed=5, prompt=[1, 2, 3], output=[4, 5])
    b = req(seed=5, prompt=[1, 2, 3, 4], output=[5])
    assert sample(_flat_row()[None], [a]) == sample(_flat_row()[None], [b])


def test_different_seeds_give_different_draws():
    # 64 uniform draws from 4096 tokens: about 0.5 collisions expected
    assert len(set(draws(_flat_row(4096), 64))) >= 60


def test_different_positions_give_different_draws():
    row = _flat_row(4096)[None]
    tokens = {sample(row, [req(seed=1, output=[0] * n)])[0] for n in range(64)}
    assert len(tokens) >= 60


# -- penalties ------------------------------------------------------------------------------

def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 1.0]])
    prompt, output = [0, 1], [2, 2, 3]
    r = req(prompt=prompt, output=output, repetition_penalty=2.0,
            frequency_penalty=0.5, presence_penalty=0.25)
    got = apply_penalties(logits, SamplingBatch.from_requests([r], {EOS}, 6, "cpu"))
    want = [2.0 / 2,                      # prompt token, positive: divided
            -1.0 * 2,                     # prompt token, negative: multiplied
            0.5 / 2 - 0.5 * 2 - 0.25,     # output twice: repetition, frequency x2, presence
            -0.5 * 2 - 0.5 * 1 - 0.25,    # output once
            3.0, 1.0]                     # never seen
    assert got[0].tolist() == pytest.approx(want)


def test_penalties_are_per_row():
    logits = torch.ones(2, 6)
    rows = [req(prompt=[0], output=[1], repetition_penalty=2.0, presence_penalty=1.0),
            req(prompt=[0], output=[1])]
    got = apply_penalties(logits, SamplingBatch.from_requests(rows, {EOS}, 6, "cpu"))
    assert got[0].tolist() == pytest.approx([0.5, -0.5, 1, 1, 1, 1])
    assert got[1].tolist() == [1.0] * 6


def test_out_of_vocab_token_ids_do_not_break_penalties():
    r = req(prompt=[1, 6 + 3], output=[-1, 2, 100], repetition_penalty=2.0)
    got = apply_penalties(torch.ones(1, 6), SamplingBatch.from_requests([r], {EOS}, 6, "cpu"))
    assert got[0].tolist() == [1, 0.5, 0.5, 1, 1, 1]


def test_greedy_picks_argmax_after_penalties():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    r = req(prompt=[9], output=[0], temperature=0.0, frequency_penalty=2.0)
    assert sample(logits, [r]) == [1]


# -- min_tokens, stop tokens and ignore_eos ---------------------------------------------------

def _eos_heavy() -> torch.Tensor:
    row = torch.zeros(V)
    row[EOS], row[10] = 20.0, 19.0
    return row


def test_min_tokens_bans_eos_until_reached_then_releases():
    before = req(temperature=0.0, min_tokens=3, output=[5, 6])
    after = req(temperature=0.0, min_tokens=3, output=[5, 6, 7])
    assert sample(torch.stack([_eos_heavy()] * 2), [before, after]) == [10, EOS]
    assert EOS not in draws(_eos_heavy(), 500, min_tokens=1, temperature=1.0)


def test_min_tokens_bans_stop_token_ids_and_every_eos_id():
    row = _eos_heavy()
    row[3] = 30.0                         # a second eos id
    row[11] = 25.0                        # a stop token id
    r = req(temperature=0.0, min_tokens=1, stop_token_ids=[11])
    assert sample(row[None], [r], eos=(EOS, 3)) == [10]


def test_ignore_eos_does_not_ban_eos_but_min_tokens_still_does():
    assert sample(_eos_heavy()[None], [req(temperature=0.0, ignore_eos=True)]) == [EOS]
    r = req(temperature=0.0, ignore_eos=True, min_tokens=2)
    assert sample(_eos_heavy()[None], [r]) == [10]


def test_out_of_vocab_stop_token_ids_are_ignored():
    r = req(temperature=0.0, min_tokens=1, stop_token_ids=[V + 100])
    assert sample(_eos_heavy()[None], [r]) == [10]


# -- device -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_cpu_draws_without_host_syncs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 1000, generator=gen) * 3
    rows = [req(seed=s, prompt=[1, 2, 3], output=[4] * (s % 3), top_k=(0, 50)[s % 2],
                top_p=(1.0, 0.9)[s % 3 == 0], min_p=(0.0, 0.05)[s % 5 == 0],
                repetition_penalty=(1.0, 1.3)[s % 4 == 0], min_tokens=s % 3,
                temperature=(0.0, 0.8, 1.0)[s % 3]) for s in range(32)]
    want = Sampler()(logits, SamplingBatch.from_requests(rows, {EOS}, 1000, "cpu"))
    batch = SamplingBatch.from_requests(rows, {EOS}, 1000, "cuda")
    logits = logits.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = Sampler()(logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert got.cpu().tolist() == want.tolist()
    u_cpu = hash_uniform(torch.arange(8), torch.arange(8) * 3, 5000)
    assert torch.equal(hash_uniform(torch.arange(8).cuda(), torch.arange(8).cuda() * 3,
                                    5000).cpu(), u_cpu)
