"""Flags of `attnserve bench serve|sweep`, and the dispatch to the module that runs each.

`attnserve --help` and `attnserve serve` build this parser too, so the modules that do the work (tqdm, tokenizers,
jinja2, matplotlib) are imported only when a command runs.
The `attnserve` command (attnserve/cli.py) passes COMMANDS and `bench offline` (benchmarks/offline.py) to
add_bench_args and run_bench; `python -m clients.bench` has serve and sweep only.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

from clients.base import API_KEY_ENV, DEFAULT_BASE_URL
from clients.bench import BenchError
from clients.bench.defaults import DEFAULT_DURATION_PROMPTS, DEFAULT_INPUT_LEN, DEFAULT_NUM_PROMPTS, DEFAULT_OUTPUT_LEN

DATASET_NAMES = ("random", "sharegpt", "custom")  # vLLM's --dataset-name values that map onto --dataset
GOODPUT_KEYS = ("ttft", "tpot", "e2el")


def checked(parse: Callable[[str], float], ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: parse, then check; either failure names what was expected.

    NOTE: server/cli.py has its own copy of these few lines: the clients speak HTTP only and the server never
    imports them, so neither package can hold the one both use."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


positive_int = checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a number > 0")
non_negative_float = checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
range_ratio = checked(float, lambda v: 0 <= v < 1, "a ratio in [0, 1)")
# float("inf") parses "inf"; a rate of 0 would never send anything.
request_rate = checked(float, lambda v: v > 0, "requests per second > 0, or inf")


def _list_of(item: Callable[[str], float], expected: str) -> Callable[[str], list]:
    def convert(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not parts or any(not part for part in parts):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {expected}, got {text!r}")
        return [item(part) for part in parts]

    return convert


def goodput_slo(text: str) -> tuple[str, float]:
    """`ttft:500` -> ("ttft", 500.0): one service-level objective in milliseconds."""
    key, sep, value = text.partition(":")
    key = key.strip().lower()
    if not sep or key not in GOODPUT_KEYS:
        raise argparse.ArgumentTypeError(f"expected KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)}, got {text!r}")
    return key, positive_float(value)


def _add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help=f"the server, any OpenAI-compatible one (attnserve, vLLM, ...); traffic goes nowhere else "
                        f"(default: {DEFAULT_BASE_URL})")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"sent as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)")
    g.add_argument("--model", default=None, help="the 'model' field (default: the first id GET /v1/models lists)")
    g.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="POST /v1/completions with a prompt, or /v1/chat/completions with messages "
                        "(default: completions)")
    g.add_argument("--request-timeout", type=positive_float, default=600.0, metavar="S",
                   help="seconds one request may take from send to its last byte; later it counts as a "
                        "'timeout' failure (default: 600)")


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", "--dataset-path", default="random", metavar="random|FILE",
                   help="'random': prompts of exact token counts (--input-len, --range-ratio); or a .jsonl file "
                        "of {\"prompt\": str} or {\"messages\": [...]} records with optional \"max_tokens\" (or "
                        "vLLM's \"output_tokens\"), or a ShareGPT JSON file (first human turn = prompt, the gpt "
                        "answer's token count = max_tokens). Records are used in file order (default: random)")
    g.add_argument("--dataset-name", choices=DATASET_NAMES, default=None,
                   help="vLLM's spelling: random; or sharegpt (a ShareGPT JSON file) or custom (a JSONL file of "
                        "prompt records) with --dataset-path FILE, its format checked against the name "
                        "(default: random)")
    g.add_argument("--input-len", "--random-input-len", type=positive_int, default=None, metavar="L",
                   help=f"random dataset: prompt tokens, counted as the server counts them (/tokenize: with BOS "
                        f"for completions, the templated chat for chat) (default: {DEFAULT_INPUT_LEN}, lowered to "
                        f"fit the server's max_model_len)")
    g.add_argument("--output-len", "--random-output-len", type=positive_int, default=None, metavar="L",
                   help=f"max_tokens of every request; for a file it overrides the lengths the file gives "
                        f"(default: {DEFAULT_OUTPUT_LEN} for random, lowered to fit the server's max_model_len; "
                        f"else the file's)")
    g.add_argument("--range-ratio", "--random-range-ratio", type=range_ratio, default=0.0, metavar="R",
                   help="random dataset: lengths uniform in [floor(L*(1-r)), ceil(L*(1+r))], as in vLLM "
                        "(default: 0, exact)")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="a tokenizer.json or model directory to count tokens locally, for servers without "
                        "/tokenize and /detokenize (default: ask the server)")
    g.add_argument("--num-prompts", type=positive_int, default=None,
                   help=f"requests to send (default: {DEFAULT_NUM_PROMPTS}); with --duration, the distinct "
                        f"prompts cycled through (default: {DEFAULT_DURATION_PROMPTS})")
    g.add_argument("--seed", type=int, default=0, help="seeds the random dataset and the arrival times (default: 0)")
    g.add_argument("--temperature", type=non_negative_float, default=0.0, help="sampling temperature (default: 0)")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos so every output has exactly max_tokens tokens; a vLLM/attnserve "
                        "extension that OpenAI's API does not know (default: on)")


def _add_load_args(p: argparse.ArgumentParser, sweep: bool) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=request_rate, default=math.inf, metavar="R|inf",
                   help="mean requests per second; inf sends them all at once "
                        + ("(the fixed rate when sweeping concurrencies) " if sweep else "") + "(default: inf)")
    g.add_argument("--burstiness", type=positive_float, default=1.0,
                   help="shape of the Gamma distribution of gaps between arrivals: 1 = Poisson, < 1 burstier, "
                        "> 1 more even (default: 1)")
    g.add_argument("--max-concurrency", type=positive_int, default=None, metavar="C",
                   help="requests in flight at most; later arrivals wait for a slot "
                        + ("(the fixed limit when sweeping rates) " if sweep else "") + "(default: no limit)")
    g.add_argument("--duration", type=positive_float, default=None, metavar="S",
                   help="send requests for S seconds instead of --num-prompts, then wait for those in flight")
    g.add_argument("--warmup", type=non_negative_int, default=0, metavar="N",
                   help="requests sent first and left out of the results and server deltas (default: 0)")
    if sweep:
        g.add_argument("--request-rates", type=_list_of(request_rate, "rates or inf"), default=None,
                       metavar="R1,R2,...", help="the points to run, e.g. 1,2,4,inf")
        g.add_argument("--max-concurrencies", type=_list_of(positive_int, "positive integers"), default=None,
                       metavar="C1,C2,...", help="the points to run, e.g. 1,4,16 (both lists: every pair)")


def _add_output_args(p: argparse.ArgumentParser, sweep: bool) -> None:
    g = p.add_argument_group("results")
    g.add_argument("--goodput", type=goodput_slo, nargs="+", default=None, metavar="KEY:MS",
                   help="service-level objectives in ms, any of ttft:MS tpot:MS e2el:MS; goodput = requests/s "
                        "meeting all of them")
    g.add_argument("--out", default=None, metavar="FILE.json",
                   help="write the configuration, " + ("every point's summary and records" if sweep else
                                                       "every request's record and the summary") + " as JSON")
    g.add_argument("--save-result", action="store_true",
                   help="vLLM's spelling of --out: write the same JSON to --result-dir/--result-filename")
    g.add_argument("--result-dir", default=None, metavar="DIR",
                   help="where --save-result writes, created if missing; implies --save-result (default: .)")
    g.add_argument("--result-filename", default=None, metavar="NAME",
                   help="the file --save-result writes; implies --save-result (default: " +
                        ("{endpoint}-sweep-{model}-{YYYYMMDD-HHMMSS}.json" if sweep else
                         "{endpoint}-{rate}qps[-concurrency{C}]-{model}-{YYYYMMDD-HHMMSS}.json") +
                        ", as vLLM names it, with -2, -3, ... added rather than overwriting a file)")
    g.add_argument("--plot", default=None, metavar="FILE.png",
                   help=("throughput vs latency (TTFT p50/p99, TPOT p50/p99 against output tokens/s)" if sweep else
                         "CDFs of TTFT, ITL and E2EL, and output tokens/s over time")
                        + "; needs matplotlib (pip install 'attnserve[plot]')")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    _add_target_args(p)
    _add_workload_args(p)
    _add_load_args(p, sweep=False)
    _add_output_args(p, sweep=False)


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    _add_target_args(p)
    _add_workload_args(p)
    _add_load_args(p, sweep=True)
    _add_output_args(p, sweep=True)


class BenchCommand(NamedTuple):
    """One `attnserve bench` sub-command."""

    help: str
    description: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # imports the modules that do the work, so --help stays fast


def _run_serve(args: argparse.Namespace) -> int:
    from clients.bench.runner import run_serve

    return run_serve(args)


def _run_sweep(args: argparse.Namespace) -> int:
    from clients.bench.sweep import run_sweep

    return run_sweep(args)


COMMANDS: dict[str, BenchCommand] = {
    "serve": BenchCommand(
        "load-test a running OpenAI-compatible server and report latency and throughput",
        "Sends a workload (random prompts of exact token counts, a JSONL file or a ShareGPT file) at a given arrival "
        "rate and concurrency, streaming every response, and reports TTFT, TPOT, ITL and end-to-end latency "
        "percentiles, throughput, goodput and failures by kind.", _add_serve_args, _run_serve),
    "sweep": BenchCommand(
        "run `bench serve` at several request rates or concurrencies",
        "Runs the same workload at each point of --request-rates and/or --max-concurrencies and reports throughput "
        "against latency.", _add_sweep_args, _run_sweep),
}


def add_bench_args(p: argparse.ArgumentParser, commands: dict[str, BenchCommand] = COMMANDS) -> None:
    """Sub-commands of `attnserve bench`. Sub-parsers inherit the parent's class, so a bad flag is one line."""
    sub = p.add_subparsers(dest="bench_command", metavar="|".join(commands), required=True)
    for name, command in commands.items():
        command.add_args(sub.add_parser(name, help=command.help, description=command.description))


def run_bench(args: argparse.Namespace, commands: dict[str, BenchCommand] = COMMANDS) -> int:
    """Run the parsed sub-command; a BenchError or ^C ends it with one line, not a traceback."""
    command = args.bench_command
    try:
        return commands[command].run(args)
    except BenchError as exc:
        print(f"attnserve bench {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"attnserve bench {command}: interrupted", file=sys.stderr)
        return 130


BENCH_HELP = "load-test an OpenAI-compatible server (serve: one load; sweep: several)"


class _Parser(argparse.ArgumentParser):
    """One-line errors, for `python -m clients.bench` (`attnserve bench` uses the attnserve command's parser)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m clients.bench", description=BENCH_HELP)
    add_bench_args(parser)
    return run_bench(parser.parse_args(argv))
