"""Workloads: random prompts of exact token counts, or prompts read from a JSONL or ShareGPT file.

Token counts are the server's: by default /tokenize and /detokenize on the target itself (attnserve and vLLM both
have them), else a local tokenizer (`--tokenizer`). A random prompt's count is what the server will charge for it:
for completions the prompt text with its special tokens (BOS), for chat the whole templated conversation.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from clients.bench import BenchError
from clients.bench.defaults import DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN

# Distinct ordinary words: their token ids are the alphabet random prompts are drawn from. Real word pieces (rather
# than arbitrary vocabulary ids, which include control bytes and special tokens) survive decode -> encode closely,
# so the exact-count adjustment converges in a step or two.
_WORDS = """
time year people way day man thing woman life child world school state family student group country problem hand
part place case week company system program question work government number night point home water room mother
area money story fact month lot right study book eye job word business issue side kind head house service friend
father power hour game line end member law car city community name president team minute idea kid body information
back parent face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education foot boy age policy process music market sense nation plan
college interest death experience effect use class control care field development role effort rate heart drug
show leader light voice wife police mind price report decision son view relationship town road arm difference
river mountain garden window letter paper table chair bread stone cloud summer winter yellow green quiet bright
simple early small large young strong little great old public local clear happy ready often always never again
""".split()

MAX_ADJUST_STEPS = 40  # decode -> count -> grow/shrink rounds for one prompt before giving up
BUILD_CONCURRENCY = 8  # prompts built at once (each is a few small /tokenize and /detokenize calls)
SHAREGPT_HUMAN = ("human", "user")
SHAREGPT_ANSWER = ("gpt", "assistant", "chatgpt")


class DatasetError(BenchError):
    pass


@dataclass
class BenchRequest:
    """One request of the workload: a prompt (completions) or messages (chat), and its max_tokens."""

    prompt: str | None
    messages: list[dict] | None
    max_tokens: int
    expected_prompt_len: int | None = None  # exact for the random dataset; unknown (None) for files


class TokenCounter(Protocol):
    """Token counting as the target server does it (counters.py: the server's /tokenize, or --tokenizer PATH)."""

    async def encode(self, text: str) -> list[int]: ...  # plain text, no special tokens

    async def decode(self, ids: list[int]) -> str: ...

    async def count_prompt(self, text: str) -> int: ...  # as a completions request is charged (with BOS)

    async def count_chat(self, messages: list[dict]) -> int: ...  # templated, with the generation prompt


# ----- random prompts of exact lengths -----


def length_bounds(length: int, ratio: float) -> tuple[int, int]:
    """The range lengths are drawn from: [floor(L*(1-r)), ceil(L*(1+r))], as vLLM's RandomDataset draws them, and
    never below 1 (`bench offline` draws from the same range)."""
    return max(1, math.floor(length * (1 - ratio))), max(1, math.ceil(length * (1 + ratio)))


def random_lengths(n: int, input_len: int, output_len: int, ratio: float, seed: int) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) per request, each uniform in length_bounds(L, r)."""
    rng = random.Random(seed)
    inputs, outputs = length_bounds(input_len, ratio), length_bounds(output_len, ratio)
    return [(rng.randint(*inputs), rng.randint(*outputs)) for _ in range(n)]


def fit_lengths(max_model_len: int | None, input_len: int | None, output_len: int | None,
                ratio: float) -> tuple[int, int, str | None]:
    """The random dataset's (input_len, output_len), and a line saying how they were chosen when a default was used.

    None means not given: vLLM's default is used when the longest request drawn (prompt + output, the tops of
    length_bounds) fits the server's max_model_len; else it is lowered until it does (both defaults by one factor,
    so vLLM's 8:1 shape stays). Lengths given explicitly are never changed: when they cannot fit, DatasetError names
    max_model_len before any request is sent, rather than a run of 400s. A prompt length counts BOS and the chat
    template already (it is what the server charges), so nothing more is held back for them.
    """

    def longest(i: int, o: int) -> int:
        return length_bounds(i, ratio)[1] + length_bounds(o, ratio)[1]

    def fits(i: int, o: int) -> bool:
        return max_model_len is None or longest(i, o) <= max_model_len

    i, o = input_len or DEFAULT_INPUT_LEN, output_len or DEFAULT_OUTPUT_LEN
    spread = f" with --range-ratio {ratio:g}" if ratio else ""
    if input_len is not None and output_len is not None:
        if not fits(i, o):
            raise DatasetError(f"--input-len {i} + --output-len {o}{spread} reach {longest(i, o)} tokens, above the "
                               f"server's max_model_len {max_model_len}; lower them")
        return i, o, None
    if input_len is None and output_len is None:
        default, beside = f"vLLM's defaults {DEFAULT_INPUT_LEN} and {DEFAULT_OUTPUT_LEN}", ""
    elif input_len is None:
        default, beside = f"vLLM's default --input-len {DEFAULT_INPUT_LEN}", f" beside --output-len {o}"
    else:
        default, beside = f"vLLM's default --output-len {DEFAULT_OUTPUT_LEN}", f" beside --input-len {i}"
    if max_model_len is None:
        why = f"{default}; the server does not report its max_model_len, so the fit is not checked"
    elif fits(i, o):
        why = f"{default}, within the server's max_model_len {max_model_len}{beside}"
    else:
        if input_len is None and output_len is None:
            scale = max_model_len / longest(i, o)
            i, o = max(1, int(i * scale)), max(1, int(o * scale))
        # Then lower the defaulted length (the input, when both were) a token at a time until the longest draw
        # fits: after the scaling this only absorbs rounding; beside a given length it finds the most that fits.
        while not fits(i, o) and (i if input_len is None else o) > 1:
            i, o = (i - 1, o) if input_len is None else (i, o - 1)
        if not fits(i, o):
            raise DatasetError(f"no random-dataset lengths{spread} fit the server's max_model_len "
                               f"{max_model_len}{beside}")
        why = f"{default} lowered to fit the server's max_model_len {max_model_len}{beside}"
    return i, o, f"Lengths: input {i} and output {o} tokens{spread}: {why}"


async def _exact_prompt(counter: TokenCounter, chat: bool, target: int, overhead: int, pool: list[int],
                        rng: random.Random) -> str:
    """Text whose count is exactly `target`. Start from target - overhead random word pieces, then repeatedly
    decode, count, and add or drop pieces at the end by the difference: retokenizing can merge pieces across
    boundaries, so one pass is not always exact."""

    async def count(text: str) -> int:
        return await (counter.count_chat([{"role": "user", "content": text}]) if chat else counter.count_prompt(text))

    ids = [rng.choice(pool) for _ in range(target - overhead)]
    for _ in range(MAX_ADJUST_STEPS):
        text = await counter.decode(ids)
        diff = target - await count(text)
        if diff == 0:
            return text
        if diff > 0:
            ids += [rng.choice(pool) for _ in range(diff)]
        else:
            # Drop the surplus; once only a few pieces are left, redraw the last one instead so the text never
            # becomes empty (an empty prompt may be refused).
            del ids[max(1, len(ids) + diff):]
            if len(ids) == 1:
                ids[0] = rng.choice(pool)
    raise DatasetError(f"could not build a prompt of exactly {target} tokens in {MAX_ADJUST_STEPS} rounds (the "
                       "tokenizer keeps merging pieces at the end); try another --seed or --input-len")


async def _gather_limited(jobs: list[Callable[[], Awaitable[Any]]], limit: int = BUILD_CONCURRENCY) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[Any]]) -> Any:
        async with semaphore:
            return await job()

    return await asyncio.gather(*(run(job) for job in jobs))


async def build_random(counter: TokenCounter, *, n: int, input_len: int, output_len: int, ratio: float, seed: int,
                       chat: bool) -> list[BenchRequest]:
    lengths = random_lengths(n, input_len, output_len, ratio, seed)
    pool = list(dict.fromkeys(await counter.encode(" " + " ".join(_WORDS))))
    if not pool:
        raise DatasetError("the tokenizer returned no tokens for plain English text")
    overhead = await (counter.count_chat([{"role": "user", "content": ""}]) if chat else counter.count_prompt(""))
    shortest = min(length for length, _ in lengths)
    if shortest <= overhead:
        what = "the chat template" if chat else "the special tokens (BOS)"
        raise DatasetError(f"a {shortest}-token prompt leaves no room for text: {what} already take {overhead} "
                           f"tokens; raise --input-len (or lower --range-ratio)")

    def job(i: int, target: int) -> Callable[[], Awaitable[str]]:
        # One generator per prompt, seeded by (seed, index): the text does not depend on the build order.
        return lambda: _exact_prompt(counter, chat, target, overhead, pool, random.Random(f"{seed}:{i}"))

    texts = await _gather_limited([job(i, p) for i, (p, _) in enumerate(lengths)])
    return [BenchRequest(prompt=None if chat else text, messages=[{"role": "user", "content": text}] if chat else None,
                         max_tokens=out, expected_prompt_len=p)
            for text, (p, out) in zip(texts, lengths)]


# ----- files: JSONL records or ShareGPT -----


@dataclass
class FileRecord:
    where: str  # "FILE:LINE", for messages about this record
    prompt: str | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None
    answer: str | None = None  # ShareGPT: the reply whose token count becomes max_tokens
    sharegpt: bool = False


def _json_list_items(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """(line, element) of a top-level JSON list, decoding one element at a time so each keeps its line number."""
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0

    def skip_space(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    pos = skip_space(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        yield line_at(pos), item
        pos = skip_space(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            return
        raise DatasetError(f"{path}:{line_at(min(pos, len(text)))}: expected ',' or ']' in the JSON list")


def _positive_int_field(obj: dict, key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DatasetError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), (str, list)):
            raise DatasetError(f"{where}: messages[{i}] must be an object with a string 'role' and a 'content'")
    return messages


def _parse_sharegpt(conversations: Any, where: str) -> FileRecord | None:
    """First human turn = prompt, the first gpt turn after it = answer. None (skipped) without a human turn."""
    if not isinstance(conversations, list):
        raise DatasetError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
    for i, turn in enumerate(conversations):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str)):
            raise DatasetError(f"{where}: conversations[{i}] must be an object with string 'from' and 'value'")
    human = next((i for i, t in enumerate(conversations) if t["from"] in SHAREGPT_HUMAN and t["value"]), None)
    if human is None:
        return None
    answer = next((t["value"] for t in conversations[human + 1:] if t["from"] in SHAREGPT_ANSWER), None)
    return FileRecord(where, prompt=conversations[human]["value"], answer=answer, sharegpt=True)


def parse_record(obj: Any, where: str) -> FileRecord | None:
    """One dataset record; None for a ShareGPT conversation without a human turn (skipped, as vLLM does)."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        return _parse_sharegpt(obj["conversations"], where)
    if ("prompt" in obj) == ("messages" in obj):
        raise DatasetError(f"{where}: expected exactly one of \"prompt\" (a string) or \"messages\" (a list), "
                           f"or a ShareGPT \"conversations\" list")
    if "max_tokens" in obj and "output_tokens" in obj:
        raise DatasetError(f"{where}: give one of 'max_tokens' or 'output_tokens', not both")
    # "output_tokens" is what vLLM's custom dataset calls it, so its files replay here unchanged.
    max_tokens = _positive_int_field(obj, "output_tokens" if "output_tokens" in obj else "max_tokens", where)
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise DatasetError(f"{where}: 'prompt' must be a non-empty string")
        return FileRecord(where, prompt=obj["prompt"], max_tokens=max_tokens)
    return FileRecord(where, messages=_check_messages(obj["messages"], where), max_tokens=max_tokens)


