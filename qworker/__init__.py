"""qworker: LLM inference workers fed by a Redis stream, with continuous batching.

Offline: ``LLM``, ``SamplingParams``. Queue side: ``Client``, ``AsyncClient`` (import
redis only when used).
"""

from qworker.config import EngineConfig
from qworker.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "Engine", "EngineConfig", "SamplingParams", "Client", "AsyncClient",
           "__version__"]


def __getattr__(name: str):
    # Lazy: importing qworker must not import torch or redis until they are needed.
    if name == "LLM":
        from qworker.engine.llm import LLM
        return LLM
    if name == "Engine":
        from qworker.engine.engine import Engine
        return Engine
    if name in ("Client", "AsyncClient"):
        from qworker.worker import client
        return getattr(client, name)
    raise AttributeError(f"module 'qworker' has no attribute {name!r}")
