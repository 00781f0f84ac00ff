"""The flags of `attnserve serve` (= `python -m server`), which loads a model and serves the HTTP API. The
`attnserve` command itself (attnserve/cli.py) composes this with `attnserve bench`.

Flags take vLLM's names where vLLM has one, so existing launch scripts carry over.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

from server import __version__
from server.config import (
    DEFAULT_LIMIT_CONCURRENCY,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_REQUEST_TOKENS,
    DEFAULT_MAX_RESPONSE_LOGPROBS,
    DEFAULT_MODEL_NAME,
)

# The variable the clients read their key from too, so one setting serves both ends.
API_KEY_ENV = "ATTNSERVE_API_KEY"
SERVE_HELP = "serve a model over the OpenAI-compatible HTTP API"


class Parser(argparse.ArgumentParser):
    """Bad flags end with one line on stderr (and exit status 2), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def checked(parse: Callable[[str], float], ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    """An argparse type: parse, then check; either failure names what was expected.

    NOTE: clients/bench/cli.py has its own copy of these few lines: the server never imports the clients and the
    clients speak HTTP only, so neither package can hold the one both use."""

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
_fraction = checked(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")


def _size(text: str) -> int:
    # Imported here: the engine package loads torch, which building the parser (`attnserve --help`, `attnserve
    # bench ...`) does not need.
    from engine.engine_args import parse_size
    from engine.errors import AttnServeError

    try:
        return parse_size(text)
    except AttnServeError:
        raise argparse.ArgumentTypeError(f"expected a byte count like 4MiB, 512KiB or 1000000, got {text!r}") from None


class _Unsupported(argparse.Action):
    """A vLLM flag attnserve does not have: one line that says so and why, instead of 'unrecognized arguments'.
    `accept` lists values that mean what attnserve does anyway (a parallel size of 1), which pass silently."""

    def __init__(self, option_strings, dest, reason: str, accept: tuple[str, ...] = (), **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                         **kwargs)
        self.reason, self.accept = reason, accept

    def __call__(self, parser, namespace, values, option_string=None):
        if values is not None and values in self.accept:
            return
        parser.error(f"{option_string} is a vLLM flag that attnserve does not support: {self.reason}")


# server/tool_parsers.py's names (listed here, so that building the parser imports nothing heavy).
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")

# vLLM serve flags users carry over in launch scripts: (option strings, takes a value, values that are no-ops, why).
UNSUPPORTED_VLLM_FLAGS: tuple[tuple[tuple[str, ...], bool, tuple[str, ...], str], ...] = (
    (("--trust-remote-code",), False, (),
     "attnserve never runs code from a model repository; its architectures (Llama, Mistral, Qwen2, Qwen3, GPT-2) "
     "are built in, so drop the flag"),
    (("--pipeline-parallel-size", "-pp"), True, ("1",),
     "the model is split by --tensor-parallel-size only, not into pipeline stages (1 is accepted)"),
    (("--data-parallel-size", "-dp"), True, ("1",),
     "one engine per server; run several servers behind a load balancer for replicas (1 is accepted)"),
    (("--quantization", "-q"), True, (), "weights run in --dtype (float32, float16 or bfloat16)"),
    (("--kv-cache-dtype",), True, ("auto",), "the KV cache is kept in the model's --dtype ('auto' is accepted)"),
    (("--enable-lora", "--lora-modules"), None, (), "LoRA adapters are not supported"),
    (("--tokenizer",), True, (), "the tokenizer is read from the model directory (tokenizer.json)"),
    (("--cpu-offload-gb", "--swap-space"), True, ("0",), "weights and KV cache stay on the serving device"),
    (("--ssl-keyfile", "--ssl-certfile"), True, (), "TLS is not terminated by attnserve; put a proxy in front"),
)


def _add_unsupported_vllm_flags(p: argparse.ArgumentParser) -> None:
    for names, takes_value, accept, reason in UNSUPPORTED_VLLM_FLAGS:
        nargs = 0 if takes_value is False else ("?" if takes_value is None else None)
        p.add_argument(*names, action=_Unsupported, reason=reason, accept=accept, nargs=nargs)


def _env_port(name: str) -> int | None:
    """A port from the environment (torch.distributed's MASTER_PORT convention), or None when unset or not a port."""
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() and 0 < int(value) < 65536 else None


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", nargs="?", metavar="MODEL", default=None,
                   help="the model to serve, as in `vllm serve MODEL`: the same as --model")
    model = p.add_argument_group("model")
    model.add_argument("--model", metavar="DIR|ID", default=None,
                       help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or a hub id "
                            "such as Qwen/Qwen2.5-0.5B-Instruct, found in the Hugging Face cache ($HF_HOME) or "
                            "downloaded there when the network allows. Default: the built-in demo model, a small "
                            "Python code-completion model (models/demo)")
    model.add_argument("--revision", default=None,
                       help="for a hub id: the branch, tag or commit to serve (default: main)")
    model.add_argument("--served-model-name", metavar="NAME", nargs="+", default=None,
                       help="name(s) clients use in the 'model' field; the first is reported in responses. "
                            f"Default: the --model argument, or {DEFAULT_MODEL_NAME!r}")
    model.add_argument("--chat-template", metavar="FILE|TEMPLATE", default=None,
                       help="a Jinja chat template, as a file or as the template itself, used instead of the "
                            "model's own (default: the model's, from tokenizer_config.json or chat_template.jinja)")
    model.add_argument("--dtype", default="auto",
                       help="weights and activations: auto (bfloat16 on CUDA, float32 on CPU), float32, float16, "
                            "bfloat16 (default: auto)")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    model.add_argument("--seed", type=int, default=0, help="seed for requests that set none (default: 0)")
    model.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                       help="auto/safetensors: the checkpoint's weights; dummy: random weights built from "
                            "config.json alone, for benchmarking published shapes (default: auto)")
    model.add_argument("--enforce-eager", action="store_true", default=None,
                       help="run the model eagerly: on CPU no torch.compile at start-up, on CUDA no CUDA graphs for "
                            "decode steps (default: compile and capture, unless ATTNSERVE_ENFORCE_EAGER=1)")
    model.add_argument("--speculative-config", metavar="JSON", default=None,
                       help='speculative decoding, as vLLM takes it: \'{"method": "ngram", "num_speculative_tokens": '
                            '3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}\' proposes up to 3 tokens per step '
                            "from earlier text that matches the last 4 to 2 tokens, and the model verifies them in "
                            'the same forward; \'{"model": DIR, "num_speculative_tokens": 4}\' has a smaller draft '
                            "model with the same vocabulary propose them; outputs keep their distribution "
                            "(default: off)")
    model.add_argument("--engine-watchdog-timeout", type=non_negative_float, default=None, metavar="S",
                       help="report the engine dead (/health 503, requests end with an error) when one engine step "
                            "takes longer than this, as on a hung device; 0 turns the watchdog off (default: 120 on "
                            "CUDA; off on CPU, where a long prefill of a large model can legitimately take minutes)")

    par = p.add_argument_group("tensor parallelism (docs/architecture.md)")
    par.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                     help="split the model across N ranks, one process each (one GPU each on CUDA; on CPU, each "
                          "takes an equal share of the cores): attention heads, MLP and vocabulary are sharded, and "
                          "rank 0 (this process) schedules and samples (default: 1)")
    par.add_argument("--distributed-executor-backend", choices=["mp", "external_launcher"], default="mp",
                     help="mp: this process starts its node's other ranks; external_launcher: torchrun started "
                          "every rank (RANK, WORLD_SIZE, MASTER_ADDR/PORT), rank 0 serves (default: mp)")
    par.add_argument("--nnodes", type=positive_int, default=1,
                     help="nodes the ranks span (mp); each runs tensor-parallel-size / nnodes of them (default: 1)")
    par.add_argument("--node-rank", type=int, default=0,
                     help="this node's index; node 0 serves HTTP, the others run --headless (default: 0)")
    par.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                     help="node 0's address, where rank 0 waits for the other ranks (default: $MASTER_ADDR, else "
                          "127.0.0.1)")
    par.add_argument("--master-port", type=positive_int, default=_env_port("MASTER_PORT"),
                     help="the port rank 0 listens on for the other ranks; needed with --nnodes > 1 (default: "
                          "$MASTER_PORT, else a free port, one node only)")
    par.add_argument("--headless", action="store_true",
                     help="run this node's ranks without an HTTP server (node-rank > 0 implies it)")

    tools = p.add_argument_group("tool calling")
    tools.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='let requests with tools use tool_choice "auto" (the default when tools are given): the '
                            "model decides whether to call, and --tool-call-parser reads its calls")
    tools.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                       help="how the model writes tool calls: hermes (<tool_call>{...}</tool_call>: Qwen2.5, Qwen3, "
                            "Hermes), llama3_json (Llama 3.1/3.2 JSON), mistral ([TOOL_CALLS][...])")

    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    http.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    http.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                      help=f"require 'Authorization: Bearer KEY' on every route but /health and /version "
                           f"(default: ${API_KEY_ENV}, else no key)")
    http.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                      help="browser origins allowed to call the API (CORS), e.g. https://app.example.com; "
                           "'*' allows any (default: none, CORS off)")
    http.add_argument("--max-queued-requests", type=non_negative_int, default=1024,
                      help="requests allowed to wait for a batch slot; more get 429 with Retry-After. 0 refuses "
                           "every generation request, to test how clients handle 429 (default: 1024)")
    http.add_argument("--max-request-tokens", type=positive_int, default=DEFAULT_MAX_REQUEST_TOKENS, metavar="N",
                      help="tokens one request may ask to generate (prompts x n x max_tokens); more get 400 "
                           f"(default: {DEFAULT_MAX_REQUEST_TOKENS})")
    http.add_argument("--max-response-logprobs", type=positive_int, default=DEFAULT_MAX_RESPONSE_LOGPROBS,
                      metavar="N", help="logprob entries one response may carry (tokens x (top logprobs + 1), prompt "
                                        "logprobs included, generated ones only when not streamed); more get 400 "
                                        f"(default: {DEFAULT_MAX_RESPONSE_LOGPROBS})")
    http.add_argument("--max-request-body-size", type=_size, default=DEFAULT_MAX_BODY_BYTES,
                      help="largest request body; bigger ones get 413 (default: 4MiB)")
    http.add_argument("--max-header-size", type=_size, default=DEFAULT_MAX_HEADER_BYTES,
                      help="largest request head (path and headers); bigger ones get 431 (default: 64KiB)")
    http.add_argument("--request-body-timeout", type=positive_float, default=30.0, metavar="S",
                      help="seconds a request body may take to arrive; slower ones get 408 (default: 30)")
    http.add_argument("--limit-concurrency", type=positive_int, default=DEFAULT_LIMIT_CONCURRENCY, metavar="N",
                      help="HTTP requests in flight at once; more get 503 with Retry-After. /health, /version and "
                           f"/metrics are never refused (default: {DEFAULT_LIMIT_CONCURRENCY})")
    http.add_argument("--request-head-timeout", type=positive_float, default=30.0, metavar="S",
                      help="seconds a connection may take to send a whole request head, from when it opens or its "
                           "previous response ends; slower ones are closed (default: 30)")
    http.add_argument("--max-connections", type=non_negative_int, default=0, metavar="N",
                      help="open connections at once; more are closed as they arrive. Keep it under the process's "
                           "file-descriptor limit (ulimit -n) minus ~100 for the model's files and the engine "
                           "(default: 0, no limit)")
    http.add_argument("--stream-write-timeout", type=positive_float, default=60.0, metavar="S",
                      help="seconds a client may go without reading while its response waits to be sent (the "
                           "server's send buffer full); then the connection is closed and its requests are aborted, "
                           "logged as 499 (default: 60)")
    http.add_argument("--timeout-keep-alive", type=positive_float, default=5.0, metavar="S",
                      help="seconds an idle keep-alive connection stays open (default: 5)")
    http.add_argument("--shutdown-timeout", type=non_negative_float, default=10.0,
                      help="on SIGTERM/SIGINT, seconds in-flight requests may take to finish before they are "
                           "aborted (default: 10)")

    logs = p.add_argument_group("logging")
    logs.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                      help="log verbosity (default: info)")
    logs.add_argument("--log-format", default="text", choices=["text", "json"],
                      help="text for people, json for log collectors: one JSON object per line (default: text)")
    logs.add_argument("--log-prompts", action="store_true",
                      help="include prompts in the per-request log lines (default: never logged)")
    logs.add_argument("--disable-log-requests", action="store_true",
                      help="do not log one line per finished completion request")
    logs.add_argument("--disable-log-stats", action="store_true",
                      help="do not log engine throughput and load every 10 s while busy")
    logs.add_argument("--disable-access-log", action="store_true", help="do not log one line per HTTP request")

    cache = p.add_argument_group("KV cache and batching")
    cache.add_argument("--max-model-len", type=positive_int, default=None,
                       help="longest prompt + completion in tokens (default: the model's, capped by the KV pool)")
    cache.add_argument("--max-num-seqs", type=positive_int, default=None,
                       help="sequences in one batch (default: 256, or fewer if the token budget is smaller)")
    cache.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                       help="tokens computed per engine step, prefill chunks included (default: 2048)")
    cache.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                       help="split long prompts over several steps (default: on)")
    cache.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block (default: 16)")
    cache.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse the KV blocks of prompt prefixes seen before (system prompts, chat history); "
                            "requests with a cache_salt share only with the same salt (default: on)")
    cache.add_argument("--num-kv-blocks", "--num-gpu-blocks-override", type=positive_int, default=None,
                       help="KV blocks to allocate; overrides --kv-cache-memory and --gpu-memory-utilization "
                            "(--num-gpu-blocks-override is vLLM's name)")
    cache.add_argument("--kv-cache-memory", type=_size, default=None,
                       help="KV cache size on CPU, e.g. 2GiB (default: 1GiB)")
    cache.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9,
                       help="fraction of GPU memory for weights, activations and KV cache (default: 0.9)")
    cache.add_argument("--scheduling-policy", default="fair", choices=["fair", "fcfs", "priority"],
                       help="who runs first: fair shares the running slots equally between requests, so one big "
                            "request cannot hold up the rest; fcfs in arrival order; priority by the request's "
                            "priority field, lower first, preempting lower-priority work (default: fair)")
    cache.add_argument("--attention-backend", default=None,
                       help="auto (default: triton on CUDA when installed, else sdpa), sdpa, or triton")
    _add_unsupported_vllm_flags(p)


def resolve_model_arg(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """`serve MODEL` and `serve --model MODEL` are the same; both at once must agree."""
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            parser.error(f"the model is given twice, as {args.model_tag!r} and as --model {args.model!r}; give one")
        args.model = args.model_tag
    if getattr(args, "enable_auto_tool_choice", False) and args.tool_call_parser is None:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser (one of " + ", ".join(TOOL_CALL_PARSERS) + ")")
    return args


def run_serve(args: argparse.Namespace) -> int:
    from server.serve import serve  # imports torch: keep --help fast

    return serve(args)


def parse_serve_args(argv: list[str] | None = None, prog: str = "attnserve serve") -> argparse.Namespace:
    parser = Parser(prog=prog, description=SERVE_HELP)
    add_version(parser)
    add_serve_args(parser)
    return resolve_model_arg(parser, parser.parse_args(argv))


def serve_main(argv: list[str] | None = None, prog: str = "attnserve serve") -> int:
    return run_serve(parse_serve_args(argv, prog))


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"attnserve {__version__}")
