"""The `attnserve` command: `attnserve serve` (server/cli.py) and `attnserve bench serve|sweep` (clients/bench/cli.py)
with `bench offline` (benchmarks/offline.py). Each package defines its own flags and runners; only this module
imports them all, so the layers below stay one-way (server -> engine -> kernels; the clients speak HTTP only).
Nothing heavy is imported until a command runs: building the parser (`attnserve --help`) loads no torch.
"""

from __future__ import annotations

import argparse
import sys

from clients.bench import cli as bench_cli
from server import cli as serve_cli

BENCH_HELP = "benchmarks: load-test a server (serve, sweep) or the engine in-process (offline)"


def _source_only(_: argparse.Namespace | None = None) -> int:
    print("attnserve bench offline: error: the in-process benchmark is part of the source tree "
          "(benchmarks/offline.py), not of the installed package: run `python -m attnserve bench offline ...` from "
          "the root of a clone of the repository", file=sys.stderr)
    return 2


def _offline_command() -> bench_cli.BenchCommand:
    # NOTE: benchmarks/ (and the tools/ it builds its model with) are not installed: generic top-level names like
    # those do not belong in site-packages. From a clone they import, since `python -m` puts the clone on sys.path.
    try:
        from benchmarks import offline
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", "tools"):
            raise
        return bench_cli.BenchCommand("offline output tokens/s of the engine in-process (from a source checkout)",
                                      "Needs a clone of the repository: benchmarks/offline.py.",
                                      lambda p: None, _source_only)
    return offline.COMMAND


BENCH_COMMANDS: dict[str, bench_cli.BenchCommand] = {**bench_cli.COMMANDS, "offline": _offline_command()}


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `attnserve` parser, and its `serve` sub-parser (resolve_model_arg reports through it)."""
    parser = serve_cli.Parser(prog="attnserve", description="attnserve: an inference server for decoder-only LLMs.")
    serve_cli.add_version(parser)
    # Sub-parsers get the one-line errors of serve_cli.Parser, and bench's own sub-commands inherit them in turn.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=serve_cli.Parser, required=True)
    serve = sub.add_parser("serve", help=serve_cli.SERVE_HELP, description=serve_cli.SERVE_HELP)
    serve_cli.add_serve_args(serve)
    serve_cli.add_version(serve)
    bench_cli.add_bench_args(sub.add_parser("bench", help=BENCH_HELP, description=BENCH_HELP), BENCH_COMMANDS)
    return parser, serve


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "offline"] and BENCH_COMMANDS["offline"].run is _source_only:
        return _source_only()  # before parsing: its flags are unknown without the module that defines them
    parser, serve = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_cli.run_serve(serve_cli.resolve_model_arg(serve, args))
    return bench_cli.run_bench(args, BENCH_COMMANDS)
