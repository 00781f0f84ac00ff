"""Per-request sampling and stopping parameters.

Field names and meanings follow the OpenAI API and vLLM, so the server can map a request body onto
this dataclass one field at a time.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ValidationError

MAX_LOGPROBS = 20
MAX_N = 128
# The largest grammar text a request may bring (a JSON schema once serialized, a regex, a grammar, the choices
# together): compiling is superlinear in it, and a hostile megabyte must be refused before any work is done.
MAX_GRAMMAR_CHARS = 64 * 1024
MAX_CHOICES = 1024


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's StructuredOutputsParams): exactly one of a JSON schema (`json`, an object
    or its text), any JSON object (`json_object`), a regular expression (`regex`, Rust regex syntax, matched against
    the whole output), one of some strings (`choice`), or a grammar (`grammar`: llguidance's Lark syntax, or GBNF as
    llama.cpp writes it). `whitespace_pattern` replaces the regex JSON may put between its tokens
    (engine/structured_output.py has the bounded default)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None

    KINDS = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            named = ", ".join(given) if given else "none"
            raise ValidationError(f"structured outputs need exactly one of {', '.join(self.KINDS)}; got {named}",
                                  "structured_outputs")
        _check_grammar_text("whitespace_pattern", self.whitespace_pattern, allow_none=True)
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise ValidationError("structured_outputs.json must be a JSON schema (an object, or its text)",
                                  "structured_outputs")
        if isinstance(self.json, str):
            try:
                parsed = json.loads(self.json)
            except RecursionError:
                raise ValidationError("structured_outputs.json nests too deeply", "structured_outputs") from None
            except ValueError as exc:
                raise ValidationError(f"structured_outputs.json is not valid JSON: {exc}", "structured_outputs") \
                    from None
            if not isinstance(parsed, (dict, bool)):
                raise ValidationError("structured_outputs.json must be a JSON schema (an object)", "structured_outputs")
        if self.json_object not in (None, True, False):
            raise ValidationError("structured_outputs.json_object must be true or false", "structured_outputs")
        _check_grammar_text("regex", self.regex, allow_none=True)
        _check_grammar_text("grammar", self.grammar, allow_none=True)
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise ValidationError("structured_outputs.choice must be a non-empty list of strings",
                                      "structured_outputs")
            if len(self.choice) > MAX_CHOICES or not all(isinstance(c, str) and c for c in self.choice):
                raise ValidationError(f"structured_outputs.choice must hold 1 to {MAX_CHOICES} non-empty strings",
                                      "structured_outputs")
        try:
            size = len(self.text)
        except RecursionError:
            raise ValidationError(f"the structured-output {self.kind} nests too deeply", "structured_outputs") from None
        if size > MAX_GRAMMAR_CHARS:
            raise ValidationError(f"the structured-output {self.kind} has {size} characters, more than the "
                                  f"{MAX_GRAMMAR_CHARS} allowed; simplify it", "structured_outputs")

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    @property
    def text(self) -> str:
        """The constraint as one string: JSON schemas and choices serialized canonically, so equal constraints
        compile once (engine/structured_output.py caches by this)."""
        value = getattr(self, self.kind)
        if self.kind == "json":
            value = json.loads(value) if isinstance(value, str) else value
            return json.dumps(value, sort_keys=True, ensure_ascii=False)
        if self.kind == "choice":
            return json.dumps(list(value), ensure_ascii=False)
        return "" if self.kind == "json_object" else value

    @property
    def cache_key(self) -> tuple[str, str, str | None]:
        return self.kind, self.text, self.whitespace_pattern


def _check_grammar_text(name: str, value: Any, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str) or not value:
        raise ValidationError(f"structured_outputs.{name} must be a non-empty string", "structured_outputs")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len; 0: score the prompt only (no token is sampled)
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per output token; 0 = only the sampled token
    # Top-N logprobs per prompt token (the first has none); 0 = only the prompt token's own. See engine/core.py.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (engine/structured_output.py)
    # Filled by the engine from the model: eos ids that end a sequence unless ignore_eos.
    eos_token_ids: frozenset[int] = field(default_factory=frozenset, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    def validate(self) -> None:
        """Raise ValidationError naming the first field outside its allowed range."""
        check_int("n", self.n, 1, MAX_N)
        _check_float("temperature", self.temperature, 0.0, 100.0)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_int("top_k", self.top_k, 0, None, hint="0 or -1 disables it")
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, 2.0**31, low_open=True)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            check_int("seed", self.seed, -(2**63), 2**64 - 1)
        if self.max_tokens is not None:
            check_int("max_tokens", self.max_tokens, 0, None, hint="0 scores the prompt without sampling")
        check_int("min_tokens", self.min_tokens, 0, None)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValidationError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})", "min_tokens"
            )
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        if self.stop is not None:
            if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
                raise ValidationError("stop must be a non-empty string or a list of non-empty strings", "stop")
        if self.stop_token_ids is not None:
            for tok in self.stop_token_ids:
                check_int("stop_token_ids", tok, 0, None)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValidationError("structured_outputs must be a StructuredOutputsParams", "structured_outputs")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValidationError("logit_bias must map token ids to biases in [-100, 100]", "logit_bias")
            for tok, bias in self.logit_bias.items():
                check_int("logit_bias", tok, 0, None, hint="keys are token ids")
                _check_float("logit_bias", bias, -100.0, 100.0)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids named by the request must exist in the model's vocabulary."""
        check_token_ids("logit_bias", self.logit_bias or {}, vocab_size)
        check_token_ids("stop_token_ids", self.stop_token_ids or [], vocab_size)

    def clone(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def check_token_ids(name: str, ids, vocab_size: int) -> None:
    """Every id in `ids` must be a row of the model's embedding: 0 <= id < vocab_size."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValidationError(f"{name} has token id {bad}, but the vocabulary has ids 0..{vocab_size - 1}", name)


def check_int(name: str, value, low: int, high: int | None, hint: str = "", param: str | None = None) -> None:
    """A ValidationError naming `name` (and `param`, the request field, default `name`) unless value is an int
    (not a bool) in [low, high]; high None: no upper bound."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name} must be an integer, got {value!r}", param or name)
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        extra = f" ({hint})" if hint else ""
        raise ValidationError(f"{name} must be {allowed}{extra}, got {value}", param or name)


def _check_float(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValidationError(f"{name} must be a number, got {value!r}", name)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        allowed = f"in ({low}, {high}]" if low_open else f"in [{low}, {high}]"
        raise ValidationError(f"{name} must be {allowed}, got {value}", name)
