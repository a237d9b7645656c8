"""The ops the model calls, routed by device: Triton kernels on CUDA, torch elsewhere.

Each has the name and signature of its ``qworker.model.ops`` reference (the model calls
the fused ``rotary_and_store_kv``, not its two parts). ``qworker_kernels`` (the top-level
``kernels/`` folder) is imported lazily on the first CUDA call; if it is missing or fails
to import, or ``QWORKER_DISABLE_KERNELS=1`` is set, every call uses the torch reference
(with one warning when CUDA tensors meet missing kernels).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import ModuleType

import torch

from qworker.model import ops
from qworker.model.ops import rope_cos_sin_cache

__all__ = [
    "SKINNY_MAX_ROWS", "fused_add_rms_norm", "kernels_module", "linear", "paged_attention",
    "rms_norm", "rope_cos_sin_cache", "rotary_and_store_kv", "silu_and_mul",
]

log = logging.getLogger(__name__)
_kernels: ModuleType | None | bool = None      # None: not tried yet; False: unavailable


def kernels_module() -> ModuleType | None:
    """The imported ``qworker_kernels`` module, or None when it cannot be used."""
    global _kernels
    if _kernels is None:
        if os.environ.get("QWORKER_DISABLE_KERNELS", "") not in ("", "0"):
            _kernels = False
        else:
            try:
                import qworker_kernels
                _kernels = qworker_kernels
            except Exception as e:  # noqa: BLE001 - any failure means "use the reference"
                log.warning("qworker_kernels unavailable (%s: %s); using torch ops on CUDA",
                            type(e).__name__, e)
                _kernels = False
    return _kernels or None


def _pick(name: str, t: torch.Tensor) -> Callable:
    if t.is_cuda:
        k = kernels_module()
        if k is not None and hasattr(k, name):
            return getattr(k, name)
    return getattr(ops, name)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _pick("rms_norm", x)(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _pick("fused_add_rms_norm", x)(x, residual, weight, eps)


# Batches of up to this many rows (decode steps of <= 16 requests, short chunks) multiply
# through the Triton skinny GEMM on CUDA, for the weight shapes where it beats cuBLAS
# (``qworker_kernels.linear_wins``); everything else goes to cuBLAS. The kernel computes
# a row the same way whatever the row count, so below this bound a request's linears do
# not change with its batch; above it cuBLAS's own kernel choice applies
# (docs/benchmarks.md, fourth session, "Batch invariance").
SKINNY_MAX_ROWS = 16
_SKINNY_DTYPES = (torch.bfloat16, torch.float16)


def _skinny(x: torch.Tensor, weight: torch.Tensor) -> ModuleType | None:
    """The kernels module when ``x @ weight.T`` goes to the skinny GEMM, else None."""
    if not (x.is_cuda and x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS
            and x.dtype in _SKINNY_DTYPES):
        return None
    k = kernels_module()
    if k is None or not k.linear_enabled():
        return None
    return k if k.linear_wins(weight.shape[0], weight.shape[1]) else None


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``ops.linear``; on CUDA, x of at most ``SKINNY_MAX_ROWS`` rows in bf16/fp16 goes
    to ``qworker_kernels.linear`` where it wins (``QWORKER_SKINNY_LINEAR=0``: never)."""
    k = _skinny(x, weight)
    return k.linear(x, weight, bias) if k is not None else ops.linear(x, weight, bias)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _pick("silu_and_mul", x)(x)


def rotary_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> torch.Tensor:
    return _pick("rotary_and_store_kv", q)(q, k, v, positions, cos_sin_cache, k_cache,
                                           v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    return _pick("paged_attention", q)(q, k_cache, v_cache, query_start_loc, seq_lens,
                                       block_tables, scale)


for _f in (rms_norm, fused_add_rms_norm, silu_and_mul, rotary_and_store_kv, paged_attention):
    _f.__doc__ = getattr(ops, _f.__name__).__doc__
