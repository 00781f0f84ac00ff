"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, and samples.

The batch is flat: all new tokens of all sequences in one [num_tokens] row, so the linear layers do
no padding work. Only attention pads, inside the backend. Logits are computed only for the rows that
sample this step (the last token of each sequence that has caught up), which skips the LM head for
partial prefill chunks and for every prompt token but the last.
"""

from __future__ import annotations

import logging

import torch

from engine.config import EngineConfig
from engine.kv_cache import allocate_kv_tensors, bytes_per_block
from engine.models.common import ForwardContext
from engine.models.loader import load_model
from engine.sampler import Sampler, SamplerOutput
from engine.sequence import Sequence
from kernels.backend import BatchLayout, get_attention_backend, segment_offsets

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.device
        self.block_size = config.cache.block_size
        torch.manual_seed(config.seed)
        self.model = load_model(config.model, config.device, config.dtype)
        self.backend = get_attention_backend(config.attention_backend, config.device)
        logger.info("attention backend %s", self.backend.selection_reason)
        self.sampler = Sampler()
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def determine_num_blocks(self) -> int:
        """Pool size: explicit count, else the CPU memory budget, else (CUDA) what the profiled peak leaves."""
        cache = self.config.cache
        per_block = bytes_per_block(self.config.model, self.block_size, self.config.dtype)
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type != "cuda":
            return max(1, cache.kv_cache_memory // per_block)
        return max(1, self._profile_free_cuda_memory() // per_block)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_tensors(
            self.config.model, num_blocks, self.block_size, self.config.dtype, self.device
        )
        self.num_blocks = num_blocks

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
        self.allocate_kv_cache(num_seqs * blocks_per_seq)
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
        self.model.compute_logits(hidden[-num_seqs:])
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

    def _layout(self, scheduled: list[tuple[Sequence, int]]) -> tuple[BatchLayout, torch.Tensor, torch.Tensor]:
        bs = self.block_size
        query_lens = [n for _, n in scheduled]
        starts = [s.num_computed_tokens for s, _ in scheduled]
        context_lens = [c + n for c, n in zip(starts, query_lens)]
        tokens: list[int] = []
        for (seq, n), c in zip(scheduled, starts):
            tokens.extend(seq.token_ids[c : c + n])
        width = max(len(s.block_ids) for s, _ in scheduled)
        tables = torch.tensor([s.block_ids + [0] * (width - len(s.block_ids)) for s, _ in scheduled], dtype=torch.long)
        seq_of_token, offset = segment_offsets(torch.tensor(query_lens))
        positions = torch.tensor(starts)[seq_of_token] + offset
        slots = tables[seq_of_token, positions // bs] * bs + positions % bs
        dev = self.device
        layout = BatchLayout(query_lens, context_lens, tables.to(dev), slots.to(dev), bs)
        return layout, torch.tensor(tokens, dtype=torch.long).to(dev), positions.to(dev)

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run one step. Returns the sequences that sampled a token and the sampler's output for them (in order)."""
        layout, input_ids, positions = self._layout(scheduled)
        ctx = ForwardContext(self.backend, self.backend.plan(layout), self.kv_caches)
        hidden = self.model(input_ids, positions, ctx)

        sampling: list[Sequence] = []
        rows: list[int] = []
        end = 0
        for seq, n in scheduled:
            end += n
            if seq.num_computed_tokens + n == seq.num_tokens:
                sampling.append(seq)
                rows.append(end - 1)
        if not sampling:
            return [], None
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        return sampling, self.sampler(logits, sampling)
