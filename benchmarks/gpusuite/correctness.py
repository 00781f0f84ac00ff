"""Part 1, correctness at real shapes: the Triton decode and extend kernels and the TritonBackend against the
float32 torch references of tests/kernel_oracles.py and against the SDPA backend; bf16, block size 16, the heads of
the published models, contexts up to 8k.

A check passes when every element satisfies |got - want| <= tol * (1 + |want|): against the float32
references tol is the design's 1e-2 for bf16; between the two backends, whose outputs are both rounded to
bf16, it is 2e-2, since the two roundings alone may differ by one bf16 step (2^-7 relative). The table shows
the largest absolute error and the worst ratio of error to that bound. The KV write is checked exactly: both
backends must leave bit-identical caches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from kernel_oracles import paged_decode_reference, paged_extend_reference
from kernels.sdpa import SdpaBackend

from .env import Env
from .paged import PagedBatch, random_batch
from .shapes import AttentionShape

BLOCK_SIZE = 16
DTYPE = torch.bfloat16
TOL_VS_REFERENCE = 1e-2
TOL_BF16_VS_BF16 = 2e-2


@dataclass(frozen=True)
class Plan:
    decode_contexts: list[int]
    extend_seqs: list[tuple[int, int]]  # (cached, new) prefill chunks
    mixed_seqs: list[tuple[int, int]]  # decodes and chunks in one step
    window: int  # the sliding window of the windowed mixed case


# Contexts around block and tile edges (15, 16, 17, 2047), odd lengths, and the 8k the timing part uses.
FULL = Plan(
    decode_contexts=[1, 15, 16, 17, 100, 1000, 2047, 4096, 8000, 8192],
    extend_seqs=[(0, 37), (0, 512), (1000, 200), (4000, 96), (7680, 512)],
    mixed_seqs=[(511, 1), (8191, 1), (2047, 1), (0, 300), (4000, 128), (7000, 1192)],
    window=4096,
)
SMOKE = Plan(
    decode_contexts=[1, 15, 16, 17, 40, 100],
    extend_seqs=[(0, 5), (0, 33), (20, 17), (50, 64)],
    mixed_seqs=[(30, 1), (99, 1), (0, 20), (40, 24)],
    window=24,
)


@dataclass
class Check:
    model: str
    check: str
    case: str
    max_abs_err: float
    worst_ratio: float  # max |err| / (tol * (1 + |want|)); <= 1 passes
    passed: bool


class CorrectnessRun:
    def __init__(self, env: Env, plan: Plan, inject_failure: bool):
        self.env = env
        self.plan = plan
        # --inject-failure: perturb the first reference, to prove that a failing check fails the run.
        self.inject = inject_failure
        self.checks: list[Check] = []
        self.notes: list[str] = []

    def run(self, shapes: list[AttentionShape]) -> None:
        if not self.env.triton_runs:
            self.notes.append(f"Triton checks skipped: {self.env.triton_mode}; the SDPA backend is checked alone")
        with torch.inference_mode():
            for shape in shapes:
                self._guarded(shape, "decode", self._decode, shape)
                self._guarded(shape, "extend", self._extend, shape)
                for window in (None, self.plan.window):
                    self._guarded(shape, "mixed step", self._mixed, shape, window)

    def _guarded(self, shape: AttentionShape, case: str, run_case, *args) -> None:
        # A kernel that raises (a compile error on another Triton, out of memory) fails its case and the run,
        # but the other cases still report.
        try:
            run_case(*args)
        except Exception as exc:  # noqa: BLE001
            first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
            self.checks.append(Check(shape.model, f"{case}: raised {type(exc).__name__}", first_line, float("inf"),
                                     float("inf"), False))
            if self.env.device.type == "cuda":
                torch.cuda.empty_cache()

    # ---- the cases ------------------------------------------------------------------------------------

    def _decode(self, shape: AttentionShape) -> None:
        contexts = self.plan.decode_contexts
        batch = random_batch(shape, [(c - 1, 1) for c in contexts], BLOCK_SIZE, DTYPE, self.env.device, seed=1,
                             new_in_cache=True)
        case = f"{len(contexts)} decodes, ctx {min(contexts)}..{max(contexts)}"
        want = reference_rows(batch, batch.k_cache, batch.v_cache, shape.scale, None)
        self._compare(shape, "SDPA backend vs reference", case, _sdpa_forward(batch, shape, None), want)
        if not self.env.triton_runs:
            return
        from kernels.triton_decode import MAX_SPLITS, choose_num_splits, paged_decode_attention

        chosen = choose_num_splits(len(contexts), shape.num_kv_heads, max(contexts), self.env.num_sms)
        for splits in sorted({1, chosen, MAX_SPLITS}):
            out = torch.full_like(batch.q, float("nan"))
            paged_decode_attention(out, batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens(),
                                   batch.query_start(), batch.seqs(decodes=True), shape.scale, None, splits)
            label = f"Triton decode kernel, {splits} split{'s' if splits > 1 else ''}"
            self._compare(shape, label + (" (auto)" if splits == chosen else "") + " vs reference", case, out, want)

    def _extend(self, shape: AttentionShape) -> None:
        seqs = self.plan.extend_seqs
        batch = random_batch(shape, seqs, BLOCK_SIZE, DTYPE, self.env.device, seed=2, new_in_cache=True)
        case = f"{len(seqs)} chunks, up to {max(n for _, n in seqs)} new on {max(c for c, _ in seqs)} cached"
        want = reference_rows(batch, batch.k_cache, batch.v_cache, shape.scale, None)
        self._compare(shape, "SDPA backend vs reference", case, _sdpa_forward(batch, shape, None), want)
        if not self.env.triton_runs:
            return
        from kernels.triton_extend import paged_extend_attention

        out = torch.full_like(batch.q, float("nan"))
        paged_extend_attention(out, batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens(),
                               batch.query_start(), batch.seqs(decodes=False), max(batch.query_lens), shape.scale,
                               None)
        self._compare(shape, "Triton extend kernel vs reference", case, out, want)

    def _mixed(self, shape: AttentionShape, window: int | None) -> None:
        """One engine step through both backends, KV write included: decodes and chunks, new K/V not yet cached."""
        seqs = self.plan.mixed_seqs
        batch = random_batch(shape, seqs, BLOCK_SIZE, DTYPE, self.env.device, seed=3 if window is None else 4,
                             new_in_cache=False)
        case = (f"{sum(n == 1 for _, n in seqs)} decodes + {sum(n > 1 for _, n in seqs)} chunks, "
                f"ctx up to {max(c + n for c, n in seqs)}" + (f", window {window}" if window else ""))
        sdpa_k, sdpa_v = batch.k_cache.clone(), batch.v_cache.clone()
        sdpa = SdpaBackend()
        sdpa_out = sdpa.forward(batch.q, batch.k_new, batch.v_new, sdpa_k, sdpa_v, sdpa.plan(batch.layout()),
                                shape.scale, window)
        want = reference_rows(batch, sdpa_k, sdpa_v, shape.scale, window)
        self._compare(shape, "SDPA backend vs reference", case, sdpa_out, want)
        if not self.env.triton_runs:
            return
        from kernels.backend import get_attention_backend

        triton = get_attention_backend("triton", self.env.device)
        triton_k, triton_v = batch.k_cache.clone(), batch.v_cache.clone()
        triton_out = triton.forward(batch.q, batch.k_new, batch.v_new, triton_k, triton_v,
                                    triton.plan(batch.layout()), shape.scale, window)
        self._exact(shape, "TritonBackend KV write == SDPA backend's", case, (triton_k, triton_v), (sdpa_k, sdpa_v))
        self._compare(shape, "TritonBackend vs reference", case, triton_out, want)
        self._compare(shape, "TritonBackend vs SDPA backend", case, triton_out, sdpa_out, TOL_BF16_VS_BF16)

    # ---- comparisons ----------------------------------------------------------------------------------

    def _compare(self, shape: AttentionShape, check: str, case: str, got: torch.Tensor, want: torch.Tensor,
                 tol: float = TOL_VS_REFERENCE) -> None:
        got, want = got.float(), want.float()
        if self.inject:
            want = want.clone()
            want.view(-1)[0] += 1.0
            self.inject = False
            check += " [--inject-failure]"
        err = (got - want).abs()
        finite = bool(torch.isfinite(got).all())
        ratio = float((err / (tol * (1 + want.abs()))).max()) if finite else float("inf")
        max_err = float(err.max()) if finite else float("inf")
        self.checks.append(Check(shape.model, check, case, max_err, ratio, finite and ratio <= 1.0))

    def _exact(self, shape: AttentionShape, check: str, case: str, got: tuple, want: tuple) -> None:
        same = all(torch.equal(g, w) for g, w in zip(got, want))
        err = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want))
        self.checks.append(Check(shape.model, check, case, err, 0.0 if same else float("inf"), same))

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def as_json(self) -> dict:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks], "notes": self.notes}

    def table_rows(self) -> list[list[str]]:
        return [[c.model, c.check, c.case, f"{c.max_abs_err:.2e}", f"{c.worst_ratio:.3f}",
                 "PASS" if c.passed else "FAIL"] for c in self.checks]


TABLE_COLUMNS = ["model", "check", "case", "max |err|", "err / tol", "result"]


def reference_rows(batch: PagedBatch, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                   window: int | None) -> torch.Tensor:
    """The float32 torch references (tests/kernel_oracles.py) for every row of the batch."""
    out = torch.zeros(batch.q.shape, dtype=torch.float32, device=batch.device)
    args = (batch.q, k_cache, v_cache, batch.block_tables, batch.seq_lens(), batch.query_start())
    decodes = batch.seqs(decodes=True)
    if decodes.numel():
        out[batch.rows(decodes=True)] = paged_decode_reference(*args, decodes, scale, window)
    chunks = batch.seqs(decodes=False)
    if chunks.numel():
        per_seq = paged_extend_reference(*args, chunks, scale, window)
        out[batch.rows(decodes=False)] = torch.cat([per_seq[s] for s in chunks.tolist()])
    return out


def _sdpa_forward(batch: PagedBatch, shape: AttentionShape, window: int | None) -> torch.Tensor:
    backend = SdpaBackend()
    return backend.forward(batch.q, batch.k_new, batch.v_new, batch.k_cache, batch.v_cache,
                           backend.plan(batch.layout()), shape.scale, window)
