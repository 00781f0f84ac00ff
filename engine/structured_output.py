"""Structured outputs: a request's grammar masks its rows' logits, so every token it samples keeps the output valid.

The grammar engine is llguidance (docs/benchmarks.md has the measurements behind the choice). Three parts:
- GrammarCompiler (frontend side, in OutputProcessor.prepare): a StructuredOutputsParams -> a compiled grammar, on a
  worker thread with a time limit, cached by the constraint's text (LRU). A bad or oversized constraint is a
  ValidationError there, before the request reaches the core.
- the sampler (`mask_logits`): the constrained rows' next-token bitmasks, computed together by llguidance's thread
  pool, then applied to the logits in one batched op. Unconstrained rows cost nothing.
- Scheduler.update_from_output (`accept_token`): each sampled token advances the sample's matcher; a sample whose
  grammar cannot go on ends at once, with finish reason "stop".
Each sample has its own matcher on its Sequence. A preempted sample keeps its tokens (recompute preemption), so its
matcher state stays right; chunked prefill and the prefix cache touch only the prompt, which is not constrained.

llguidance is imported on first use, so an engine without it still serves unconstrained requests.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import torch

from engine.errors import ValidationError
from engine.sampling_params import StructuredOutputsParams
from kernels.transfer import to_device

if TYPE_CHECKING:
    from engine.sequence import Sequence
    from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# JSON may put whitespace between its tokens; unbounded, a weak model can loop on spaces and newlines forever. By
# default a gap holds at most one space: `{"a": 1, "b": [2, 3]}`, as Python's json.dumps writes it. A request's
# structured_outputs.whitespace_pattern (vLLM's field; guided_whitespace_pattern) replaces it, e.g.
# "[\\x20\\x0A]{0,16}" for indented JSON.
DEFAULT_WHITESPACE = r"\x20?"
COMPILE_TIMEOUT_S = 10.0
COMPILE_WORKERS = 2
COMPILE_STACK_BYTES = 128 * 2**20  # virtual: only the pages a deep grammar touches are ever committed
GRAMMAR_CACHE_SIZE = 128


class CompiledGrammar:
    """A compiled constraint: a matcher in its start state, copied (cheaply: the compiled grammar is shared) for
    each sample."""

    def __init__(self, matcher: Any):
        self._start = matcher

    def new_matcher(self) -> Any:
        return self._start.deep_copy()


class GrammarCompiler:
    """StructuredOutputsParams -> CompiledGrammar, for one tokenizer and vocabulary. Thread-safe."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._ll_tokenizer = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, CompiledGrammar] = OrderedDict()

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        key = spec.cache_key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            grammar = _compile_workers.run(lambda: self._build(spec), COMPILE_TIMEOUT_S)
        except FutureTimeout:
            raise ValidationError(f"compiling the structured-output {spec.kind} took longer than {COMPILE_TIMEOUT_S:g} "
                                  "s; simplify it", "structured_outputs") from None
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar

    def _build(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        llguidance = _llguidance()
        text = _grammar_text(llguidance, spec)
        # log_level 0: a bad grammar is the client's error, reported to it, not a server warning.
        matcher = llguidance.LLMatcher(self._llg_tokenizer(llguidance), text, log_level=0)
        if matcher.is_error():
            raise ValidationError(f"the structured-output {spec.kind} is invalid: {_first_line(matcher.get_error())}",
                                  "structured_outputs")
        return CompiledGrammar(matcher)

    def _llg_tokenizer(self, llguidance):
        with self._lock:
            if self._ll_tokenizer is None:
                # Built from the tokenizer's own JSON, added tokens included; n_vocab is the model's, so ids past the
                # tokenizer (embedding padding) are never allowed.
                self._ll_tokenizer = llguidance.LLTokenizer(self._tokenizer.backend.to_str(), n_vocab=self._vocab_size,
                                                            eos_token=self._eos or None)
            return self._ll_tokenizer


class _CompileWorkers:
    """The process's grammar-compile threads, shared by every engine and started on first use. Compiles run here, so
    that a caller can stop waiting for one that overruns its limit (llguidance's fuel limits bound each compile's
    work, so a thread left behind still ends). They get a large stack: llguidance recurses once per level of a
    grammar's rule chain, and a 64 KiB grammar chaining ~4,500 rules overflows the default 8 MiB, which kills the
    process (SIGSEGV), not just the request."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = False

    def run(self, job: Callable[[], Any], timeout: float) -> Any:
        """job()'s result (or exception); concurrent.futures.TimeoutError after `timeout` seconds."""
        with self._lock:
            if not self._started:
                previous = threading.stack_size(COMPILE_STACK_BYTES)
                try:
                    for i in range(COMPILE_WORKERS):
                        threading.Thread(target=self._work, name=f"grammar-compile-{i}", daemon=True).start()
                finally:
                    threading.stack_size(previous)
                self._started = True
        future: Future = Future()
        self._jobs.put((job, future))
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()  # still queued behind slow compiles: never start it
            raise

    def _work(self) -> None:
        while True:
            job, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller, which raises it
                future.set_exception(exc)


_compile_workers = _CompileWorkers()


def _grammar_text(llguidance, spec: StructuredOutputsParams) -> str:
    """The constraint in llguidance's grammar format."""
    if spec.kind in ("json", "json_object"):
        schema = spec.text if spec.kind == "json" else '{"type": "object"}'
        options = {"whitespace_pattern": spec.whitespace_pattern or DEFAULT_WHITESPACE}
        try:
            # defaults, not overrides: a schema's own "x-guidance" options still apply.
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        except ValueError as exc:
            raise ValidationError(f"the structured-output JSON schema is invalid: {exc}", "structured_outputs") from None
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(_lark_string(c) for c in spec.choice))
    try:
        return llguidance.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to Lark
    except ValueError as exc:
        raise ValidationError(f"the structured-output grammar is invalid: {exc}", "structured_outputs") from None


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # Lark's string literals take JSON's escapes


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "rejected by the grammar compiler"


