"""The decoder compiled with torch.compile (inductor) on CPU, with attention left to the eager backend.

What it buys on CPU (docs/benchmarks.md): inductor fuses the norms, rotary, SiLU and residual adds into a few C++
loops, and with `freezing` it treats the weights as constants and packs every linear layer for oneDNN once, which
is 2-4x faster than MKL's sgemm for decode-sized row counts.

The graph is the whole model forward with each attention layer as one opaque custom op (`attnserve::attention`):
the op carries only tensors and constants, and finds the step's ForwardContext (backend, metadata, KV cache) in
`_ACTIVE` under the compiled model's key, which `CompiledModel.__call__` sets around each call. So the per-step
metadata never reaches dynamo's guards, and one graph serves every step.

The token count is dynamic, but each step is padded up to one of a bounded set of sizes (`bucket_sizes`): oneDNN
JIT-compiles a kernel per distinct row count and keeps it (about 1 MiB each), so unpadded steps would grow the
process by one kernel per new batch size. Padding rows only pass through the row-wise layers (attention sees the
real rows only) and are cut off. All sizes run once at start-up, so the first request compiles nothing.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from engine.cuda_graphs import padded_size
from engine.models.common import ForwardContext

logger = logging.getLogger(__name__)

# The smallest padded size: dynamo specializes a dimension of size 1, so a one-row step would compile a second
# graph; a two-row matmul costs the same as a one-row one.
_MIN_BUCKET = 2
_BUCKETS_PER_DOUBLING = 8  # above 16, sizes step by 1/8 of their power of two: at most 12.5% padding


def bucket_sizes(max_size: int) -> list[int]:
    """Ascending padded sizes covering 1..max_size: every size up to 16, then 8 per doubling (16, 18, .., 32, 36,
    .., 64, 72, ..), and max_size itself."""
    sizes = []
    size = _MIN_BUCKET
    while size < max_size:
        sizes.append(size)
        size += 1 if size < 16 else (1 << (size.bit_length() - 1)) // _BUCKETS_PER_DOUBLING
    return sizes + [max(max_size, _MIN_BUCKET)]


def padded_to_bucket(n: int, buckets: list[int]) -> int:
    """The compiled size a step of n rows runs at; the buckets always reach the step budget, so None is a bug."""
    size = padded_size(n, buckets)
    if size is None:
        raise ValueError(f"{n} rows exceed the largest compiled size {buckets[-1]}")
    return size


def room_for_graphs():
    """A context in which dynamo may add a graph past its per-function recompile_limit (8). Start-up compiles
    under it: each engine of a process adds graphs to the same functions (the model class's forward and LM
    head), and past the limit dynamo would run the new engine's uncompiled. Serving steps never compile (every
    size is warmed up), so the limit still stops any recompile at run time."""
    import torch._dynamo.config

    config = torch._dynamo.config
    if not hasattr(config, "recompile_limit"):  # named cache_size_limit before torch 2.7
        return config.patch(cache_size_limit=max(config.cache_size_limit, _GRAPHS_PER_FUNCTION))
    return config.patch(recompile_limit=max(config.recompile_limit, _GRAPHS_PER_FUNCTION))


_GRAPHS_PER_FUNCTION = 256  # dynamo's own bound on all of a function's graphs (accumulated_recompile_limit)

# key -> (the step's ForwardContext, its number of real token rows), while a compiled forward runs.
_ACTIVE: dict[int, tuple[ForwardContext, int] | None] = {}
_KEYS = itertools.count()


@torch.library.custom_op("attnserve::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: int, layer_idx: int, scale: float,
               sliding_window: int | None) -> torch.Tensor:
    # NOTE: the op writes this step's K/V into the paged cache, which the compiler does not see. That is safe
    # because nothing else in the graph touches the cache, and each layer's op consumes the previous layer's
    # output, so the calls keep their order.
    active = _ACTIVE[key]
    if active is None:  # start-up warm-up: shapes only, no sequences
        return torch.zeros_like(q)
    ctx, n = active
    out = ctx.attention(layer_idx, q[:n], k[:n], v[:n], scale, sliding_window)
    return out if n == q.shape[0] else F.pad(out, (0, 0, 0, 0, 0, q.shape[0] - n))


@_attention.register_fake
def _(q, k, v, key, layer_idx, scale, sliding_window):
    return torch.empty_like(q)


class _GraphContext:
    """Stands in for ForwardContext while dynamo traces the model: each attention layer becomes one op call."""

    def __init__(self, key: int):
        self.key = key

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  sliding_window: int | None) -> torch.Tensor:
        return torch.ops.attnserve.attention(q, k, v, self.key, layer_idx, scale, sliding_window)


class CompiledModel:
    """The model's forward and LM head, compiled, warmed up over every padded size, and run padded."""

    def __init__(self, model: nn.Module, max_tokens: int, max_seqs: int):
        self.key = next(_KEYS)
        _ACTIVE[self.key] = None
        self.graph_ctx = _GraphContext(self.key)
        self.token_buckets = bucket_sizes(max_tokens)
        self.row_buckets = bucket_sizes(min(max_seqs, max_tokens))
        self._forward = torch.compile(model.forward, dynamic=True)
        self._logits = torch.compile(model.compute_logits, dynamic=True)
        self.hidden_size = model.config.hidden_size
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Compile, then run every padded size once (oneDNN builds its kernels on first use). Returns seconds."""
        import torch._inductor.config

        start = time.perf_counter()
        # Weights as constants, so that inductor packs the linear layers once. It takes effect only as a global
        # setting while the graph compiles (torch.compile's `options` do not reach freezing), that is, on the first
        # call here.
        with torch._inductor.config.patch(freezing=True), room_for_graphs():
            for size in reversed(self.token_buckets):  # the largest first: the allocator grows once
                # Distinct tensors: dynamo would specialize the graph on ids and positions being one tensor.
                ids = torch.zeros(size, dtype=torch.long, device=self.device)
                self._forward(ids, torch.zeros_like(ids), self.graph_ctx)
            for size in reversed(self.row_buckets):
                self._logits(torch.zeros(size, self.hidden_size, device=self.device))
        return time.perf_counter() - start

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of a step, as the eager model.forward would give them."""
        n = input_ids.shape[0]
        pad = padded_to_bucket(n, self.token_buckets) - n
        _ACTIVE[self.key] = (ctx, n)
        try:
            hidden = self._forward(F.pad(input_ids, (0, pad)), F.pad(positions, (0, pad)), self.graph_ctx)
        finally:
            _ACTIVE[self.key] = None
        return hidden[:n]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        n, most = hidden.shape[0], self.row_buckets[-1]
        if n > most:  # more rows than sequences: a speculative step samples at several rows of a sequence
            return torch.cat([self.compute_logits(hidden[i : i + most]) for i in range(0, n, most)])
        pad = padded_to_bucket(n, self.row_buckets) - n
        return self._logits(F.pad(hidden, (0, 0, 0, pad)))[:n]


def compile_model(model: nn.Module, max_tokens: int, max_seqs: int) -> CompiledModel | None:
    """The compiled model, warmed up; None (with one warning) where compiling fails: eager still serves."""
    try:
        compiled = CompiledModel(model, max_tokens, max_seqs)
        seconds = compiled.warm_up()
    except Exception as exc:  # noqa: BLE001 - serving eagerly beats not serving; the reason is logged
        logger.warning("torch.compile failed (%s: %s); the model runs eagerly. --enforce-eager skips the attempt",
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                       exc_info=logger.isEnabledFor(logging.DEBUG))
        return None
    logger.info("torch.compile: the decoder is compiled and warmed up over %d token and %d row sizes in %.1f s",
                len(compiled.token_buckets), len(compiled.row_buckets), seconds)
    return compiled
