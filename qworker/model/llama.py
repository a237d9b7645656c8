"""The Llama-family decoder in plain torch, attending through the paged KV cache.

Covers Llama (SmolLM2; Llama 3 rope scaling), Mistral, Qwen2/2.5 (qkv bias) and Qwen3
(RMSNorm of q and k per head). q/k/v and gate/up projections are fused into one matmul
each; ``load_weights`` concatenates the checkpoint's separate tensors at load time.
Shapes: T tokens of a batch, H hidden, Hq/Hkv heads, D head_dim, V vocab, B requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from qworker.model.ops_dispatch import (
    apply_rotary,
    fused_add_rms_norm,
    paged_attention,
    rms_norm,
    rope_cos_sin_cache,
    silu_and_mul,
    store_kvcache,
)

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
}


def architecture_of(hf_config) -> str:
    """The model family ("llama", "mistral", "qwen2", "qwen3") of a transformers config.

    Raises ``ValueError`` naming the unsupported architecture and the supported ones.
    """
    archs = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[a]
    if not archs and model_type in SUPPORTED_ARCHITECTURES.values():
        return model_type
    raise ValueError(f"unsupported model architecture {', '.join(archs) or None} "
                     f"(model_type {model_type!r}); supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}")


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens go in the paged KV cache (see docs/design.md)."""

    slot_mapping: torch.Tensor      # [T] int64: block_id * block_size + pos % block_size
    query_start_loc: torch.Tensor   # [B+1] int32: prefix sums of tokens per request
    seq_lens: torch.Tensor          # [B] int32: context length after this step
    block_tables: torch.Tensor      # [B, M] int32, padded with 0
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [blocks, bs, Hkv, D] x2


class Linear(nn.Module):
    """y = x @ W.T + b, with uninitialized storage (the checkpoint fills it)."""

    def __init__(self, n_in: int, n_out: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(n_out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def _norm_weight(n: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(n), requires_grad=False)


class Attention(nn.Module):
    def __init__(self, cfg, arch: str, head_dim: int) -> None:
        super().__init__()
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim
        self.eps = cfg.rms_norm_eps
        bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = Linear(cfg.hidden_size, (self.hq + 2 * self.hkv) * head_dim,
                               bias=bias or arch == "qwen2")
        self.o_proj = Linear(self.hq * head_dim, cfg.hidden_size, bias=bias)
        self.qk_norm = arch == "qwen3"
        if self.qk_norm:
            self.q_norm, self.k_norm = _norm_weight(head_dim), _norm_weight(head_dim)
        self.scale = head_dim ** -0.5

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                attn: AttentionMetadata, layer: int) -> torch.Tensor:
        t = h.shape[0]
        qkv = self.qkv_proj(h)                                  # [T, (Hq + 2Hkv) * D]
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q, k = q.reshape(t, self.hq, self.d), k.reshape(t, self.hkv, self.d)
        v = v.reshape(t, self.hkv, self.d)
        if self.qk_norm:                                        # Qwen3: per-head RMSNorm
            q = rms_norm(q.reshape(-1, self.d), self.q_norm, self.eps).view(t, self.hq, self.d)
            k = rms_norm(k.reshape(-1, self.d), self.k_norm, self.eps).view(t, self.hkv, self.d)
        q, k = apply_rotary(q, k, positions, cos_sin)
        k_cache, v_cache = attn.kv_caches[layer]
        store_kvcache(k, v, k_cache, v_cache, attn.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, attn.query_start_loc, attn.seq_lens,
                            attn.block_tables, self.scale)      # [T, Hq, D]
        return self.o_proj(o.reshape(t, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))   # [T, 2I] -> [T, I] -> [T, H]


class DecoderLayer(nn.Module):
    def __init__(self, cfg, arch: str, head_dim: int, index: int) -> None:
        super().__init__()
        self.index, self.eps = index, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, arch, head_dim)
        self.mlp = MLP(cfg)
        self.input_layernorm = _norm_weight(cfg.hidden_size)
        self.post_attention_layernorm = _norm_weight(cfg.hidden_size)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                cos_sin: torch.Tensor, attn: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        # h is the previous sublayer's output; residual the running sum before it.
        if residual is None:
            residual, h = h, rms_norm(h, self.input_layernorm, self.eps)
        else:
            h, residual = fused_add_rms_norm(h, residual, self.input_layernorm, self.eps)
        h = self.self_attn(h, positions, cos_sin, attn, self.index)
        h, residual = fused_add_rms_norm(h, residual, self.post_attention_layernorm, self.eps)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg, arch: str, head_dim: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size),
                                         requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, arch, head_dim, i)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = _norm_weight(cfg.hidden_size)


