"""rms_norm and fused_add_rms_norm, twins of the ops in ``qworker.model.ops``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_out, last_dim_contiguous, next_pow2, pdl_options, pdl_wait


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
                     stride_x, stride_res, stride_out, stride_sum, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr):
    # grid (T,); one program normalises one row of `hidden` (<= BLOCK) elements.
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=ok, other=0.0)
        # the sum is rounded to the input dtype first, and normalised from that, as in ops
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * stride_sum + offs, x, mask=ok)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, ((xf * inv) * w).to(out_ptr.dtype.element_ty),
             mask=ok)


def _launch(x, residual, weight, eps, out, sum_out):
    t, hidden = x.shape
    block = next_pow2(hidden)
    num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    has_res = residual is not None
    _rms_norm_kernel[(t,)](
        x, residual if has_res else x, weight, out, sum_out if has_res else out,
        x.stride(0), residual.stride(0) if has_res else 0, out.stride(0),
        sum_out.stride(0) if has_res else 0, hidden, float(eps),
        HAS_RESIDUAL=has_res, BLOCK=block, num_warps=num_warps, **pdl_options(x.device))


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm expects x [T, H] and weight [H], got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, H] -> [T, H]; computed in float32, returned in x's dtype."""
    _check(x, weight)
    x = last_dim_contiguous(x)
    out = check_out(out, x, tuple(x.shape))
    if x.shape[0]:
        _launch(x, None, weight.contiguous(), eps, out, None)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float, *, out: torch.Tensor | None = None,
                       residual_out: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); both [T, H] in x's dtype.

    ``residual_out`` may be ``residual`` itself (in place: each row is read before written).
    """
    _check(x, weight)
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    x, residual = last_dim_contiguous(x), last_dim_contiguous(residual)
    out = check_out(out, x, tuple(x.shape))
    residual_out = check_out(residual_out, x, tuple(x.shape), "residual_out")
    if x.shape[0]:
        _launch(x, residual, weight.contiguous(), eps, out, residual_out)
    return out, residual_out
