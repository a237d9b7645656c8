"""The engine end to end on the CPU: token-exact with transformers, batch-invariant,
preemption- and prefix-cache-invariant. Real checkpoints, real tokenizer, no mocks."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from qworker import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "Translate to French: I like apples.",
    "1, 2, 3, 4, 5,",
    "The best way to learn a language is",
]
CHATS = [
    [{"role": "user", "content": "What is the tallest mountain on Earth?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name two prime numbers."}],
    [{"role": "user", "content": "Explain gravity to a child in one sentence."}],
]


def hf_greedy(model_dir, prompt_ids: list[list[int]], max_new_tokens: int,
              ignore_eos: bool = False) -> list[list[int]]:
    """transformers' own generate, one prompt at a time (no padding effects)."""
    extra = {"eos_token_id": None, "pad_token_id": 0} if ignore_eos else {}
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    hf.eval()
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                            do_sample=False, **extra)
            outs.append(y[0, len(ids):].tolist())
    return outs


def trim_after_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return LLM(str(smollm2_dir), device="cpu", dtype="float32", max_num_seqs=64)


def test_greedy_batch_is_token_exact_with_transformers_on_smollm2(smol, smollm2_dir):
    tok = smol.tokenizer
    chats = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
             for c in CHATS]
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    prompt_ids += [tok.encode(c, add_special_tokens=False) for c in chats]
    outs = smol.generate(prompt_ids, SamplingParams(max_tokens=48, temperature=0.0))
    expected = hf_greedy(smollm2_dir, prompt_ids, 48)
    eos = smol.engine.eos_token_ids
    for i, (o, e) in enumerate(zip(outs, expected, strict=True)):
        assert o.token_ids == trim_after_eos(e, eos), f"prompt {i} diverged"
        assert o.finish_reason == ("stop" if o.token_ids[-1] in eos else "length")
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["llama", "llama3", "mistral", "qwen2", "qwen3"])
def test_greedy_is_token_exact_with_transformers_on_each_architecture(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch)
    llm = LLM(str(path), device="cpu", dtype="float32", block_size=16)
    g = torch.Generator().manual_seed(1)
    prompt_ids = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 17, 33, 40)]
    outs = llm.generate(prompt_ids, SamplingParams(max_tokens=24, temperature=0.0,
                                                   ignore_eos=True))
    expected = hf_greedy(path, prompt_ids, 24, ignore_eos=True)
    assert [o.token_ids for o in outs] == expected


def _run(path, prompts, params, **kw):
    llm = LLM(str(path), device="cpu", dtype="float32", **kw)
    return [o.token_ids for o in llm.generate(prompts, params)], llm


