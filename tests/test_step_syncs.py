"""A step waits for the device once: when its sampled tokens (and logprobs) come back.

On CPU no wait can be observed, so the structural rule is checked instead: while the runner runs the
model and the sampler, nothing turns tensor data into Python values (item, tolist, int(), bool(), ...)
or asks the device for a data-dependent size (nonzero, boolean-mask indexing), except the one final
copy of the results. On a GPU, torch.cuda.set_sync_debug_mode("error") turns any synchronizing call
during a decode step into an error; the final copy waits on an event, which that mode allows.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cuda_graphs import capture_sizes
from engine.sampler import Sampler
from engine.sequence import Sequence

# Tensor methods that hand tensor data to Python, or need the device to report a size first.
READING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
                   "nonzero", "argwhere", "masked_select", "unique")
READING_FUNCTIONS = ("nonzero", "argwhere", "masked_select", "unique")


def _has_bool_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def host_reads(monkeypatch: pytest.MonkeyPatch):
    """Record, in order, every call above (and boolean-mask indexing) made inside the block."""
    calls: list[str] = []
    with monkeypatch.context() as m:
        for name in READING_METHODS:
            original = getattr(torch.Tensor, name)

            def method(self, *args, _original=original, _name=name, **kwargs):
                calls.append(_name)
                return _original(self, *args, **kwargs)

            m.setattr(torch.Tensor, name, method)
        for name in READING_FUNCTIONS:
            original = getattr(torch, name)
            m.setattr(torch, name, lambda *a, _original=original, _name=name, **k: (
                calls.append(f"torch.{_name}"), _original(*a, **k))[1])
        get_item, set_item = torch.Tensor.__getitem__, torch.Tensor.__setitem__

        def getitem(self, index):
            if _has_bool_mask(index):
                calls.append("boolean-mask index")
            return get_item(self, index)

        def setitem(self, index, value):
            if _has_bool_mask(index):
                calls.append("boolean-mask index")
            return set_item(self, index, value)

        m.setattr(torch.Tensor, "__getitem__", getitem)
        m.setattr(torch.Tensor, "__setitem__", setitem)
        # On CUDA, some torch versions range-check these indices with .item().
        for name in ("index_put_", "index_put"):
            original = getattr(torch.Tensor, name)

            def index_put(self, indices, values, accumulate=False, _original=original, _name=name):
                if accumulate:
                    calls.append(f"{_name}(accumulate=True)")
                return _original(self, indices, values, accumulate)

            m.setattr(torch.Tensor, name, index_put)
        yield calls


def random_prompts(n: int, seed: int, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, 500) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def every_knob(n: int) -> list[SamplingParams]:
    """Greedy and sampled rows, seeded and not, logprobs on some, every logit processor and filter."""
    out = []
    for i in range(n):
        kw = dict(max_tokens=6 + i % 3, ignore_eos=True)
        if i % 4 == 0:
            kw.update(temperature=0.0, logprobs=2)
        elif i % 4 == 1:
            kw.update(temperature=0.9, top_k=30, top_p=0.8, min_p=0.02, seed=11 * i, logprobs=0)
        elif i % 4 == 2:
            kw.update(temperature=1.1, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2,
                      logit_bias={7: 3.0, 9: -2.0}, min_tokens=3)
        else:
            kw.update(temperature=0.7, top_p=0.95)
        out.append(SamplingParams(**kw))
    return out


def step_kind(scheduled) -> str:
    return "decode" if all(n == 1 for _, n in scheduled) else "prefill"


def record_steps(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, list[str]]]:
    """Instrument every runner.execute: (kind, sequences that sampled, reads) per step."""
    steps = []
    runner = llm.engine.core.runner
    real = runner.execute

    def execute(scheduled, samples, *args):
        with host_reads(monkeypatch) as calls:
            out = real(scheduled, samples, *args)
        steps.append((step_kind(scheduled), sum(samples), list(calls)))
        return out

    monkeypatch.setattr(runner, "execute", execute)
    return steps


@pytest.fixture(scope="module")
def llama(make_ckpt):
    return make_ckpt("llama")


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded-decode"])
def test_a_step_reads_back_only_its_results(llama, monkeypatch, padded):
    # A small token budget: steps that only advance a prefill chunk, steps mixing chunks with decodes,
    # and pure decode steps.
    llm = LLM(str(llama), max_model_len=128, max_num_seqs=6, max_num_batched_tokens=24, num_kv_blocks=64)
    if padded:
        llm.engine.core.runner.decode_sizes = capture_sizes(6)
    steps = record_steps(llm, monkeypatch)
    llm.generate(random_prompts(8, seed=1, lo=30, hi=60), every_knob(8), use_tqdm=False)
    kinds = {(kind, sampled > 0) for kind, sampled, _ in steps}
    assert kinds == {("decode", True), ("prefill", True), ("prefill", False)}, kinds
    for kind, sampled, calls in steps:
        # One copy of the results when something sampled; none when nothing did.
        assert calls == (["tolist"] if sampled else []), (kind, sampled, calls)


def test_the_sampler_reads_back_once(monkeypatch):
    seqs = [Sequence(i, f"r{i}", 0, [1, 2, 3, 2], p, max_tokens=100) for i, p in enumerate(every_knob(8))]
    logits = torch.randn(8, 64)
    with host_reads(monkeypatch) as calls:
        out = Sampler()(logits, seqs)
    assert calls == ["tolist"]
    assert all(isinstance(t, int) for t in out.token_ids)
    for lp, seq in zip(out.logprobs, seqs):
        assert (lp is None) == (seq.params.logprobs is None)
        if lp is not None:
            assert isinstance(lp.rank, int) and len(lp.top) == seq.params.logprobs
            assert all(isinstance(tok, int) for tok, _ in lp.top)


def test_the_instrument_sees_what_it_should(monkeypatch):
    x = torch.arange(6.0)
    with host_reads(monkeypatch) as calls:
        x.sum().item()
        int(x[2])
        x[x > 2]
        torch.nonzero(x)
        bool(x.any())
        x.index_put_((torch.tensor([1]),), torch.tensor([1.0]), accumulate=True)
    assert calls == ["item", "__int__", "boolean-mask index", "torch.nonzero", "__bool__",
                     "index_put_(accumulate=True)"]


@contextlib.contextmanager
def sync_debug_errors():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to observe device syncs; none here")
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_cuda_decode_steps_do_not_sync(llama, monkeypatch, enforce_eager):
    llm = LLM(str(llama), device="cuda", max_model_len=128, max_num_seqs=8, enforce_eager=enforce_eager)
    # Warm-up outside the check: Triton compiles its kernels and the
    # rotary tables move to the GPU on first use.
    llm.generate(random_prompts(8, seed=2), every_knob(8), use_tqdm=False)
    runner = llm.engine.core.runner
    assert (runner.graphs is None) == enforce_eager
    real = runner.execute
    checked = []

    def execute(scheduled, samples, *args):
        if step_kind(scheduled) != "decode":
            return real(scheduled, samples, *args)
        with sync_debug_errors():
            result = real(scheduled, samples, *args)
        checked.append(len(scheduled))
        return result

    monkeypatch.setattr(runner, "execute", execute)
    llm.generate(random_prompts(8, seed=3), every_knob(8), use_tqdm=False)
    assert checked, "no decode step ran"
