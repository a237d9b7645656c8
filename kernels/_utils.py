"""Small host-side helpers shared by the kernels (no device syncs here)."""

from __future__ import annotations

import functools

import torch
import triton


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device``; 1 off CUDA (interpreter runs: keep grids small)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels index the last dim with stride 1; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


def check_out(out: torch.Tensor | None, like: torch.Tensor, shape: tuple[int, ...],
              name: str = "out") -> torch.Tensor:
    """A caller-provided output buffer (CUDA graphs, tests that poison it), or a new one."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"{name} must be {like.dtype} {tuple(shape)} on {like.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out
