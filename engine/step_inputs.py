"""A step's batch tensors, built in preallocated host buffers and copied to preallocated device buffers.

Every step fills the host side with numpy (pinned memory on CUDA) and queues one non-blocking copy
per array, so building a batch never waits for the device and never allocates device memory. The
device buffers keep their addresses for the engine's lifetime, which is what lets a CUDA graph
captured over them be replayed: a replay is "fill, upload, replay".

A batch can be padded with dummy decode rows up to a captured graph size. A padding row is a
one-token sequence at position 0 whose block table points at the padding block, a spare block past
the pool's that no sequence ever owns: its K/V are written there and it attends to that one slot. So
it is finite, reads and writes nothing of any real sequence, and its logits are simply not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.sequence import Sequence


class StagedBuffer:
    """A 1-D host buffer (pinned on CUDA) and its device twin. Off CUDA they are the same tensor."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device):
        on_cuda = device.type == "cuda"
        self.host = torch.zeros(size, dtype=dtype, pin_memory=on_cuda)
        self.np = self.host.numpy()
        self.device = torch.zeros(size, dtype=dtype, device=device) if on_cuda else self.host

    def upload(self, n: int) -> torch.Tensor:
        """Queue the copy of the first n host entries; returns their device view."""
        if self.device is not self.host:
            self.device[:n].copy_(self.host[:n], non_blocking=True)
        return self.device[:n]


class StagedBlockTables:
    """Block tables: a flat host buffer filled as a contiguous [rows, width] array each step (width =
    this step's longest table, so a step copies only what it uses), and a [max_seqs, max_blocks]
    device table whose rows keep their addresses (a graph reads rows through a fixed row stride)."""

    def __init__(self, max_seqs: int, max_blocks: int, device: torch.device):
        self.max_blocks = max_blocks
        self.host = torch.zeros(max_seqs * max_blocks, dtype=torch.long, pin_memory=device.type == "cuda")
        self.np = self.host.numpy()
        self.device = torch.zeros(max_seqs, max_blocks, dtype=torch.long, device=device)

    def host_rows(self, rows: int, width: int) -> np.ndarray:
        return self.np[: rows * width].reshape(rows, width)

    def upload(self, rows: int, width: int) -> torch.Tensor:
        self.device[:rows, :width].copy_(self.host[: rows * width].view(rows, width), non_blocking=True)
        return self.device[:rows, :width]


@dataclass
class StepBatch:
    """One step's inputs on the device. Rows num_seqs.. are padding (see the module docstring)."""

    num_seqs: int  # real sequences
    num_rows: int  # sequences including padding rows
    query_lens: list[int]  # per row, padding included
    context_lens: list[int]
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_rows, width] int64, a view of the preallocated table
    seq_lens: torch.Tensor  # [num_rows] int32
    query_start: torch.Tensor  # [num_rows + 1] int32
    logits_rows: torch.Tensor | None  # rows of the hidden states to compute logits for; None = every row


