"""attnserve engine: paged KV cache, continuous batching, batched masked SDPA attention.

Offline use: `from engine import LLM, SamplingParams`.
"""

from engine.async_engine import AsyncEngine
from engine.engine_args import EngineArgs
from engine.errors import AttnServeError, EngineDeadError, ModelLoadError, UnsupportedArchitectureError, ValidationError
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "AttnServeError",
    "CompletionOutput",
    "EngineArgs",
    "EngineDeadError",
    "LLMEngine",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
    "UnsupportedArchitectureError",
    "ValidationError",
]
