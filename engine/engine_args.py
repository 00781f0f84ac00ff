"""User-facing engine options (vLLM's names) and their validation into an EngineConfig."""

from __future__ import annotations

import dataclasses

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from engine.chat_template import load_chat_template_arg
from engine.config import (EXECUTOR_BACKENDS, SCHEDULING_POLICIES, CacheConfig, EngineConfig, ModelConfig,
                           ParallelConfig, SchedulerConfig, parse_dtype)
from engine.errors import ValidationError
from engine.hub import resolve_model
from engine.parallel import check_layout
from engine.spec_decode import check_draft_vocabulary, parse_speculative_config
from kernels.backend import choose_attention_backend

# "dummy" builds the model from config.json with random weights (benchmarks of published shapes, as in vLLM).
LOAD_FORMATS = ("auto", "safetensors", "dummy")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like '1GiB', '512MiB', '2G'."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValidationError(f"kv_cache_memory must be a byte count like 1GiB or 512MiB, got {value!r}", "kv_cache_memory")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValidationError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}", "device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValidationError("device cuda was requested but CUDA is not available", "device")
    if dev.type not in ("cpu", "cuda"):
        raise ValidationError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}", "device")
    return dev


@dataclass
class EngineArgs:
    model: str | Path | None = None  # a model directory or a Hugging Face Hub id ORG/NAME; None: the demo model
    revision: str | None = None  # branch, tag or commit of a hub id (None: "main"); a local directory has none
    chat_template: str | None = None  # a Jinja file or the template itself, replacing the model's (None: the model's)
    device: str | None = "auto"
    dtype: str | None = "auto"
    seed: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | str = 1 << 30
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int | None = None  # None: 256, or fewer if the token budget is smaller
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fair"  # see engine.config.SchedulerConfig.policy
    attention_backend: str | None = None
    load_format: str = "auto"
    enforce_eager: bool | None = None  # None: the ATTNSERVE_ENFORCE_EAGER environment variable, else False
    # vLLM's: {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": a, "prompt_lookup_max": b}, or
    # its JSON text (engine/spec_decode.py). None: no speculative decoding.
    speculative_config: dict | str | None = None
    # Tensor parallelism (engine/parallel.py): the model split across this many ranks (processes, one per GPU).
    tensor_parallel_size: int = 1
    distributed_executor_backend: str = "mp"  # "mp": local processes (+ --headless nodes); "external_launcher": torchrun
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None

    @classmethod
    def from_kwargs(cls, model: str | Path | None = None, **kwargs) -> EngineArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(model=model, **kwargs)

    def create_config(self) -> EngineConfig:
        """Validate and freeze. max_model_len is provisional here: the engine caps it by the KV pool once sized."""
        from engine.default_model import default_model_dir

        # The options that do not depend on the model first: a hub id may mean a long download before from_dir.
        device = resolve_device(self.device)
        _positive("block_size", self.block_size)
        if self.max_num_seqs is not None:
            _positive("max_num_seqs", self.max_num_seqs)
        if self.num_kv_blocks is not None:
            _positive("num_kv_blocks", self.num_kv_blocks)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValidationError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}", "gpu_memory_utilization"
            )
        kv_memory = parse_size(self.kv_cache_memory)
        _positive("kv_cache_memory", kv_memory)
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValidationError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got "
                                  f"{self.scheduling_policy!r}", "scheduling_policy")
        if self.load_format not in LOAD_FORMATS:
            raise ValidationError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}",
                                  "load_format")
        try:  # a bad or unavailable choice is the user's input: report it as such, before the model loads
            choose_attention_backend(self.attention_backend, device)
        except (ValueError, RuntimeError) as exc:
            raise ValidationError(str(exc), "attention_backend") from None
        parallel = self._parallel_config()
        chat_template = None if self.chat_template is None else load_chat_template_arg(self.chat_template)
        speculative = parse_speculative_config(self.speculative_config)
        if self.model is None:
            model_dir = default_model_dir()
        else:
            model_dir = resolve_model(self.model, self.revision, self.load_format)
        model = ModelConfig.from_dir(model_dir)
        if speculative is not None and speculative.method == "draft_model":
            draft = ModelConfig.from_dir(resolve_model(speculative.model, None, self.load_format))
            check_draft_vocabulary(model, draft)
            speculative = dataclasses.replace(speculative, draft=draft)
        check_layout(model, parallel, device)
        max_model_len = self.max_model_len or model.max_position_embeddings
        _positive("max_model_len", max_model_len)
        if model.rope is None and max_model_len > model.max_position_embeddings:
            # Learned positions cannot go past the table; RoPE models may (at the user's risk, as in vLLM).
            raise ValidationError(
                f"max_model_len {max_model_len} exceeds the model's {model.max_position_embeddings} learned positions",
                "max_model_len",
            )
        draft = speculative.draft if speculative is not None else None
        if draft is not None and draft.rope is None and max_model_len > draft.max_position_embeddings:
            raise ValidationError(f"max_model_len {max_model_len} exceeds the draft model's "
                                  f"{draft.max_position_embeddings} learned positions; lower max_model_len",
                                  "speculative_config")
        batched = self.max_num_batched_tokens or (2048 if self.enable_chunked_prefill else max(2048, max_model_len))
        _positive("max_num_batched_tokens", batched)
        # Every running sequence must fit in one step's budget, or some decodes would get no token, every step.
        max_num_seqs = self.max_num_seqs if self.max_num_seqs is not None else min(256, batched)
        if batched < max_num_seqs:
            raise ValidationError(
                f"max_num_batched_tokens ({batched}) must be >= max_num_seqs ({max_num_seqs})",
                "max_num_batched_tokens",
            )
        if not self.enable_chunked_prefill and batched < max_model_len:
            raise ValidationError(
                f"without chunked prefill, max_num_batched_tokens ({batched}) must be >= max_model_len ({max_model_len})",
                "max_num_batched_tokens",
            )
        return EngineConfig(
            model=model,
            cache=CacheConfig(self.block_size, self.num_kv_blocks, kv_memory, self.gpu_memory_utilization,
                              self.enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs, batched, max_model_len, self.enable_chunked_prefill,
                                      self.scheduling_policy),
            device=device,
            dtype=parse_dtype(self.dtype, device),
            seed=self.seed,
            attention_backend=self.attention_backend,
            load_format=self.load_format,
            enforce_eager=self.enforce_eager if self.enforce_eager is not None else _env_enforce_eager(),
            chat_template=chat_template,
            speculative=speculative,
            parallel=parallel,
        )

    def _parallel_config(self) -> ParallelConfig:
        n, nnodes = self.tensor_parallel_size, self.nnodes
        _positive("tensor_parallel_size", n)
        _positive("nnodes", nnodes)
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValidationError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}, got "
                                  f"{self.distributed_executor_backend!r}", "distributed_executor_backend")
        if n % nnodes:
            raise ValidationError(f"tensor_parallel_size {n} must be a multiple of nnodes {nnodes} (each node runs the "
                                  "same number of ranks)", "nnodes")
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < nnodes:
            raise ValidationError(f"node_rank must be in [0, {nnodes}), got {self.node_rank!r}", "node_rank")
        if self.master_port is not None and not (isinstance(self.master_port, int) and 0 < self.master_port < 65536):
            raise ValidationError(f"master_port must be a TCP port (1-65535), got {self.master_port!r}", "master_port")
        if nnodes > 1 and self.master_port is None:
            raise ValidationError("nnodes > 1 needs master_port (and master_addr: the address of node 0, where rank 0 "
                                  "listens for the other nodes)", "master_port")
        if self.distributed_executor_backend == "external_launcher":
            world = os.environ.get("WORLD_SIZE")
            if world is None or "RANK" not in os.environ:
                raise ValidationError("distributed_executor_backend external_launcher needs the RANK and WORLD_SIZE "
                                      "that torchrun sets; start the command under torchrun", "distributed_executor_backend")
            if world != str(n):
                raise ValidationError(f"torchrun started {world} processes but tensor_parallel_size is {n}; they must "
                                      "be equal", "tensor_parallel_size")
        return ParallelConfig(n, self.distributed_executor_backend, nnodes, self.node_rank, self.master_addr,
                              self.master_port)


def _env_enforce_eager() -> bool:
    """ATTNSERVE_ENFORCE_EAGER=1 makes eager the default for every engine of the process and its children, for
    example a test suite that starts hundreds of short-lived engines, each of which would otherwise compile."""
    value = os.environ.get("ATTNSERVE_ENFORCE_EAGER", "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValidationError(f"ATTNSERVE_ENFORCE_EAGER must be 1/true/yes or 0/false/no, got {value!r}", "enforce_eager")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"{name} must be a positive integer, got {value!r}", name)