class LlamaForCausalLM(nn.Module):
    """``forward(input_ids[T], positions[T], attn) -> hidden[T, H]``;
    ``compute_logits(hidden[N, H]) -> float32 [N, V]``.

    Build it under ``torch.device(...)`` and ``torch.set_default_dtype`` (as
    ``qworker.model.loader`` does): parameters are uninitialized until ``load_weights``.
    """

    def __init__(self, hf_config) -> None:
        super().__init__()
        cfg = hf_config
        self.arch = architecture_of(cfg)
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size, self.vocab_size = cfg.hidden_size, cfg.vocab_size
        self.eps = cfg.rms_norm_eps
        self.model = LlamaModel(cfg, self.arch, self.head_dim)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else Linear(cfg.hidden_size,
                                                                   cfg.vocab_size, bias=False)
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
                    or {})
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        partial = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0))
        cos_sin = rope_cos_sin_cache(self.head_dim, cfg.max_position_embeddings, theta,
                                     rope or None, partial,
                                     device=self.model.norm.device)   # [max_pos, rot_dim] fp32
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionMetadata) -> torch.Tensor:
        h = nn.functional.embedding(input_ids, self.model.embed_tokens)   # [T, H]
        residual = None
        for layer in self.model.layers:
            h, residual = layer(h, residual, positions, self.cos_sin_cache, attn)
        h, _ = fused_add_rms_norm(h, residual, self.model.norm, self.eps)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.model.embed_tokens if self.lm_head is None else self.lm_head.weight
        return nn.functional.linear(hidden, w).float()                    # [N, V]

    # -- weights --------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (Hugging Face name, tensor) pairs into the fused parameters.

        Raises ``ValueError`` on an unexpected name or shape, or if a parameter was not
        fully provided.
        """
        params = dict(self.named_parameters())
        q, kv = self.model.layers[0].self_attn.hq * self.head_dim, self.num_kv_heads * self.head_dim
        inter = self.model.layers[0].mlp.down_proj.weight.shape[1]
        packed = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv),
                  "v_proj": ("qkv_proj", q + kv, kv), "gate_proj": ("gate_up_proj", 0, inter),
                  "up_proj": ("gate_up_proj", inter, inter)}
        filled: dict[str, int] = {}
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue            # tied: the embedding is the output projection
            name = name.replace("model.embed_tokens.weight", "model.embed_tokens")
            name = name.replace("layernorm.weight", "layernorm").replace("norm.weight", "norm")
            parts = name.split(".")
            target, start, size = name, 0, None
            if len(parts) >= 2 and parts[-2] in packed:
                fused, start, size = packed[parts[-2]]
                target = ".".join(parts[:-2] + [fused, parts[-1]])
            if target not in params:
                raise ValueError(f"unexpected weight {name!r} for {self.arch}")
            dest = params[target].data
            if size is not None:
                dest = dest.narrow(0, start, size)
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            filled[target] = filled.get(target, 0) + tensor.numel()
        missing = [n for n, p in params.items() if filled.get(n, 0) != p.numel()]
        if missing:
            raise ValueError(f"checkpoint lacks weights for {len(missing)} parameter(s), "
                             f"e.g. {missing[:3]}")
