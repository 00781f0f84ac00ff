"""What the frontends may know about a loaded engine: read-only facts, and no handle on its moving parts.

The server sees an AsyncEngine and this object, never the synchronous engine, its runner or its block pool, so that
the engine core can change (or move to another process) without the server noticing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class EngineInfo:
    model_path: Path
    architecture: str
    num_parameters: int
    dtype: torch.dtype
    device: torch.device
    attention_backend: str  # the backend chosen, and why, in one line
    max_model_len: int  # after capping by the KV pool
    vocab_size: int  # the model's embedding rows: token ids must be below this
    tokenizer: Tokenizer
    generation_defaults: Mapping[str, object]  # SamplingParams fields from generation_config.json
    num_kv_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_prefix_caching: bool
    scheduling_policy: str  # "fair", "fcfs" or "priority" (engine/scheduler.py)
    tensor_parallel_size: int = 1
    parallel_layout: str = "one process"  # engine/parallel.py describe_layout