_executor_lock = threading.Lock()
_executor = None


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValidationError("structured outputs need the llguidance package (pip install llguidance), which this "
                              "server does not have", "structured_outputs") from None
    return llguidance


def _mask_executor():
    """llguidance's thread pool for computing many matchers' masks at once (made on first use)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = _llguidance().LLExecutor()
        return _executor


def mask_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """`logits` with every token the row's grammar does not allow set to -inf, for the constrained rows; the same
    tensor when no row is constrained. Returns a float32 copy otherwise (the caller's logits stay as they were)."""
    rows = [i for i, seq in enumerate(seqs) if seq.matcher is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    words = (vocab + 31) // 32
    bitmask = torch.zeros((len(rows), words), dtype=torch.int32)
    _mask_executor().unsafe_compute_mask_ptr([(seqs[i].matcher, j) for j, i in enumerate(rows)],
                                             bitmask.data_ptr(), words * 4, len(rows))
    # Bit b of word w allows token 32 * w + b. Unpacked on the logits' device: the bitmask is 1/32 of the mask.
    bitmask = bitmask.to(logits.device)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).view(len(rows), words * 32)[:, :vocab].bool()
    out = logits.to(torch.float32, copy=True)
    index = to_device(rows, torch.long, logits.device)
    out.index_copy_(0, index, out.index_select(0, index).masked_fill_(~allowed, float("-inf")))
    return out


def accept_token(seq: Sequence, token: int) -> bool:
    """Advance seq's grammar by its newly sampled token. True when the output is complete: the grammar allows no
    further token (only the end), or it refused the token (which the mask should have made impossible)."""
    matcher = seq.matcher
    if not matcher.consume_token(token):
        logger.warning("request %s: the grammar refused sampled token %d (%s); ending the sample", seq.request_id,
                       token, _first_line(matcher.get_error()))
        return True
    return matcher.is_stopped()