def load_file(path: str | Path, kind: str | None = None) -> tuple[list[FileRecord], int]:
    """(records, number skipped) of a JSONL file or a JSON list (ShareGPT's layout). `kind` ("sharegpt" or
    "custom", from --dataset-name) is the format every record must have; None takes either."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"--dataset {path}: no such file (give 'random' or a .jsonl / ShareGPT .json file)") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"--dataset {path}: cannot read it: {exc}") from None
    if text.lstrip().startswith("["):
        items: Iterator[tuple[int, Any]] = _json_list_items(text, path)
    else:
        items = _jsonl_items(text, path)
    records, skipped = [], 0
    for line, obj in items:
        where = f"{path}:{line}"
        record = parse_record(obj, where)
        if kind is not None and ("conversations" in obj) != (kind == "sharegpt"):
            raise DatasetError(f"{where}: --dataset-name {kind} wants " + (
                "ShareGPT {\"conversations\": [...]} records" if kind == "sharegpt" else
                "{\"prompt\": ...} or {\"messages\": [...]} records") + ", and this is not one")
        if record is None:
            skipped += 1
        else:
            records.append(record)
    return records, skipped


def _jsonl_items(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None


async def build_from_file(path: str | Path, *, n: int, chat: bool, output_len: int | None,
                          counter: Callable[[], TokenCounter],
                          kind: str | None = None) -> tuple[list[BenchRequest], str | None]:
    """The first n usable records (cycling when the file has fewer), and a note for the user, if any.

    max_tokens: --output-len when given, else the record's "max_tokens" (or "output_tokens"), else (ShareGPT) the
    answer's token count, else the default. `counter` is called only when a ShareGPT answer must be counted, so a
    file with explicit lengths needs no tokenizer at all. `kind` is load_file's.
    """
    records, skipped = load_file(path, kind)
    if output_len is None:
        # A ShareGPT conversation without an answer has no output length to replay.
        unanswered = sum(1 for r in records if r.sharegpt and r.answer is None)
        records = [r for r in records if not (r.sharegpt and r.answer is None)]
        skipped += unanswered
    notes = []
    if skipped:
        notes.append(f"skipped {skipped} ShareGPT conversation(s) without a human turn or a gpt answer")
    if not records:
        raise DatasetError(f"--dataset {path}: no usable records")
    if not chat:
        bad = next((r for r in records if r.messages is not None), None)
        if bad is not None:
            raise DatasetError(f"{bad.where}: a 'messages' record needs --endpoint chat")
    chosen = [records[i % len(records)] for i in range(n)]
    if n > len(records):
        notes.append(f"the file has {len(records)} usable records; cycling through them for {n} requests")

    answer_lens: dict[int, int] = {}
    if output_len is None:
        unique = list({id(r): r for r in chosen if r.max_tokens is None and r.answer is not None}.values())
        if unique:
            tok = counter()
            counts = await _gather_limited([(lambda r=r: tok.encode(r.answer)) for r in unique])
            answer_lens = {id(r): max(1, len(ids)) for r, ids in zip(unique, counts)}

    requests = []
    for r in chosen:
        max_tokens = output_len or r.max_tokens or answer_lens.get(id(r)) or DEFAULT_OUTPUT_LEN
        messages = r.messages if r.messages is not None else ([{"role": "user", "content": r.prompt}] if chat else None)
        requests.append(BenchRequest(prompt=None if chat else r.prompt, messages=messages, max_tokens=max_tokens))
    return requests, "; ".join(notes) or None
