"""Measure how often the demo model completes a held-out Python function into valid code, through attnserve's engine.

    .venv/bin/python -m tools.eval_demo_model --model models/demo

From the validation files of tools.train_demo_model's split (files the model never trained on), 100 one-line
function headers are taken, evenly spaced over all candidates. The prompt is the file up to and including the
header line, newline included (the tokenizer keeps newlines as tokens of their own, so this ends where training
text does), left-truncated to the last PROMPT_TOKENS tokens; when the whole prefix fits it starts with
<|endoftext|>, as every training file does. Greedy decoding runs for up to MAX_NEW_TOKENS tokens, and the
completion is cut at the end of the function body: before the first non-blank line indented no deeper than the
header. Reported: the share of header + completion that Python's tokenize module reads without error, and the
share that ast.parse accepts after textwrap.dedent. Completions that reach the token limit count as they are.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import platform
import shlex
import sys
import textwrap
import tokenize
from dataclasses import asdict, dataclass
from pathlib import Path

from engine import LLM, SamplingParams
from tools.train_demo_model import EOT_TOKEN, SourceFile, split_files, stdlib_files

NUM_HEADERS = 100
PROMPT_TOKENS = 384
MAX_NEW_TOKENS = 128  # PROMPT_TOKENS + MAX_NEW_TOKENS = the model's 512-token context


@dataclass(frozen=True)
class Header:
    path: str
    lineno: int  # 1-based line of the `def`
    prefix: str  # the file up to and including the header line and its newline

    @property
    def line(self) -> str:
        return self.prefix.splitlines()[-1]


@dataclass
class Result:
    path: str
    lineno: int
    header: str
    completion: str
    finish: str  # "dedent" (the body ended), "eos" (the model ended the file) or "length" (token limit)
    tokenizes: bool
    parses: bool


def function_headers(files: list[SourceFile]) -> list[Header]:
    """Every function whose header is one line and whose body starts on a later line, in file and line order."""
    headers = []
    for f in files:
        lines = f.text.splitlines(keepends=True)
        nodes = [n for n in ast.walk(ast.parse(f.text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in sorted(nodes, key=lambda n: n.lineno):
            line = lines[node.lineno - 1]
            if line.rstrip().endswith(":") and node.body[0].lineno > node.lineno and line.endswith("\n"):
                headers.append(Header(f.path, node.lineno, "".join(lines[:node.lineno])))
    return headers


def evenly_spaced(items: list, count: int) -> list:
    return [items[i * len(items) // count] for i in range(count)]


def prompt_ids(tokenizer, prefix: str, eot_id: int) -> list[int]:
    ids = tokenizer.encode(prefix, add_special_tokens=False)
    return [eot_id, *ids] if len(ids) < PROMPT_TOKENS else ids[-PROMPT_TOKENS:]


def indentation(line: str) -> int:
    return len(line) - len(line.lstrip())


def cut_body(header_line: str, completion: str) -> tuple[str, bool]:
    """The completion up to the first non-blank line indented no deeper than the header; True if it was cut."""
    limit = indentation(header_line.expandtabs())
    kept = []
    for line in completion.splitlines(keepends=True):
        if line.strip() and indentation(line.expandtabs()) <= limit:
            return "".join(kept), True
        kept.append(line)
    return completion, False


def tokenizes(source: str) -> bool:
    try:
        for _ in tokenize.generate_tokens(io.StringIO(source).readline):
            pass
    except (tokenize.TokenError, SyntaxError):  # IndentationError is a SyntaxError
        return False
    return True


def parses(source: str) -> bool:
    try:
        ast.parse(textwrap.dedent(source))
    except (SyntaxError, ValueError):  # ValueError: a null byte in the source
        return False
    return True


def evaluate(model: str) -> tuple[list[Result], dict]:
    _, val_files = split_files(stdlib_files())
    headers = evenly_spaced(function_headers(val_files), NUM_HEADERS)
    llm = LLM(model, max_model_len=PROMPT_TOKENS + MAX_NEW_TOKENS)
    tokenizer = llm.get_tokenizer()
    prompts = [prompt_ids(tokenizer, h.prefix, tokenizer.backend.token_to_id(EOT_TOKEN)) for h in headers]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
    outputs = llm.generate(prompts, params, use_tqdm=False)

    results = []
    for header, out in zip(headers, outputs):
        completion = out.outputs[0]
        body, dedented = cut_body(header.line, completion.text)
        source = header.line + "\n" + body
        finish = "dedent" if dedented else "eos" if completion.finish_reason == "stop" else "length"
        results.append(Result(header.path, header.lineno, header.line, body, finish, tokenizes(source), parses(source)))
    n = len(results)
    summary = {
        "command": shlex.join(sys.orig_argv),
        "python": platform.python_version(),
        "headers": n,
        "validation_files_with_headers": len({r.path for r in results}),
        "tokenize_ok": sum(r.tokenizes for r in results) / n,
        "ast_ok": sum(r.parses for r in results) / n,
        "finish": {kind: sum(r.finish == kind for r in results) for kind in ("dedent", "eos", "length")},
    }
    return results, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/demo", help="model directory (default: models/demo)")
    p.add_argument("--json", metavar="PATH", help="also write the summary and every completion here")
    args = p.parse_args()

    results, summary = evaluate(args.model)
    print(f"command: {summary['command']}")
    print(f"{summary['headers']} held-out function headers from {summary['validation_files_with_headers']} files "
          f"(Python {summary['python']} stdlib); bodies ended by: {summary['finish']}")
    print(f"tokenize accepts header + completion: {summary['tokenize_ok']:.0%}")
    print(f"ast.parse accepts the dedented header + completion: {summary['ast_ok']:.0%}")
    if args.json:
        report = {**summary, "results": [asdict(r) for r in results]}
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
