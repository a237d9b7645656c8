"""Reference ops in plain torch: the CPU path, and the oracle of the Triton kernels.

Each function here has a Triton twin in ``qworker_kernels`` with the same signature;
``qworker.model.ops_dispatch`` (the model's import) picks one by device.
Shapes: T tokens, H hidden, Hq/Hkv query/KV heads, D head_dim, B requests.
"""

from __future__ import annotations

import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H] -> [T, H]; computed in float32, returned in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); both [T, H] in x's dtype."""
    s = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(s, weight, eps), s


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] @ weight[N, K].T (+ bias [N]) -> [M, N]."""
    return torch.nn.functional.linear(x, weight, bias)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate | up) -> silu(gate) * up: [T, I]."""
    i = x.shape[-1] // 2
    g, u = x[..., :i].float(), x[..., i:].float()
    return (torch.nn.functional.silu(g) * u).to(x.dtype)


def rope_cos_sin_cache(head_dim: int, max_position: int, base: float,
                       scaling: dict | None = None, partial_rotary_factor: float = 1.0,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """[max_position, rot_dim] float32 = cat(cos, sin) over rot_dim/2 frequencies each.

    ``scaling`` follows Hugging Face's ``rope_scaling``: None/"default", or
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}; "linear" divides positions by ``factor``.
    """
    rot_dim = int(head_dim * partial_rotary_factor)
    # float32 throughout, as Hugging Face computes it, so fp32 runs match it token for token.
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    t = torch.arange(max_position, dtype=torch.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_mid, mid, scaled)
    elif kind == "linear":
        t = t / scaling["factor"]
    elif kind not in ("default", None):
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3)")
    freqs = torch.outer(t, inv_freq.float())
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary on the first rot_dim dims of each head.

    q: [T, Hq, D], k: [T, Hkv, D], positions: [T], cos_sin_cache: [max_pos, rot_dim].
    Returns new (q, k) in their dtypes.
    """
    cs = cos_sin_cache.index_select(0, positions)          # [T, rot_dim]
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]       # [T, 1, rot/2]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2, rest = xf[..., :half], xf[..., half:2 * half], xf[..., 2 * half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
        return out.to(x.dtype)

    return rot(q), rot(k)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at slots.

    A slot of -1 is skipped (padding tokens).
    """
    nb, bs, hkv, d = k_cache.shape
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:     # padding rows: drop them
        keep = slot_mapping >= 0
        slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
    slots = slot_mapping.long()
    k_cache.view(nb * bs, hkv, d).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(nb * bs, hkv, d).index_copy_(0, slots, value.to(v_cache.dtype))


