"""silu_and_mul: the gated MLP activation, twin of ``ops.silu_and_mul``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_out, last_dim_contiguous, pdl_options, pdl_wait


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, inter,
                         BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    # grid (T, cdiv(I, BLOCK)); x row: [gate (I) | up (I)], out row: [I]
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inter
    g = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + inter + offs, mask=ok, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, 2I] (gate | up) -> silu(gate) * up: [T, I], computed in float32."""
    if x.dim() != 2 or x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul expects [T, 2I], got {tuple(x.shape)}")
    x = last_dim_contiguous(x)
    t, inter = x.shape[0], x.shape[1] // 2
    out = check_out(out, x, (t, inter))
    if t == 0:
        return out
    block = min(2048, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(t, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4,
        **pdl_options(x.device))
    return out
