"""Flags of `attnserve bench serve|sweep|offline`, and the dispatch to the module that runs each.

Only argparse, os and sys are imported here: `attnserve --help` and `attnserve serve` build this parser too, so
the modules that do the work (httpx, tqdm, tokenizers, the engine, matplotlib) are imported when a command runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

from clients.base import API_KEY_ENV, DEFAULT_BASE_URL

DEFAULT_NUM_PROMPTS = 1000  # vLLM's default, so results compare
DEFAULT_DURATION_PROMPTS = 100  # distinct prompts cycled through when --duration is given
# vLLM's random-dataset defaults, lowered when the server's max_model_len is smaller (datasets.fit_lengths).
DEFAULT_INPUT_LEN = 1024
DEFAULT_OUTPUT_LEN = 128
DATASET_NAMES = ("random", "sharegpt", "custom")  # vLLM's --dataset-name values that map onto --dataset
# `bench offline`: 64 prompts, input and output lengths uniform in [32, 256] (the recorded results' workload, see
# docs/benchmarks.md): floor(144 * 0.225) = 32 and ceil(144 * 1.775) = 256.
OFFLINE_NUM_PROMPTS = 64
OFFLINE_LEN = 144
OFFLINE_RANGE_RATIO = 0.775
GOODPUT_KEYS = ("ttft", "tpot", "e2el")


def checked(parse: Callable[[str], float], ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: parse, then check; either failure names what was expected (server/cli.py uses it too)."""

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


def _add_offline_args(p: argparse.ArgumentParser) -> None:
    # The workload flags are those of `bench serve` (the former benchmarks/offline_throughput.py's --num-requests
    # and --json are still accepted, unlisted).
    p.add_argument("--model", default=None, metavar="DIR",
                   help="HF model directory (default: build a random ~56M-parameter Llama in a temp dir)")
    p.add_argument("--num-prompts", type=positive_int, default=OFFLINE_NUM_PROMPTS,
                   help=f"requests (default: {OFFLINE_NUM_PROMPTS})")
    p.add_argument("--num-requests", type=positive_int, dest="num_prompts", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    p.add_argument("--input-len", type=positive_int, default=OFFLINE_LEN, metavar="L",
                   help=f"prompt tokens (random ids) (default: {OFFLINE_LEN})")
    p.add_argument("--output-len", type=positive_int, default=OFFLINE_LEN, metavar="L",
                   help=f"output tokens (default: {OFFLINE_LEN})")
    p.add_argument("--range-ratio", type=range_ratio, default=OFFLINE_RANGE_RATIO, metavar="R",
                   help=f"lengths uniform in [floor(L*(1-r)), ceil(L*(1+r))], as in `bench serve` (default: "
                        f"{OFFLINE_RANGE_RATIO}, so the default lengths are uniform in [32, 256])")
    p.add_argument("--hf-batch-size", type=positive_int, nargs="+", default=[1, 16],
                   help="transformers batch sizes to measure (1 = generate per prompt) (default: 1 16)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="(default: 256)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=None)
    p.add_argument("--device", default="cpu", help="(default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--skip-hf", action="store_true",
                   help="only measure attnserve (also implied when transformers is not installed)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the results here")
    p.add_argument("--json", dest="out", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


_SUBCOMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "serve": ("load-test a running OpenAI-compatible server and report latency and throughput",
              "Sends a workload (random prompts of exact token counts, a JSONL file or a ShareGPT file) at a "
              "given arrival rate and concurrency, streaming every response, and reports TTFT, TPOT, ITL and "
              "end-to-end latency percentiles, throughput, goodput and failures by kind.", _add_serve_args),
    "sweep": ("run `bench serve` at several request rates or concurrencies",
              "Runs the same workload at each point of --request-rates and/or --max-concurrencies and reports "
              "throughput against latency.", _add_sweep_args),
    "offline": ("offline output tokens/s of the engine in-process, vs transformers' generate",
                "Random prompts (token ids) and output lengths, greedy with ignore_eos; throughput = requested "
                "output tokens / wall time. transformers is measured per --hf-batch-size (batch 1 = generate "
                "per prompt; larger batches are left-padded and generate their longest output).", _add_offline_args),
}


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """Sub-commands of `attnserve bench`. Sub-parsers inherit the parent's class, so a bad flag is one line."""
    sub = p.add_subparsers(dest="bench_command", metavar="serve|sweep|offline")
    sub.required = True
    for name, (help_text, description, add_args) in _SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=description))


def run_bench(args: argparse.Namespace) -> int:
    command = args.bench_command
    from clients.bench import BenchError

    try:
        if command == "serve":
            from clients.bench.runner import run_serve

            return run_serve(args)
        if command == "sweep":
            from clients.bench.sweep import run_sweep

            return run_sweep(args)
        from clients.bench.offline import run_offline

        return run_offline(args)
    except BenchError as exc:
        print(f"attnserve bench {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"attnserve bench {command}: interrupted", file=sys.stderr)
        return 130


BENCH_HELP = "benchmarks: load-test a server (serve, sweep) or the engine in-process (offline)"


class _Parser(argparse.ArgumentParser):
    """One-line errors, for `python -m clients.bench` (`attnserve bench` uses the server CLI's parser class)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m clients.bench", description=BENCH_HELP)
    add_bench_args(parser)
    return run_bench(parser.parse_args(argv))
