"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, and samples.

The batch is flat: all new tokens of all sequences in one [num_tokens] row, so the linear layers do
no padding work. Only attention pads, inside the backend. Logits are computed only for the rows that
sample this step (the last token of each sequence that has caught up), which skips the LM head for
partial prefill chunks and for every prompt token but the last. A request that asks for prompt logprobs
has its prompt rows scored too (`_score_prompts`), in bounded slices, from the same forward.

On CUDA a step never waits for the device until the sampled tokens come back: the batch is built in
preallocated pinned buffers and copied without blocking (engine/step_inputs.py), and pure decode
steps replay a CUDA graph captured at start-up (engine/cuda_graphs.py) instead of launching the
forward kernel by kernel.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.compilation import CompiledModel, compile_model
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs, capture_sizes, cuda_graphs_unavailable, padded_size
from engine.draft_model import DraftModel
from engine.kv_cache import allocate_kv_tensors, blocks_for, bytes_per_block
from engine import parallel
from engine.models.common import WHOLE, ForwardContext, Shard
from engine.models.loader import build_meta_model, load_model
from engine.outputs import TokenLogprob
from engine.parallel import TensorParallelGroup
from engine.sampler import Sampler, apply_logit_processors, sampling_probs, score_tokens
from engine.sequence import Sequence
from engine.spec_decode import accepted, draft_rows, verify_sampled
from engine.step_inputs import StepBatch, StepInputs
from engine.structured_output import mask_logits
from kernels.backend import get_attention_backend
from kernels.interface import BatchLayout
from kernels.transfer import to_device

logger = logging.getLogger(__name__)

# The most logits (rows x vocab floats) one LM-head call over prompt rows may produce: 64 MiB of fp32.
_SCORING_LOGITS = 1 << 24


@dataclass
class StepResult:
    # Per sampling sequence, in order: the tokens it emits (one; or, speculating, its accepted drafts and one more)
    # and their logprobs (None entries where it asked for none).
    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprob | None]]
    prompt_logprobs: dict[int, list[TokenLogprob]]  # seq_id -> the prompt logprobs this step computed, in order


@dataclass
class _PromptSlice:
    """Rows of a step whose logits score prompt tokens: row first_row + i predicts targets[i]."""

    seq_id: int
    first_row: int
    targets: list[int]
    num_top: int


def _target_probs(logits: torch.Tensor, rows: list) -> torch.Tensor:
    """The distributions the target samples from at a speculating sequence's positions (grammar, processors,
    temperature, top-k/p, min-p: as the sampler applies them)."""
    return sampling_probs(apply_logit_processors(mask_logits(logits, rows), rows), rows)


def _score(logits: torch.Tensor, rows: list, tokens: list[int]) -> list[TokenLogprob | None]:
    """Logprobs of the kept tokens under the (masked) target distribution, as the sampler reports them."""
    num_top = rows[0].params.logprobs
    if num_top is None:
        return [None] * len(tokens)
    n = len(tokens)
    return score_tokens(mask_logits(logits[:n], rows[:n]), tokens, [num_top] * n)


def _prompt_slice(seq: Sequence, n: int, first_row: int) -> _PromptSlice | None:
    """The prompt tokens that seq's n tokens this step (rows from first_row) score, beyond those it has: the logits
    at position q give the logprob of token q + 1, for q + 1 up to the last prompt token. After a preemption the
    recomputed positions whose logprobs it already has are skipped."""
    start = seq.num_computed_tokens
    have = len(seq.prompt_logprobs)  # tokens 0..have-1
    assert have - 1 >= start, (seq, have)  # no gap: the prefix cache is not read while some are missing
    first, stop = have - 1, min(start + n, seq.num_prompt_tokens - 1)
    if stop <= first:
        return None
    return _PromptSlice(seq.seq_id, first_row + first - start, seq.token_ids[first + 1 : stop + 1],
                        seq.params.prompt_logprobs)