class StepInputs:
    """The preallocated buffers and the code that fills them from a scheduled batch."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, block_size: int,
                 padding_block: int, device: torch.device):
        self.block_size = block_size
        self.padding_block = padding_block
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.input_ids = StagedBuffer(max_tokens, torch.long, device)
        self.positions = StagedBuffer(max_tokens, torch.long, device)
        self.slot_mapping = StagedBuffer(max_tokens, torch.long, device)
        # A sequence samples at one row, or (speculating) at several: at most every token.
        self.logits_rows = StagedBuffer(max_tokens, torch.long, device)
        self.seq_lens = StagedBuffer(max_seqs, torch.int32, device)
        self.query_start = StagedBuffer(max_seqs + 1, torch.int32, device)
        self.block_tables = StagedBlockTables(max_seqs, max_blocks_per_seq, device)
        # NOTE: the host buffers are rewritten every step, so a step must not start filling them
        # before the previous step's copies out of them have run. Usually the previous step's wait
        # for its sampled tokens already ensured that; a step that sampled nothing did not wait.
        self._uploaded = torch.cuda.Event() if device.type == "cuda" else None

    def prepare(self, scheduled: list[tuple[Sequence, int]], logits_rows: list[int], num_rows: int,
                spec_tokens: dict[int, list[int]] | None = None) -> StepBatch:
        """Fill and upload the batch for `scheduled` ((sequence, new tokens) pairs), padded with decode
        rows up to num_rows sequences. logits_rows: the token rows whose logits are needed. spec_tokens: seq_id ->
        draft tokens, the last of a sequence's new tokens (its known tokens come first)."""
        num_seqs = len(scheduled)
        if num_rows < num_seqs:
            raise ValueError(f"cannot pad {num_seqs} sequences down to {num_rows}")
        q_lens = [n for _, n in scheduled]
        num_tokens = sum(q_lens) + num_rows - num_seqs  # a padding row is one token
        if num_tokens > self.max_tokens or num_rows > self.max_seqs:
            raise ValueError(f"a step of {num_tokens} tokens in {num_rows} sequences exceeds the buffers "
                             f"({self.max_tokens} tokens, {self.max_seqs} sequences)")
        if self._uploaded is not None:
            self._uploaded.synchronize()
        starts = [seq.num_computed_tokens for seq, _ in scheduled]
        query_lens = q_lens + [1] * (num_rows - num_seqs)
        context_lens = [s + n for s, n in zip(starts, q_lens)] + [1] * (num_rows - num_seqs)
        tables = self._fill_sequence_rows(scheduled, query_lens, context_lens)
        self._fill_token_rows(scheduled, starts, num_tokens, tables, spec_tokens or {})
        num_logits = None if len(logits_rows) == num_tokens else len(logits_rows)
        if num_logits is not None:
            self.logits_rows.np[:num_logits] = logits_rows
        return self._upload(num_seqs, query_lens, context_lens, num_tokens, tables.shape[1], num_logits)

    def _upload(self, num_seqs: int, query_lens: list[int], context_lens: list[int], num_tokens: int, width: int,
                num_logits: int | None) -> StepBatch:
        num_rows = len(query_lens)
        batch = StepBatch(
            num_seqs=num_seqs,
            num_rows=num_rows,
            query_lens=query_lens,
            context_lens=context_lens,
            input_ids=self.input_ids.upload(num_tokens),
            positions=self.positions.upload(num_tokens),
            slot_mapping=self.slot_mapping.upload(num_tokens),
            block_tables=self.block_tables.upload(num_rows, width),
            seq_lens=self.seq_lens.upload(num_rows),
            query_start=self.query_start.upload(num_rows + 1),
            logits_rows=None if num_logits is None else self.logits_rows.upload(num_logits),
        )
        if self._uploaded is not None:
            self._uploaded.record()
        return batch

    def message(self, batch: StepBatch) -> list:
        """The batch `prepare` just filled, as integer arrays from the host buffers: what the other tensor-parallel
        ranks need to run the same forward (engine/parallel.py). `from_message` rebuilds it on their side."""
        rows, tokens, width = batch.num_rows, batch.input_ids.shape[0], batch.block_tables.shape[1]
        logits = -1 if batch.logits_rows is None else batch.logits_rows.shape[0]
        return [[batch.num_seqs, tokens, width, logits], batch.query_lens, batch.context_lens,
                self.input_ids.np[:tokens], self.positions.np[:tokens], self.slot_mapping.np[:tokens],
                self.block_tables.np[: rows * width], self.seq_lens.np[:rows], self.query_start.np[: rows + 1],
                self.logits_rows.np[: max(logits, 0)]]

    def from_message(self, fields: list[np.ndarray]) -> StepBatch:
        if self._uploaded is not None:
            self._uploaded.synchronize()
        (num_seqs, tokens, width, logits), query_lens, context_lens = (int(x) for x in fields[0]), *fields[1:3]
        rows = len(query_lens)
        for buffer, values in zip((self.input_ids, self.positions, self.slot_mapping, self.seq_lens, self.query_start,
                                   self.logits_rows), fields[3:6] + fields[7:10]):
            buffer.np[: len(values)] = values
        self.block_tables.np[: rows * width] = fields[6]
        return self._upload(num_seqs, query_lens.tolist(), context_lens.tolist(), tokens, width,
                            None if logits < 0 else logits)

    def _fill_sequence_rows(self, scheduled: list[tuple[Sequence, int]], query_lens: list[int],
                            context_lens: list[int]) -> np.ndarray:
        """Query starts, context lengths and block tables of every row; returns the host tables."""
        num_rows = len(query_lens)
        query_start = self.query_start.np[: num_rows + 1]
        query_start[0] = 0
        np.cumsum(query_lens, out=query_start[1:])
        self.seq_lens.np[:num_rows] = context_lens
        width = max((len(seq.block_ids) for seq, _ in scheduled), default=1)
        tables = self.block_tables.host_rows(num_rows, width)
        # Entries past a sequence's own blocks keep whatever an earlier step left there: always some
        # valid block id, and never attended to (attention stops at the context length).
        for row, (seq, _) in enumerate(scheduled):
            tables[row, : len(seq.block_ids)] = seq.block_ids
        tables[len(scheduled):, 0] = self.padding_block
        return tables

    def _fill_token_rows(self, scheduled: list[tuple[Sequence, int]], starts: list[int], num_tokens: int,
                         tables: np.ndarray, spec_tokens: dict[int, list[int]]) -> None:
        """Input ids, positions and cache slots of every token, from the rows filled first."""
        q_lens = [n for _, n in scheduled]
        num_real = sum(q_lens)
        tokens: list[int] = []
        for (seq, n), start in zip(scheduled, starts):
            drafts = spec_tokens.get(seq.seq_id, ())
            tokens.extend(seq.token_ids[start : start + n - len(drafts)])
            tokens.extend(drafts)
        # Token t of sequence i sits at position starts[i] + (t - query_start[i]).
        seq_of_token = np.repeat(np.arange(len(scheduled)), q_lens)
        first_position = np.asarray(starts, dtype=np.int64) - self.query_start.np[: len(scheduled)]
        positions = np.arange(num_real) + np.repeat(first_position, q_lens)
        bs, pad = self.block_size, slice(num_real, num_tokens)
        self.input_ids.np[:num_real] = tokens
        self.input_ids.np[pad] = 0
        self.positions.np[:num_real] = positions
        self.positions.np[pad] = 0
        self.slot_mapping.np[:num_real] = tables[seq_of_token, positions // bs] * bs + positions % bs
        self.slot_mapping.np[pad] = self.padding_block * bs