@pytest.mark.parametrize("sampling", [
    SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, top_k=50, seed=1234,
                   ignore_eos=True),
], ids=["greedy", "seeded"])
def test_output_does_not_depend_on_batch_preemption_or_prefix_cache(tiny_checkpoint, sampling):
    path = tiny_checkpoint("llama")
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(3, 1000, (20,), generator=g).tolist()   # a shared prefix
    prompts = [shared + torch.randint(3, 1000, (n,), generator=g).tolist()
               for n in (3, 9, 15, 21, 27, 33)]
    alone = [_run(path, [p], sampling, enable_prefix_caching=False)[0][0] for p in prompts]
    for caching in (False, True):
        # 12 blocks of 16 tokens cannot hold six sequences of up to 93 tokens: preemption.
        batched, llm = _run(path, prompts, sampling, num_kv_blocks=12, block_size=16,
                            enable_prefix_caching=caching)
        assert llm.engine.scheduler.num_preemptions > 0
        assert batched == alone, f"prefix caching {caching}"
        assert llm.engine.block_manager.num_free_blocks == 12
    # With room to spare and the prefix already cached by a first pass: hits, same output.
    llm = LLM(str(path), device="cpu", dtype="float32", enable_prefix_caching=True)
    llm.generate(prompts[:1], sampling)
    assert [o.token_ids for o in llm.generate(prompts, sampling)] == alone
    assert llm.engine.block_manager.prefix_hit_tokens >= 16 * len(prompts)


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    llm = LLM(str(path), device="cpu", dtype="float32")
    p = [5, 6, 7, 8, 9]
    a = llm.generate([p], SamplingParams(max_tokens=20, temperature=1.0, seed=1))[0].token_ids
    b = llm.generate([p, [9, 9, 9]], SamplingParams(max_tokens=20, temperature=1.0, seed=1))
    c = llm.generate([p], SamplingParams(max_tokens=20, temperature=1.0, seed=2))[0].token_ids
    assert a == b[0].token_ids
    assert a != c


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_stop_strings_min_tokens_and_max_tokens(smol, smollm2_dir, async_scheduling):
    if async_scheduling:   # the stop string is found one step after the next was launched
        smol = LLM(str(smollm2_dir), device="cpu", dtype="float32", async_scheduling=True)
    out = smol.generate("1, 2, 3, 4, 5,", SamplingParams(max_tokens=30, temperature=0.0,
                                                          stop=["9"]))[0]
    assert out.finish_reason == "stop"
    assert "9" not in out.text and out.text.rstrip().endswith("8,")
    out = smol.generate("1, 2, 3,", SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_generate_validates_its_input(smol):
    with pytest.raises(ValueError, match="SamplingParams"):
        smol.generate(["a", "b"], [SamplingParams()])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        smol.generate([[1, 2, 10**9]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    # the engine is still usable after a rejected request
    assert smol.generate("Hi", SamplingParams(max_tokens=2))[0].token_ids


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        LLM("no-such-model-anywhere", device="cpu")


# ---- asynchronous scheduling (CUDA's default; forced on here, on the CPU) ----------------

def _async_mix(path, prompts) -> list[SamplingParams]:
    """Greedy to the limit, seeded, min_tokens, max_tokens 1, and requests that stop early
    on a stop token id: a token their own run makes mid-way (found by a first pass)."""
    free = LLM(str(path), device="cpu", dtype="float32").generate(
        prompts[:2], [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                      SamplingParams(max_tokens=30, temperature=1.0, seed=3, ignore_eos=True)])
    stop_greedy, stop_seeded = free[0].token_ids[9], free[1].token_ids[13]
    return [
        SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[stop_greedy]),
        SamplingParams(max_tokens=30, temperature=1.0, seed=3, stop_token_ids=[stop_seeded]),
        SamplingParams(max_tokens=28, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=1.0, seed=9, min_tokens=12,
                       stop_token_ids=[stop_greedy, stop_seeded]),
        SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0.0),
    ]


def _mixed_prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    shared = torch.randint(3, 1000, (18,), generator=g).tolist()
    return [shared + torch.randint(3, 1000, (5 + 7 * i,), generator=g).tolist()
            for i in range(n)]


def _outputs(llm, prompts, params):
    return [(o.token_ids, o.finish_reason) for o in llm.generate(prompts, params)]


def test_async_scheduling_gives_the_synchronous_outputs(tiny_checkpoint):
    """Launching step N+1 before reading step N changes no token and no finish reason:
    greedy and seeded, EOS, stop token ids, min_tokens and max_tokens (incl. 1), under
    forced preemption and with prefix caching; no block leaks."""
    path = tiny_checkpoint("llama")
    prompts = _mixed_prompts(6)
    mix = _async_mix(path, prompts)
    sync = _outputs(LLM(str(path), device="cpu", dtype="float32", async_scheduling=False),
                    prompts, mix)
    assert [r for _, r in sync[:2]] == ["stop", "stop"] and len(sync[0][0]) < 30
    assert [len(t) for t, _ in sync[2:]] == [28, 20, 30, 1]
    for kw in ({}, {"num_kv_blocks": 9, "block_size": 16}):
        llm = LLM(str(path), device="cpu", dtype="float32", async_scheduling=True, **kw)
        assert llm.engine.async_scheduling
        assert _outputs(llm, prompts, mix) == sync, kw
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        if kw:
            assert llm.engine.scheduler.num_preemptions > 0


def test_async_step_returns_the_previous_launch_and_aborts_drop_in_flight_tokens(
        tiny_checkpoint):
    path = tiny_checkpoint("llama")
    llm = LLM(str(path), device="cpu", dtype="float32", async_scheduling=True)
    eng = llm.engine
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    eng.add_request("a", [5, 6, 7], greedy)
    eng.add_request("b", [8, 9], greedy)
    assert eng.step() == []                     # launched; nothing read back yet
    assert eng.has_unfinished()
    first = eng.step()                          # the prefill's tokens, while step 2 runs
    assert sorted(o.request_id for o in first) == ["a", "b"]
    assert eng.abort("b")                       # its in-flight token is dropped
    seen: dict[str, list[int]] = {"a": first[0].new_token_ids if first[0].request_id == "a"
                                  else first[1].new_token_ids, "b": []}
    while eng.has_unfinished():
        for o in eng.step():
            seen[o.request_id] += o.new_token_ids
    assert seen["b"] == [] and len(seen["a"]) == 6
    assert seen["a"] == llm.generate([[5, 6, 7]], greedy)[0].token_ids
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_async_scheduling_steps_synchronously_while_a_penalty_request_runs(tiny_checkpoint):
    """Penalties need every earlier token on the host: outputs equal the synchronous ones."""
    path = tiny_checkpoint("llama")
    params = [SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.3,
                             frequency_penalty=0.4, ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)]
    prompts = _mixed_prompts(2)
    sync = _outputs(LLM(str(path), device="cpu", dtype="float32", async_scheduling=False),
                    prompts, params)
    llm = LLM(str(path), device="cpu", dtype="float32", async_scheduling=True)
    assert _outputs(llm, prompts, params) == sync
