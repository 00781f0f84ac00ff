"""Part 3, end-to-end decode step time: the whole engine (LLMEngine.step) on the published shapes with random
weights (--load-format dummy), for batch sizes 1 to 256 at a fixed context.

Per model and batch B: B requests with random prompts of `context` token ids are prefilled; once every one
has its first token, each step is one decode token for all B. After warm-up steps, the timed steps give the
median wall time per step (the step ends with the sampled ids on the host, so it includes the host's work:
scheduling, batch tensors, sampling, detokenizing) and output tokens/s.

Roofline: a decode step must read every weight once and the K/V of every cached token of every layer, so
(weight bytes + KV bytes) / the copy bandwidth measured in the same run is the least time it can take; the
table shows that as % of the measured step time.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine import SamplingParams
from engine.llm_engine import LLMEngine
from kernels.backend import choose_attention_backend

from .env import Env
from .timing import Deadline

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Plan:
    batches: list[int]
    context: int
    warmup_steps: int
    steps: int
    max_num_batched_tokens: int  # a large budget only makes the (untimed) prefill take fewer steps


FULL = Plan(batches=[1, 8, 32, 128, 256], context=1024, warmup_steps=5, steps=20, max_num_batched_tokens=8192)
SMOKE = Plan(batches=[1, 4], context=32, warmup_steps=1, steps=3, max_num_batched_tokens=256)


@dataclass
class StepResult:
    model: str
    backend: str
    enforce_eager: bool | None
    batch: int
    context: float  # mean context over the timed steps
    step_ms: float | None = None
    tokens_per_s: float | None = None
    weight_bytes: int = 0
    kv_bytes: int = 0
    roofline_pct: float | None = None
    prefill_s: float | None = None
    status: str = "ok"


class DecodeRun:
    def __init__(self, env: Env, plan: Plan, copy_bytes_per_s: float, deadline: Deadline, backends: list[str],
                 enforce_eager: bool):
        self.env, self.plan, self.copy_bw, self.deadline = env, plan, copy_bytes_per_s, deadline
        self.backends = backends
        self.enforce_eager = enforce_eager
        self.results: list[StepResult] = []
        self.notes: list[str] = []
        self.errors: list[str] = []

    def run(self, model_dirs: dict[str, Path]) -> None:
        for backend in self._resolve_backends():
            for name, path in model_dirs.items():
                if self.deadline.expired():
                    self.notes.append(f"{name} ({backend}): skipped, time budget spent")
                    continue
                try:
                    engine = self._engine(path, backend)
                except Exception as exc:  # noqa: BLE001 - report and go on with the next model
                    self.errors.append(f"{name} ({backend}): the engine did not start: {type(exc).__name__}: {exc}")
                    continue
                try:
                    for batch in self.plan.batches:
                        self.results.append(self._measure(engine, name, backend, batch))
                finally:
                    del engine
                    gc.collect()
                    if self.env.device.type == "cuda":
                        torch.cuda.empty_cache()

    def _resolve_backends(self) -> list[str]:
        """The requested backends as the engine would resolve them ("auto" is sdpa on a CPU), each once."""
        resolved: list[str] = []
        for requested in self.backends:
            try:
                name, _ = choose_attention_backend(None if requested == "auto" else requested, self.env.device)
            except (ValueError, RuntimeError) as exc:
                self.notes.append(f"attention backend {requested!r} skipped: {exc}")
                continue
            if name not in resolved:
                resolved.append(name)
        return resolved

    def _engine(self, path: Path, backend: str) -> LLMEngine:
        p = self.plan
        max_len = p.context + p.warmup_steps + p.steps + 8
        blocks = max(p.batches) * -(-max_len // BLOCK_SIZE) + 1
        return LLMEngine.from_args(
            str(path), load_format="dummy", device=str(self.env.device), dtype="auto", seed=0,
            block_size=BLOCK_SIZE, num_kv_blocks=blocks, max_model_len=max_len, max_num_seqs=max(p.batches),
            max_num_batched_tokens=max(p.max_num_batched_tokens, max(p.batches)), enable_prefix_caching=False,
            attention_backend=backend, enforce_eager=self.enforce_eager,
        )

    def _measure(self, engine: LLMEngine, name: str, backend: str, batch: int) -> StepResult:
        p = self.plan
        config = engine.core.config
        result = StepResult(name, backend, getattr(config, "enforce_eager", None), batch,
                            p.context + p.warmup_steps + p.steps / 2)
        result.weight_bytes = sum(t.numel() * t.element_size() for t in engine.core.runner.model.parameters())
        m = config.model
        per_token = m.num_layers * 2 * m.num_kv_heads * m.head_dim * config.dtype.itemsize
        result.kv_bytes = int(batch * result.context * per_token)
        if self.deadline.expired():
            result.status = "skipped: time budget"
            return result
        rng = random.Random(batch)
        params = SamplingParams(temperature=0.0, max_tokens=p.warmup_steps + p.steps + 2, ignore_eos=True)
        ids = [f"b{batch}-{i}" for i in range(batch)]
        try:
            for rid in ids:
                engine.add_request(rid, [rng.randrange(10, engine.info.vocab_size) for _ in range(p.context)], params)
            start = time.perf_counter()
            started: set[str] = set()
            while len(started) < batch:  # prefill, chunked; untimed beyond this total
                started.update(out.request_id for out in engine.step())
            result.prefill_s = time.perf_counter() - start
            for _ in range(p.warmup_steps):
                engine.step()
            times = []
            for _ in range(p.steps):
                self._sync()
                start = time.perf_counter()
                outs = engine.step()
                self._sync()
                times.append(time.perf_counter() - start)
                if len(outs) != batch:
                    raise RuntimeError(f"a timed step advanced {len(outs)} of {batch} requests: not a pure decode step")
        except torch.cuda.OutOfMemoryError:
            result.status = "out of memory"
        except Exception as exc:  # noqa: BLE001 - one failing point must not lose the others
            result.status = f"error: {type(exc).__name__}: {exc}"
            self.errors.append(f"{name} batch {batch}: {result.status}")
        else:
            step = statistics.median(times)
            result.step_ms = step * 1e3
            result.tokens_per_s = batch / step
            result.roofline_pct = 100 * (result.weight_bytes + result.kv_bytes) / self.copy_bw / step
        finally:
            for rid in ids:
                engine.abort_request(rid)
        return result

    def _sync(self) -> None:
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)

    def as_json(self) -> dict:
        return {"results": [asdict(r) for r in self.results], "notes": self.notes, "errors": self.errors}

    def table_rows(self) -> list[list[str]]:
        rows = []
        for r in self.results:
            rows.append([r.model, r.backend, str(r.enforce_eager), str(r.batch), f"{r.context:.0f}",
                         f"{r.step_ms:.2f}" if r.step_ms is not None else r.status,
                         f"{r.tokens_per_s:.0f}" if r.tokens_per_s is not None else "-",
                         f"{r.weight_bytes / 1e9:.3g}", f"{r.kv_bytes / 1e9:.3g}",
                         f"{r.roofline_pct:.0f}%" if r.roofline_pct is not None else "-",
                         f"{r.prefill_s:.1f}" if r.prefill_s is not None else "-"])
        return rows


TABLE_COLUMNS = ["model", "backend", "enforce_eager", "batch", "context", "step ms", "tok/s", "weights GB", "KV GB",
                 "roofline", "prefill s"]
