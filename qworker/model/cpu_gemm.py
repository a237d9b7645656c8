"""Pre-packed float32 GEMMs for the CPU path (oneDNN).

A plain ``F.linear`` on the CPU repacks the weight matrix into the GEMM's blocked layout
on every call. At decode batch sizes (a few to a few dozen rows) that repacking reads and
writes the whole weight once more, so the linears run about 1.4-2.3x slower than on a
weight packed once at load time (measured on this project's 2-core EPYC CI machine:
``scripts/bench_offline.py --workload W_cpu``, see docs/benchmarks.md). oneDNN's
``_reorder_linear_weight`` / ``_linear_pointwise`` pair is what torch's own CPU freezing
pass uses for the same purpose.

Results differ from ``F.linear`` only by float32 summation order (a few ulps).
"""

from __future__ import annotations

import torch


def available(weight: torch.Tensor) -> bool:
    """Whether ``weight`` [N, K] can be packed: float32 on a CPU with oneDNN."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.dim() == 2 and torch.backends.mkldnn.is_available())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 -> an opaque oneDNN tensor for ``packed_linear`` (a copy: the
    original stays valid and unchanged)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def packed_linear(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for a ``pack``-ed W: x [..., K] float32 -> [..., N]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
