"""Part 2, decode attention per layer call: the paged Triton kernel against the SDPA gather path.

For each model's heads, batch size and context: microseconds per call (median; on CUDA, events around each
call with L2 flushed) and GB/s of K/V read, i.e. the bytes of K and V the queries attend (batch x context x
kv_heads x head_dim x 2 x 2 bytes) / time, also as % of the device copy bandwidth measured in the same run.

Three calls are timed, each after its plan() was built, as the engine builds it once per step for all layers:
  triton kernel   paged_decode_attention alone, with the split count TritonBackend picks;
  triton backend  TritonBackend.forward: the new token's KV write, then that kernel;
  sdpa backend    SdpaBackend.forward: the KV write, the gather by block table, one masked SDPA call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kernels.sdpa import SdpaBackend

from .env import Env
from .paged import DecodePool, PagedBatch
from .shapes import AttentionShape
from .timing import Deadline, Timer

BLOCK_SIZE = 16
DTYPE = torch.bfloat16
FULL_GRID = ([1, 16, 64, 256], [512, 2048, 8192])  # batch sizes, contexts
SMOKE_GRID = ([1, 4], [32, 128])
VARIANTS = ("triton kernel", "triton backend", "sdpa backend")


@dataclass
class Point:
    model: str
    batch: int
    context: int
    variant: str
    kv_bytes: int
    num_splits: int | None = None
    us: float | None = None
    gb_per_s: float | None = None
    pct_of_copy: float | None = None
    status: str = "ok"


class AttentionRun:
    def __init__(self, env: Env, timer: Timer, copy_bytes_per_s: float, deadline: Deadline, smoke: bool):
        self.env, self.timer, self.copy_bw, self.deadline = env, timer, copy_bytes_per_s, deadline
        self.batches, self.contexts = SMOKE_GRID if smoke else FULL_GRID
        self.points: list[Point] = []
        self.notes: list[str] = []
        self.errors: list[str] = []

    def run(self, shapes: list[AttentionShape]) -> None:
        if not self.env.triton_runs:
            self.notes.append(f"Triton timings skipped: {self.env.triton_mode}")
        elif self.env.triton_mode == "interpreter":
            self.notes.append("Triton runs in its CPU interpreter here: its times say nothing about the kernel")
        with torch.inference_mode():
            for shape in shapes:
                pool = DecodePool(shape, max(self.batches), max(self.contexts), BLOCK_SIZE, DTYPE, self.env.device)
                for batch in self.batches:
                    for context in self.contexts:
                        self._point(shape, pool, batch, context)
                del pool
                _free_cache(self.env.device)

    def _point(self, shape: AttentionShape, pool: DecodePool, batch: int, context: int) -> None:
        kv_bytes = batch * context * shape.num_kv_heads * shape.head_dim * 2 * DTYPE.itemsize
        variants = VARIANTS if self.env.triton_runs else ("sdpa backend",)
        if self.deadline.expired():
            self.points += [Point(shape.model, batch, context, v, kv_bytes, status="skipped: time budget")
                            for v in variants]
            return
        step = pool.decode_batch(batch, context)
        for variant in variants:
            point = Point(shape.model, batch, context, variant, kv_bytes)
            try:
                call, point.num_splits = self._call(variant, step, shape)
                seconds = self.timer.median_s(call)
            except torch.cuda.OutOfMemoryError:
                point.status = "out of memory"
                _free_cache(self.env.device)
            except Exception as exc:  # noqa: BLE001 - one failing point must not lose the others
                point.status = f"error: {type(exc).__name__}: {exc}"
                self.errors.append(f"{shape.model} batch {batch} ctx {context} {variant}: {point.status}")
            else:
                point.us = seconds * 1e6
                point.gb_per_s = kv_bytes / seconds / 1e9
                point.pct_of_copy = 100 * kv_bytes / seconds / self.copy_bw
            self.points.append(point)

    def _call(self, variant: str, step: PagedBatch, shape: AttentionShape):
        """(a no-argument callable running one layer's decode attention, the kernel's split count or None)."""
        if variant == "triton kernel":
            from kernels.triton_decode import alloc_partials, choose_num_splits, paged_decode_attention

            batch, context = len(step.query_lens), step.context_lens[0]
            splits = choose_num_splits(batch, shape.num_kv_heads, context, self.env.num_sms)
            partials = alloc_partials(batch, shape.num_heads, shape.head_dim, step.device) if splits > 1 else None
            out = torch.empty_like(step.q)
            args = (out, step.q, step.k_cache, step.v_cache, step.block_tables, step.seq_lens(), step.query_start(),
                    step.seqs(decodes=True), shape.scale, None, splits, partials)
            return (lambda: paged_decode_attention(*args)), splits
        if variant == "triton backend":
            from kernels.backend import get_attention_backend

            backend = get_attention_backend("triton", self.env.device)
        else:
            backend = SdpaBackend()
        metadata = backend.plan(step.layout())
        args = (step.q, step.k_new, step.v_new, step.k_cache, step.v_cache, metadata, shape.scale, None)
        return (lambda: backend.forward(*args)), None

    def as_json(self) -> dict:
        return {"points": [asdict(p) for p in self.points], "notes": self.notes, "errors": self.errors}

    def table_rows(self) -> list[list[str]]:
        by_key = {(p.model, p.batch, p.context, p.variant): p for p in self.points}
        rows = []
        for model, batch, context in dict.fromkeys((p.model, p.batch, p.context) for p in self.points):
            kernel, backend, sdpa = (by_key.get((model, batch, context, v)) for v in VARIANTS)
            ratio = (f"{sdpa.us / kernel.us:.1f}x" if kernel and sdpa and kernel.us and sdpa.us else "-")
            rows.append([model, str(batch), str(context), _field(kernel, "num_splits"), _us(kernel), _gbs(kernel),
                         _pct(kernel), _us(backend), _us(sdpa), _gbs(sdpa), _pct(sdpa), ratio])
        return rows


TABLE_COLUMNS = ["model", "batch", "context", "splits", "triton kernel us", "GB/s", "% copy", "triton backend us",
                 "sdpa backend us", "GB/s", "% copy", "sdpa / kernel"]


def _us(p: Point | None) -> str:
    return f"{p.us:.1f}" if p and p.us is not None else (p.status if p else "-")


def _gbs(p: Point | None) -> str:
    return f"{p.gb_per_s:.3g}" if p and p.gb_per_s is not None else "-"


def _pct(p: Point | None) -> str:
    return f"{p.pct_of_copy:.0f}%" if p and p.pct_of_copy is not None else "-"


def _field(p: Point | None, name: str) -> str:
    value = getattr(p, name) if p else None
    return "-" if value is None else str(value)


def _free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
