"""The Llama-family decoder in plain torch, attending through the paged KV cache.

Covers Llama (SmolLM2; Llama 3 rope scaling), Mistral, Qwen2/2.5 (qkv bias) and Qwen3
(RMSNorm of q and k per head). q/k/v and gate/up projections are fused into one matmul
each; ``load_weights`` concatenates the checkpoint's separate tensors at load time.
Built with a ``TPContext`` of size P > 1 it holds one tensor-parallel shard
(``qworker.model.parallel``): Hq/P query heads and their KV heads, I/P of the MLP, V/P of
the vocabulary; with P == 1 the layers are plain ones.
Shapes: T tokens of a batch, H hidden, Hq/Hkv heads (this rank's), D head_dim, V vocab,
B requests.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from qworker.model.ops_dispatch import (
    fused_add_rms_norm,
    paged_attention,
    rms_norm,
    rope_cos_sin_cache,
    rotary_and_store_kv,
    silu_and_mul,
)
from qworker.model.parallel import (
    SINGLE,
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    TPContext,
    VocabParallelEmbedding,
    even_shard,
    head_shard,
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


def _norm_weight(n: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(n), requires_grad=False)


class Attention(nn.Module):
    def __init__(self, cfg, arch: str, head_dim: int, tp: TPContext) -> None:
        super().__init__()
        hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        if hq % tp.size:
            raise ValueError(f"{hq} attention heads cannot be split over "
                             f"tensor_parallel_size {tp.size}")
        q = head_shard(hq, head_dim, tp, "attention heads")
        kv = head_shard(hkv, head_dim, tp, "key/value heads")
        self.hq, self.hkv, self.d = q.length // head_dim, kv.length // head_dim, head_dim
        self.eps = cfg.rms_norm_eps
        bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = ColumnParallelLinear(cfg.hidden_size, {"q": q, "k": kv, "v": kv},
                                             bias=bias or arch == "qwen2")
        self.o_proj = RowParallelLinear(hq * head_dim, cfg.hidden_size, bias, tp)
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
        k_cache, v_cache = attn.kv_caches[layer]
        q = rotary_and_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache,
                                attn.slot_mapping)              # k, v: rotated into the cache
        o = paged_attention(q, k_cache, v_cache, attn.query_start_loc, attn.seq_lens,
                            attn.block_tables, self.scale)      # [T, Hq, D]
        return self.o_proj(o.reshape(t, self.hq * self.d))    # all-reduced: [T, H]


class MLP(nn.Module):
    def __init__(self, cfg, tp: TPContext) -> None:
        super().__init__()
        bias, inter = bool(getattr(cfg, "mlp_bias", False)), cfg.intermediate_size
        part = even_shard(inter, tp, "intermediate_size")
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, {"gate": part, "up": part},
                                                 bias)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))   # [T, 2I] -> [T, I] -> [T, H]


class DecoderLayer(nn.Module):
    def __init__(self, cfg, arch: str, head_dim: int, index: int, tp: TPContext) -> None:
        super().__init__()
        self.index, self.eps = index, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, arch, head_dim, tp)
        self.mlp = MLP(cfg, tp)
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
    def __init__(self, cfg, arch: str, head_dim: int, tp: TPContext) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, arch, head_dim, i, tp)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = _norm_weight(cfg.hidden_size)


class LlamaForCausalLM(nn.Module):
    """``forward(input_ids[T], positions[T], attn) -> hidden[T, H]``;
    ``compute_logits(hidden[N, H]) -> float32 [N, V]``.

    Build it under ``torch.device(...)`` and ``torch.set_default_dtype`` (as
    ``qworker.model.loader`` does): parameters are uninitialized until ``load_weights``.
    With ``tp.size > 1`` every rank of the group must call ``forward`` and
    ``compute_logits`` with the same shapes (they run collectives); ``num_kv_heads`` is
    then this rank's count (its KV cache holds only those heads).
    """

    def __init__(self, hf_config, tp: TPContext = SINGLE) -> None:
        super().__init__()
        cfg = hf_config
        self.arch, self.tp = architecture_of(cfg), tp
        self.num_layers = cfg.num_hidden_layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size, self.vocab_size = cfg.hidden_size, cfg.vocab_size
        self.eps = cfg.rms_norm_eps
        self.model = LlamaModel(cfg, self.arch, self.head_dim, tp)
        self.num_kv_heads = self.model.layers[0].self_attn.hkv
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp,
                                      self.model.embed_tokens if self.tie_word_embeddings
                                      else None)
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
        h = self.model.embed_tokens(input_ids)                             # [T, H]
        residual = None
        for layer in self.model.layers:
            h, residual = layer(h, residual, positions, self.cos_sin_cache, attn)
        h, _ = fused_add_rms_norm(h, residual, self.model.norm, self.eps)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)                                        # [N, H] -> [N, V]

    def prepack_linears(self) -> int:
        """Pack every linear weight once for the CPU float32 GEMM (``cpu_gemm``): call
        after loading. A no-op off the CPU, for other dtypes and with tensor parallelism.
        Returns how many weights were packed."""
        if self.tp.size != 1:
            return 0
        linears = [lin for layer in self.model.layers
                   for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                               layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        return sum(lin.prepack() for lin in (*linears, self.lm_head))

    # -- weights --------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy (Hugging Face name, tensor) pairs into the fused parameters, keeping this
        rank's shard of each.

        Raises ``ValueError`` on an unexpected name or shape, or if a parameter was not
        fully provided.
        """
        modules = dict(self.named_modules())
        packed = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"),
                  "v_proj": ("qkv_proj", "v"), "gate_proj": ("gate_up_proj", "gate"),
                  "up_proj": ("gate_up_proj", "up")}
        filled: dict[int, int] = {}                             # id(parameter) -> elements
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue            # tied: the embedding is the output projection
            target = name.replace("layernorm.weight", "layernorm").replace("norm.weight", "norm")
            parts = target.split(".")
            part = None
            if len(parts) >= 2 and parts[-2] in packed:
                parts[-2], part = packed[parts[-2]]
            module, attr = modules.get(".".join(parts[:-1])), parts[-1]
            param = getattr(module, attr, None) if module is not None else None
            if not isinstance(param, nn.Parameter):
                raise ValueError(f"unexpected weight {name!r} for {self.arch}")
            try:
                if hasattr(module, "load"):
                    n = module.load(attr, tensor, part)
                elif tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"has shape {tuple(tensor.shape)}, expected "
                                     f"{tuple(param.shape)}")
                else:
                    n = param.data.copy_(tensor).numel()
            except ValueError as e:
                raise ValueError(f"weight {name!r}: {e}") from None
            filled[id(param)] = filled.get(id(param), 0) + n
        missing = [n for n, p in self.named_parameters() if filled.get(id(p), 0) != p.numel()]
        if missing:
            raise ValueError(f"checkpoint lacks weights for {len(missing)} parameter(s), "
                             f"e.g. {missing[:3]}")
