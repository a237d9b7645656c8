"""Checkpoint directory -> our model, its config, tokenizer, eos ids and length limit."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qworker.model.llama import LlamaForCausalLM, architecture_of
from qworker.model.parallel import SINGLE, TPContext

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedModel:
    """Everything the engine needs from a checkpoint."""

    config: Any                   # transformers.PretrainedConfig
    model: LlamaForCausalLM
    tokenizer: Any                # transformers tokenizer
    eos_token_ids: set[int]       # config.json + generation_config.json (+ tokenizer's)
    max_model_len: int            # the model's own limit (capped by a sliding window)


def load_model(path: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32, load_format: str = "auto",
               tp: TPContext = SINGLE) -> LoadedModel:
    """Load a Hugging Face checkpoint directory (safetensors, single or sharded).

    With ``tp.size > 1`` the model keeps only rank ``tp.rank``'s tensor-parallel shard
    (each rank reads the checkpoint tensor by tensor and copies its slice).

    ``load_format="dummy"`` needs only config.json: weights are random (normal, std 0.02;
    norms 1), the tokenizer is optional. Raises ``ValueError`` for an unsupported
    architecture (before reading any weight) and ``FileNotFoundError`` when the directory
    has no safetensors weights.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    device = torch.device(device)
    config = AutoConfig.from_pretrained(path)
    architecture_of(config)                     # fail fast, naming what is supported
    files = _weight_files(path) if load_format != "dummy" else []
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(config, tp)
    if load_format == "dummy":
        _random_init(model)
    else:
        model.load_weights(_iter_weights(files))
    model.eval()
    model.prepack_linears()     # CPU float32 only: decode-sized GEMMs ~1.4-2x faster
    tokenizer = None            # token ids in, token ids out: no text
    # transformers 5 builds an empty tokenizer for a directory without tokenizer files;
    # detokenizing with it wastes ~50 us per token, so a dummy checkpoint must have files.
    if load_format != "dummy" or any((path / f).is_file() for f in _TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            if load_format != "dummy":
                raise
    eos = eos_token_ids(path, config, tokenizer)
    return LoadedModel(config, model, tokenizer, eos, _max_model_len(config, path))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "vocab.json", "tokenizer.tiktoken")


@torch.no_grad()
def _random_init(model: torch.nn.Module) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def eos_token_ids(path: Path, config, tokenizer=None) -> set[int]:
    """Union of eos ids from config.json and generation_config.json; the tokenizer's eos
    only when neither names one."""
    ids: set[int] = set(_as_ids(getattr(config, "eos_token_id", None)))
    gen = path / "generation_config.json"
    if gen.is_file():
        ids |= set(_as_ids(json.loads(gen.read_text()).get("eos_token_id")))
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _as_ids(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]


def _max_model_len(config, path: Path) -> int:
    n = int(getattr(config, "max_position_embeddings", 0) or 0) or 2048
    window = getattr(config, "sliding_window", None)
    uses_window = architecture_of(config) == "mistral" or getattr(config, "use_sliding_window",
                                                                  False)
    if window and uses_window and window < n:
        log.warning("%s uses sliding-window attention (window %d) which qworker does not "
                    "implement; capping max_model_len from %d to %d", path.name, window, n,
                    window)
        n = int(window)
    return n


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


def _iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, sf.get_tensor(name)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