class ModelRunner:
    def __init__(self, config: EngineConfig, group: TensorParallelGroup | None = None):
        """group: a worker rank's tensor-parallel group (worker_main). Rank 0 starts the other ranks itself."""
        self.tp = group
        if config.parallel.tensor_parallel_size > 1 and group is None:
            config, self.tp = parallel.start(config)
        self.config = config
        self.device = config.device
        self.block_size = config.cache.block_size
        shard = self.tp.shard if self.tp is not None else WHOLE
        self.num_kv_heads = shard.kv_heads(config.model.num_kv_heads)[1]  # this rank's share of the KV cache
        try:
            self._load(config, shard)
        except BaseException as exc:
            if self.tp is not None:
                self._fail_start(exc)
            raise
        if self.tp is not None:
            try:
                self.tp.agree_ready(None)  # rank 0 raises if another rank failed to load
            except BaseException:
                self.tp.abandon()
                raise
            # An engine dropped without shutdown() (`del llm`) still stops its ranks and leaves the group, so that
            # the process can start another one. Not at interpreter exit, where another thread may still be inside a
            # collective: the workers die with this process then (PR_SET_PDEATHSIG).
            weakref.finalize(self, self.tp.shutdown).atexit = False

    def _load(self, config: EngineConfig, shard: Shard) -> None:
        torch.manual_seed(config.seed)
        self.model = load_model(config.model, config.device, config.dtype, config.load_format, config.seed, shard)
        self.backend = get_attention_backend(config.attention_backend, config.device)
        if shard.rank == 0:
            logger.info("attention backend %s", self.backend.selection_reason)
        self.sampler = Sampler()
        spec = config.speculative
        # A draft model runs on rank 0 alone, whole: it is small, and only rank 0 samples.
        self.draft = None if spec is None or spec.draft is None or shard.rank != 0 else \
            DraftModel(spec.draft, config.device, config.dtype, config.load_format, config.seed)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.max_context_len = 0  # the longest context a sequence can reach
        self.inputs: StepInputs | None = None
        self.graphs: DecodeGraphs | None = None
        self.compiled: CompiledModel | None = None
        # Pure decode batches are padded up to one of these sizes (ascending; empty: never padded). They
        # are the captured sizes when graphs are in use; tests set them to run the padded path eagerly.
        self.decode_sizes: list[int] = []

    def _fail_start(self, exc: BaseException) -> None:
        """A rank failed to load: a worker tells rank 0 why (then exits); rank 0 stops the others."""
        if self.tp.rank != 0:
            with contextlib.suppress(Exception):
                self.tp.agree_ready(f"{type(exc).__name__}: {exc}")
        else:
            self.tp.abandon()

    @property
    def num_parameters(self) -> int:
        """The whole model's (with tensor parallelism this rank holds a share of them)."""
        model = self.model if self.tp is None else build_meta_model(self.config.model)
        return sum(p.numel() for p in model.parameters())

    def determine_num_blocks(self) -> int:
        """Pool size: explicit count, else the CPU memory budget, else (CUDA) what the profiled peak leaves (on every
        tensor-parallel rank: the least of them). With tensor parallelism the budgets are per rank, as in vLLM."""
        cache = self.config.cache
        per_block = bytes_per_block(self.config.model, self.block_size, self.config.dtype, self.num_kv_heads)
        if self.draft is not None:  # a block holds the draft's K/V of its tokens too
            per_block += self.draft.bytes_per_block(self.block_size)
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type != "cuda":
            return max(1, cache.kv_cache_memory // per_block)
        if self.tp is None:
            return max(1, self._profile_free_cuda_memory() // per_block)
        self.tp.send(parallel.PROFILE, [])
        return max(1, self.tp.min(self._profile_free_cuda_memory()) // per_block)

    def allocate_kv_cache(self, num_blocks: int, max_context_len: int) -> None:
        """The KV cache for a pool of num_blocks, plus the padding block, the step buffers (sized for sequences of
        up to max_context_len tokens: max_model_len, capped by the pool) and (CUDA) the decode graphs. Graphs hold
        the addresses of the cache and the buffers, so they are captured here, whenever those are (re)allocated."""
        if self.tp is not None and self.tp.rank == 0:
            self.tp.send(parallel.ALLOCATE, [[num_blocks, max_context_len]])
        self.graphs = None
        self.decode_sizes = []
        # One block past the pool's: the padding block of padded decode batches (engine/step_inputs.py).
        self.kv_caches = allocate_kv_tensors(
            self.config.model, num_blocks + 1, self.block_size, self.config.dtype, self.device, self.num_kv_heads
        )
        if self.draft is not None:
            self.draft.allocate(num_blocks + 1, self.block_size)
        self.num_blocks = num_blocks
        sched = self.config.scheduler
        self.max_context_len = max_context_len
        self.inputs = StepInputs(
            max_tokens=sched.max_num_batched_tokens,
            max_seqs=sched.max_num_seqs,
            max_blocks_per_seq=blocks_for(self.max_context_len, self.block_size),
            block_size=self.block_size,
            padding_block=num_blocks,
            device=self.device,
        )
        self._capture_decode_graphs()
        if self.compiled is None and self.device.type == "cpu" and not self.config.enforce_eager:
            # NOTE: CPU only for now: on CUDA, decode steps replay CUDA graphs of the eager model, and the compiled
            # path has not been measured there yet.
            # Each rank compiles and warms up on its own (alone(): no all-reduce talks to the others meanwhile).
            with self.tp.alone() if self.tp is not None else contextlib.nullcontext():
                self.compiled = compile_model(self.model, sched.max_num_batched_tokens, sched.max_num_seqs)
                if self.compiled is not None:
                    self._start_decode_kernel()

    @torch.inference_mode()
    def _start_decode_kernel(self) -> None:
        """Switch the backend's decodes to its compiled kernel (building it if this host has no cached build), then
        run one step of two padding decodes (the padding block only) through it: a kernel that fails is switched
        off here, at start-up, and decodes keep the backend's own path."""
        start = time.perf_counter()
        if not self.backend.compile_decode():
            return
        try:
            self._eager_forward(self.inputs.prepare([], [0, 1], 2))
        except Exception as exc:  # noqa: BLE001 - the backend's own decode path still serves; the reason is logged
            self.backend.compile_decode(enable=False)
            logger.warning("the decode attention kernel failed (%s: %s); decodes use the backend's gather path",
                           type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
            return
        logger.info("the decode attention kernel is ready in %.1f s", time.perf_counter() - start)

    @torch.inference_mode()
    def _capture_decode_graphs(self) -> None:
        reason = cuda_graphs_unavailable(self.config, self.backend)
        if reason is not None:
            if self.device.type == "cuda":
                logger.info("CUDA graphs off: %s; decode steps run eagerly", reason)
            return
        sched = self.config.scheduler
        # A decode batch is bounded by the token budget as well as by max_num_seqs.
        sizes = capture_sizes(min(sched.max_num_seqs, sched.max_num_batched_tokens))
        try:
            self.graphs, report = DecodeGraphs.capture(
                sizes, self.config.model.vocab_size, self.device, self._plan_padding_batch, self._decode_logits
            )
        except Exception as exc:  # noqa: BLE001 - serving eagerly beats not serving; the reason is logged
            self.graphs = None
            logger.warning("CUDA graph capture failed (%s: %s); decode steps run eagerly. --enforce-eager skips "
                           "the attempt", type(exc).__name__, exc, exc_info=logger.isEnabledFor(logging.DEBUG))
            torch.cuda.synchronize(self.device)
            return
        self.decode_sizes = sizes
        logger.info(
            "CUDA graphs: captured %d decode batch sizes (1 to %d) in %.1f s; they take %.2f GiB of device memory",
            len(sizes), sizes[-1], report.seconds, report.memory_bytes / 2**30,
        )

    def _plan_padding_batch(self, size: int):
        """Fill the step buffers with `size` padding rows and plan attention for that graph size."""
        self.inputs.prepare([], [], size)
        return self._plan_padded_decode(size)

    def _plan_padded_decode(self, size: int):
        inputs = self.inputs
        return self.backend.plan_graph_decode(
            inputs.slot_mapping.device[:size],
            inputs.block_tables.device[:size],  # whole rows: replays may bring longer tables
            inputs.seq_lens.device[:size],
            self.max_context_len,
        )

    def _decode_logits(self, size: int, metadata) -> torch.Tensor:
        """The forward a decode graph captures: the first `size` rows of the step buffers -> logits."""
        ctx = ForwardContext(self.backend, metadata, self.kv_caches)
        hidden = self.model(self.inputs.input_ids.device[:size], self.inputs.positions.device[:size], ctx)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _profile_free_cuda_memory(self) -> int:
        """Run one worst-case step (a full token budget of prefill) on a throwaway cache and measure the peak."""
        sched = self.config.scheduler
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        free_before, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free_before - torch.cuda.memory_reserved(self.device)
        seq_len = min(sched.max_model_len, sched.max_num_batched_tokens)
        num_seqs = max(1, min(sched.max_num_seqs, sched.max_num_batched_tokens // seq_len))
        blocks_per_seq = -(-seq_len // self.block_size)
        self.kv_caches = allocate_kv_tensors(
            self.config.model, num_seqs * blocks_per_seq, self.block_size, self.config.dtype, self.device,
            self.num_kv_heads,
        )
        tables = torch.arange(num_seqs * blocks_per_seq).view(num_seqs, blocks_per_seq)
        positions = torch.arange(seq_len).repeat(num_seqs)
        layout = BatchLayout(
            query_lens=[seq_len] * num_seqs,
            context_lens=[seq_len] * num_seqs,
            block_tables=tables.to(self.device),
            slot_mapping=torch.arange(num_seqs * blocks_per_seq * self.block_size, device=self.device)
            .view(num_seqs, -1)[:, :seq_len]
            .reshape(-1),
            block_size=self.block_size,
        )
        ctx = ForwardContext(self.backend, self.backend.plan(layout), self.kv_caches)
        input_ids = torch.zeros(num_seqs * seq_len, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions.to(self.device), ctx)
        self._full_logits(hidden[-num_seqs:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.kv_caches = []
        torch.cuda.empty_cache()
        budget = int(total * self.config.cache.gpu_memory_utilization) - peak - used_by_others
        if budget <= 0:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: peak use {peak / 2**30:.2f} GiB of "
                f"{total * self.config.cache.gpu_memory_utilization / 2**30:.2f} GiB allowed; raise "
                "gpu_memory_utilization or lower max_num_batched_tokens"
            )
        return budget

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]], samples: list[bool],
                spec_tokens: dict[int, list[int]] | None = None,
                draft_probs: dict[int, list[torch.Tensor | None]] | None = None) -> StepResult:
        """Run one step. `samples[i]`: scheduled[i] samples a token (the scheduler decides). spec_tokens: seq_id -> the
        draft tokens scheduled after its newest token; it samples at each of their positions too, and keeps the drafts
        its samples confirm (engine/spec_decode.py). draft_probs: seq_id -> the distributions a draft model drew them
        from (propose_drafts). Returns the sampling sequences' tokens, in order, and the prompt logprobs this step
        computed."""
        spec_tokens, draft_probs = spec_tokens or {}, draft_probs or {}
        sampling: list[Sequence] = []
        rows: list[int] = []
        row_seqs: list = []  # per logits row, what the sampler reads: a sequence, or a view of it at a draft
        scoring: list[_PromptSlice] = []
        end = 0
        for (seq, n), sample in zip(scheduled, samples):
            piece = _prompt_slice(seq, n, end) if seq.needs_prompt_logprobs else None
            if piece is not None:
                scoring.append(piece)
            end += n
            if sample:
                drafts = spec_tokens.get(seq.seq_id, [])
                sampling.append(seq)
                rows.extend(range(end - 1 - len(drafts), end))
                row_seqs.extend(draft_rows(seq, drafts) if drafts else [seq])
        padded = None if scoring else self._padded_decode_size(scheduled, sampling)
        batch = self.inputs.prepare(scheduled, rows, padded or len(scheduled), spec_tokens)
        score_rows, chunk = self._scoring_rows(scoring)
        if self.tp is not None:  # the other ranks run the same forward and LM-head calls (follow())
            self.tp.send(parallel.STEP, self.inputs.message(batch) + [score_rows, [chunk], [bool(sampling)]])
        prompt_logprobs = {}
        if padded is not None:
            logits = self._padded_decode(batch)[: batch.num_seqs]
        else:
            hidden = self._eager_forward(batch)
            if scoring:
                prompt_logprobs = self._score_prompts(self._scoring_logits(hidden, score_rows, chunk), scoring)
            logits = self._logits(hidden, batch.logits_rows) if sampling else None
        if not sampling:
            return StepResult([], [], prompt_logprobs)
        out = self.sampler(logits, row_seqs)
        token_ids, logprobs, at = [], [], 0
        for seq in sampling:
            drafts = spec_tokens.get(seq.seq_id, [])
            drawn = out.token_ids[at : at + len(drafts) + 1]
            q = draft_probs.get(seq.seq_id)
            if drafts and q is not None and not seq.params.greedy:
                # A draft model's proposals are not one-hot: the general rule, and the logprobs of what it keeps.
                rows_at = slice(at, at + len(drafts) + 1)
                kept = verify_sampled(drafts, q, _target_probs(logits[rows_at], row_seqs[rows_at]), seq.generator)
                token_ids.append(kept)
                logprobs.append(_score(logits[rows_at], row_seqs[rows_at], kept))
            else:
                keep = accepted(drafts, drawn) + 1
                token_ids.append(drawn[:keep])
                logprobs.append(out.logprobs[at : at + keep])
            at += len(drafts) + 1
        return StepResult(token_ids, logprobs, prompt_logprobs)

    def _scoring_rows(self, slices: list[_PromptSlice]) -> tuple[list[int], int]:
        """The hidden rows whose logits score prompt tokens, and how many the LM head takes at a time: a prompt
        chunk's logits are [tokens, vocab] floats, so they are computed a bounded number of rows at a time."""
        rows = [row for s in slices for row in range(s.first_row, s.first_row + len(s.targets))]
        most = max(1, _SCORING_LOGITS // self.config.model.vocab_size)
        if self.compiled is not None:
            most = min(most, self.compiled.row_buckets[-1])
        return rows, most

    def _scoring_logits(self, hidden: torch.Tensor, rows: list[int], most: int) -> Iterator[torch.Tensor | None]:
        """The logits of `rows`, `most` at a time (on a worker rank: its part of each call, and None)."""
        for lo in range(0, len(rows), most):
            index = to_device(rows[lo : lo + most], torch.long, hidden.device)
            yield self._full_logits(hidden.index_select(0, index))

    def _score_prompts(self, chunks: Iterator[torch.Tensor], slices: list[_PromptSlice]) -> dict[int, list[TokenLogprob]]:
        """The prompt logprobs of `slices` (seq_id -> in position order), from the logits of their rows in chunks."""
        targets = [token for s in slices for token in s.targets]
        tops = [s.num_top for s in slices for _ in s.targets]
        scored: list[TokenLogprob] = []
        for logits in chunks:
            at = len(scored)
            scored.extend(score_tokens(logits, targets[at : at + logits.shape[0]], tops[at : at + logits.shape[0]]))
        out: dict[int, list[TokenLogprob]] = {}
        at = 0
        for s in slices:
            out[s.seq_id] = scored[at : at + len(s.targets)]
            at += len(s.targets)
        return out

    def _padded_decode_size(self, scheduled: list[tuple[Sequence, int]], sampling: list[Sequence]) -> int | None:
        """The padded size for a pure decode step (every sequence computes exactly its newest token), or
        None: not pure decode, padding off, larger than the largest size, or a draft model to run alongside."""
        if not self.decode_sizes or self.draft is not None or self.tp is not None or len(sampling) != len(scheduled) \
                or any(n != 1 for _, n in scheduled):
            return None
        return padded_size(len(scheduled), self.decode_sizes)

    def _padded_decode(self, batch: StepBatch) -> torch.Tensor:
        """Logits of every row (padding included) of a padded decode batch: by graph where captured."""
        if self.graphs is not None:
            return self.graphs.replay(batch.num_rows)
        if self.backend.cuda_graph_unsupported() is None:
            metadata = self._plan_padded_decode(batch.num_rows)  # what the graph would have used
        else:
            metadata = self.backend.plan(self._layout(batch))
        return self._decode_logits(batch.num_rows, metadata)

    def _eager_forward(self, batch: StepBatch) -> torch.Tensor:
        """A step without a CUDA graph, by the compiled model where there is one, else eagerly: its hidden states. A
        draft model runs over the same tokens, to keep its cache in step."""
        metadata = self.backend.plan(self._layout(batch))
        hidden = (self.compiled or self.model)(batch.input_ids, batch.positions,
                                               ForwardContext(self.backend, metadata, self.kv_caches))
        if self.draft is not None:
            self.draft.mirror(batch.input_ids, batch.positions, self.backend, metadata)
        return hidden

    @torch.inference_mode()
    def propose_drafts(self, scheduled: list[tuple[Sequence, int]],
                       spec_tokens: dict[int, list[int]]) -> dict[int, list[torch.Tensor | None]]:
        """Fill in the draft model's drafts for the step (spec_tokens holds PENDING slots, as many as fit). Returns
        seq_id -> the distribution each draft was drawn from, for execute() to verify them against."""
        seqs = [seq for seq, _ in scheduled if seq.seq_id in spec_tokens]
        proposals = self.draft.propose(seqs, [len(spec_tokens[seq.seq_id]) for seq in seqs], self.inputs,
                                       self.backend, self._layout)
        for seq, proposal in zip(seqs, proposals):
            spec_tokens[seq.seq_id] = proposal.tokens
        return {seq.seq_id: proposal.probs for seq, proposal in zip(seqs, proposals)}

    def _logits(self, hidden: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor | None:
        """Logits of hidden's `rows` (None: every row)."""
        if rows is not None:
            hidden = hidden.index_select(0, rows)
        return self._full_logits(hidden)

    def _full_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The LM head over `hidden`'s rows. With tensor parallelism every rank computes its vocabulary slice and rank
        0 gathers them (the other ranks get None): every rank must make the same calls, in the same order."""
        logits = (self.compiled or self.model).compute_logits(hidden)
        return logits if self.tp is None else self.tp.gather_logits(logits)

    def _layout(self, batch: StepBatch) -> BatchLayout:
        return BatchLayout(batch.query_lens, batch.context_lens, batch.block_tables, batch.slot_mapping,
                           self.block_size, seq_lens=batch.seq_lens, query_start=batch.query_start)

    # ---- tensor parallelism -------------------------------------------------------------------------

    @torch.inference_mode()
    def follow(self) -> None:
        """A worker rank's loop: do what rank 0's messages say (engine/parallel.py), until it says stop."""
        while True:
            kind, fields = self.tp.receive()
            if kind == parallel.SHUTDOWN:
                return
            if kind == parallel.ALLOCATE:
                self.allocate_kv_cache(int(fields[0][0]), int(fields[0][1]))
            elif kind == parallel.PROFILE:
                self.tp.min(self._profile_free_cuda_memory())
            elif kind == parallel.STEP:
                batch = self.inputs.from_message(fields[:10])
                hidden = self._eager_forward(batch)
                for _ in self._scoring_logits(hidden, fields[10].tolist(), int(fields[11][0])):
                    pass
                if fields[12][0]:
                    self._logits(hidden, batch.logits_rows)
            else:
                raise RuntimeError(f"unknown tensor-parallel message kind {kind}")

    def check_workers(self) -> None:
        """Raise if a local tensor-parallel worker has exited or is stopped (TensorParallelGroup.check_workers)."""
        if self.tp is not None:
            self.tp.check_workers()

    def shutdown(self, kill: bool = False) -> None:
        """Stop the other tensor-parallel ranks (nothing to do on one). kill: at once, from any thread (a rank may be
        hung, and this thread blocked with it)."""
        if self.tp is None:
            return
        if kill:
            self.tp.kill_workers()
        else:
            self.tp.shutdown()


def worker_main(config: EngineConfig, rank: int, local_rank: int, port: int | None) -> None:
    """A tensor-parallel worker process (engine/parallel.py): join the group, load this rank's shard, follow rank 0."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [tp rank {rank}] %(name)s: %(message)s")
    config, group = parallel.join(config, rank, local_rank, port)
    try:
        ModelRunner(config, group).follow()
    except RuntimeError as exc:  # the group broke: rank 0 (or a peer) went away; there is nothing left to serve
        logger.error("tensor-parallel rank %d stops: %s", rank, str(exc).splitlines()[0] if str(exc) else exc)
        sys.exit(1)
    finally:
        group.shutdown()

