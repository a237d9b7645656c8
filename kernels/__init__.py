"""Triton kernels for qworker, the GPU twins of ``qworker.model.ops``.

Every kernel function has exactly the signature of its torch reference in
``qworker/model/ops.py`` (plus optional keyword-only arguments) and is checked against
it by ``tests/test_kernels.py``. ``linear_enabled``, ``linear_wins`` and
``LinearConfig`` tell ``qworker.model.ops_dispatch`` when the skinny GEMM serves a
linear. On a machine without CUDA the kernels run only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is imported).
"""

from .activation import silu_and_mul
from .attention import paged_attention
from .cache import store_kvcache
from .norm import fused_add_rms_norm, rms_norm
from .rotary import apply_rotary, rotary_and_store_kv
from .skinny_linear import LinearConfig, linear, linear_enabled, linear_wins

__all__ = [
    "apply_rotary",
    "fused_add_rms_norm",
    "LinearConfig",
    "linear",
    "linear_enabled",
    "linear_wins",
    "paged_attention",
    "rms_norm",
    "rotary_and_store_kv",
    "silu_and_mul",
    "store_kvcache",
]