def rotary_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` to q and k, then ``store_kvcache`` of the rotated k and v.

    Returns the rotated q [T, Hq, D] (attention reads k and v from the cache).
    """
    q, k = apply_rotary(q, k, positions, cos_sin_cache)
    store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    return q


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a mixed batch of prefill chunks and decodes through block tables.

    q: [T, Hq, D]; caches: [num_blocks, block_size, Hkv, D]; query_start_loc: [B+1];
    seq_lens: [B] (context length including this step's tokens); block_tables: [B, M].
    Request b's q_len queries are its last q_len tokens; each attends to its own position
    and everything before it. Returns [T, Hq, D] in q's dtype. Computed in float32 with
    torch's fused SDPA: decodes together (keys past a request's length masked out),
    prefill chunks one by one. Reads the lengths on the host: the CPU path and the
    kernels' oracle, not for CUDA graphs.
    """
    plan = _plan(query_start_loc, seq_lens, block_tables, k_cache.shape[1])
    if plan.decode_rows is not None and not plan.chunks and plan.decode_in_order:
        return _attend(q.unsqueeze(1), k_cache, v_cache, plan.decode_slots,
                       plan.decode_mask, scale)[:, 0]           # a pure decode step
    out = torch.empty_like(q)
    if plan.decode_rows is not None:
        rows = plan.decode_rows
        out[rows] = _attend(q[rows].unsqueeze(1), k_cache, v_cache, plan.decode_slots,
                            plan.decode_mask, scale)[:, 0]
    for start, end, slots, mask in plan.chunks:
        out[start:end] = _attend(q[start:end].unsqueeze(0), k_cache, v_cache, slots, mask,
                                 scale)[0]
    return out


class _Plan:
    """What every layer of one step shares: which rows decode, the cache slots each row
    reads, and the masks."""

    __slots__ = ("key", "decode_rows", "decode_in_order", "decode_slots", "decode_mask",
                 "chunks")


_last_plan: _Plan | None = None


def _slots(block_tables: torch.Tensor, s: int, block_size: int) -> torch.Tensor:
    """[N, M] block tables -> [N, s] int64 cache slots of positions 0..s-1."""
    blocks = block_tables[:, :-(-s // block_size)].long()                        # [N, nblk]
    offsets = torch.arange(block_size, device=blocks.device)
    return (blocks[:, :, None] * block_size + offsets).flatten(1)[:, :s]


def _plan(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
          block_size: int) -> _Plan:
    """Built once per step and reused by every layer: the cache is keyed on copies of the
    inputs' values (a runner may refill the same tensors in place between steps)."""
    global _last_plan
    inputs = (query_start_loc, seq_lens, block_tables)
    last = _last_plan
    if last is not None and all(a.shape == b.shape and a.device == b.device and torch.equal(a, b)
                                for a, b in zip(last.key, inputs, strict=True)):
        return last
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    dev = block_tables.device
    plan = _Plan()
    plan.key = tuple(t.clone() for t in inputs)
    decodes = [b for b in range(len(lens)) if qsl[b + 1] - qsl[b] == 1]
    plan.decode_rows = plan.decode_slots = plan.decode_mask = None
    plan.decode_in_order = decodes == list(range(len(lens))) and qsl[-1] == len(lens)
    if decodes:
        d_lens = [lens[b] for b in decodes]
        s = max(d_lens)
        plan.decode_rows = torch.tensor([qsl[b] for b in decodes], device=dev)
        valid = torch.arange(s, device=dev)[None, :] < torch.tensor(d_lens, device=dev)[:, None]
        slots = _slots(block_tables[decodes], s, block_size)                      # [N, S]
        # Keys past a request's length are masked out; they re-read the request's own
        # first slot, so whatever other requests left in the pool never enters the sum
        # (a masked key weighs exactly 0, and 0 * a finite value is 0).
        plan.decode_slots = torch.where(valid, slots, slots[:, :1])
        plan.decode_mask = valid[:, None, None, :]                                # [N,1,1,S]
    plan.chunks = []
    for b, s in enumerate(lens):
        start, end = qsl[b], qsl[b + 1]
        if end - start > 1:   # query i sits at s - L + i and sees keys 0..itself
            q_pos = torch.arange(s - (end - start), s, device=dev)
            mask = torch.arange(s, device=dev)[None, :] <= q_pos[:, None]        # [L, S]
            plan.chunks.append((start, end, _slots(block_tables[b:b + 1], s, block_size),
                                mask))
    _last_plan = plan
    return plan


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            slots: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [N, L, Hq, D], the last L tokens of N sequences (L == 1, or N == 1) whose keys
    sit in cache ``slots`` [N, S]. ``mask``: [N, 1, 1, S] valid keys of decodes, or
    [L, S] causal for one chunk. Returns [N, L, Hq, D]."""
    _, _, hkv, d = k_cache.shape
    hq = q.shape[2]
    n, s = slots.shape
    flat = slots.reshape(-1)
    k = k_cache.view(-1, hkv, d).index_select(0, flat).view(n, s, hkv, d)
    v = v_cache.view(-1, hkv, d).index_select(0, flat).view(n, s, hkv, d)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),
        attn_mask=mask, scale=scale, enable_gqa=hq != hkv)             # [N, Hq, L, D]
    return o.transpose(1, 2).to(q.dtype)
