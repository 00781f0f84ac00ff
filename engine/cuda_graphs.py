"""CUDA graphs for decode steps: capture once per batch size at start-up, then replay.

A decode step of a small model is bound by kernel launches, not by the GPU: a few hundred launches
at several microseconds each dwarf the math. A graph replays a whole captured forward as one launch.
A graph's shapes and addresses are frozen, so:
- only pure decode steps replay (one token per sequence); anything with a prefill chunk runs eagerly;
- a batch is padded up to the next captured size with harmless dummy rows (engine/step_inputs.py);
- the graph reads the runner's preallocated input buffers and writes logits into one preallocated
  buffer; sampling, which depends on each request's parameters, runs after it, outside;
- the attention metadata is planned per captured size with nothing that depends on the step's
  lengths (AttentionBackend.plan_graph_decode), so one capture serves every later step.

All sizes are captured largest first into one shared memory pool: replays never overlap, so every
graph can reuse the memory the others use for their intermediates.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import EngineConfig
from kernels.interface import AttentionBackend

logger = logging.getLogger(__name__)

# Past this many sequences a decode step's launches are amortized over the batch anyway, and each
# size costs capture time and memory; larger decode batches run eagerly.
MAX_CAPTURE_SIZE = 512


def capture_sizes(max_batch_size: int) -> list[int]:
    """The decode batch sizes to capture, ascending: 1, 2, 4, 8, then steps of 16, and the cap itself
    (min(max_batch_size, MAX_CAPTURE_SIZE)) so that every batch up to it has a graph."""
    cap = min(max_batch_size, MAX_CAPTURE_SIZE)
    if cap < 1:
        raise ValueError(f"the largest decode batch must be at least 1, got {max_batch_size}")
    sizes = [s for s in (1, 2, 4, 8) if s <= cap] + list(range(16, cap + 1, 16))
    if sizes[-1] != cap:
        sizes.append(cap)
    return sizes


def padded_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest of `sizes` (ascending) that holds num_seqs, or None if none does."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


def cuda_graphs_unavailable(config: EngineConfig, backend: AttentionBackend) -> str | None:
    """None if decode steps can use CUDA graphs with this configuration, else why not."""
    if config.device.type != "cuda":
        return f"the device is {config.device.type}, not CUDA"
    if config.enforce_eager:
        return "enforce_eager is set"
    if config.parallel.tensor_parallel_size > 1:
        return "tensor parallelism is on (a captured step would have to replay the ranks' collectives too)"
    if not hasattr(torch.cuda, "CUDAGraph"):
        return f"torch {torch.__version__} has no torch.cuda.CUDAGraph"
    return backend.cuda_graph_unsupported()


@dataclass
class CaptureReport:
    seconds: float
    memory_bytes: int  # device memory the graphs, their pool and the logits buffer took


class DecodeGraphs:
    """One captured decode forward per batch size, all writing into one logits buffer."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits  # [largest size, vocab] float32
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # NOTE: a graph holds raw addresses; these keep the tensors behind them (the per-size attention
        # metadata and its scratch buffers) alive for as long as the graph may be replayed.
        self.metadata: dict[int, Any] = {}

    @classmethod
    def capture(
        cls,
        sizes: list[int],
        vocab_size: int,
        device: torch.device,
        plan: Callable[[int], Any],
        forward: Callable[[int, Any], torch.Tensor],
    ) -> tuple[DecodeGraphs, CaptureReport]:
        """plan(b): fill the input buffers with b padding rows and return the graph metadata for b;
        forward(b, metadata): the model forward over the first b rows of the input buffers -> logits."""
        # NOTE: capture and replay run under the cache's device: a graph records the current device's
        # stream, which for "cuda:N" need not be N.
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            free_before = torch.cuda.mem_get_info()[0]
            start = time.perf_counter()
            graphs = cls(torch.zeros(max(sizes), vocab_size, dtype=torch.float32, device=device))
            pool = None
            for size in sorted(sizes, reverse=True):
                metadata = plan(size)
                # An eager run first: it compiles the Triton kernels and lets lazily made buffers (split-KV
                # scratch, rotary tables) be allocated outside the graph pool, where they outlive capture.
                graphs.logits[:size].copy_(forward(size, metadata))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    graphs.logits[:size].copy_(forward(size, metadata))
                pool = graph.pool() if pool is None else pool
                graphs.graphs[size] = graph
                graphs.metadata[size] = metadata
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            torch.cuda.empty_cache()
            used = free_before - torch.cuda.mem_get_info()[0]
        _release_at_exit(graphs)
        return graphs, CaptureReport(seconds, used)

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph captured for `size` over what the input buffers hold now: [size, vocab] logits."""
        with torch.cuda.device(self.logits.device):
            self.graphs[size].replay()
        return self.logits[:size]

    def release(self) -> None:
        self.graphs.clear()
        self.metadata.clear()


def _release_at_exit(graphs: DecodeGraphs) -> None:
    # Graphs destroyed during interpreter teardown, after CUDA state they refer to, can hang or crash
    # the exit (nano-vllm had to release its graphs explicitly); release them while torch is intact.
    ref = weakref.ref(graphs)

    def release() -> None:
        alive = ref()
        if alive is not None:
            alive.release()

    atexit.register(release)
