"""Small host-side helpers shared by the kernels (no device syncs here)."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


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


@functools.lru_cache(maxsize=8)
def _pdl_capable(index: int) -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    fields = getattr(CUDAOptions, "__dataclass_fields__", {})
    return "launch_pdl" in fields and torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Launch with programmatic dependent launch (Hopper and later, compiled kernels): a
    kernel may start while the one before it drains, and waits for it (``pdl_wait``)
    before touching memory. ``QWORKER_PDL=0`` turns it off (read at every launch, so a
    CUDA graph keeps what held at capture)."""
    if device.type != "cuda" or os.environ.get("QWORKER_PDL", "") == "0":
        return False
    return _pdl_capable(device.index if device.index is not None
                        else torch.cuda.current_device())


def pdl_options(device: torch.device) -> dict:
    """Launch keywords for a kernel that takes a ``USE_PDL`` constexpr and starts with
    ``pdl_wait(USE_PDL)``."""
    on = use_pdl(device)
    return {"USE_PDL": on, "launch_pdl": True} if on else {"USE_PDL": False}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """First statement of a kernel launched with ``pdl_options``: wait until the previous
    kernel in the stream has finished and its writes are visible, then let the next
    kernel start launching (it waits in turn before it touches memory)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
