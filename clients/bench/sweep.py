"""`attnserve bench sweep`: the same workload at several request rates and/or concurrency limits, for a
throughput-vs-latency curve. The workload is built once and warmed up once; each point is a full `bench serve`
run (with its own /metrics deltas)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from clients.bench import BenchError, report
from clients.bench.runner import (
    RunConfig,
    RunResult,
    build_workload,
    check_duration,
    check_results_args,
    config_json,
    make_client,
    make_control_client,
    results_path,
    run_load,
    warm_up,
)


def sweep_points(args: argparse.Namespace) -> list[tuple[float, int | None]]:
    """(rate, concurrency) per point: every pair of the two lists; a missing list is the single fixed value."""
    if not args.request_rates and not args.max_concurrencies:
        raise BenchError("give the points to run: --request-rates R1,R2,... and/or --max-concurrencies C1,C2,...")
    rates = args.request_rates or [args.request_rate]
    concurrencies = args.max_concurrencies or [args.max_concurrency]
    points = [(rate, concurrency) for rate in rates for concurrency in concurrencies]
    for rate, concurrency in points:
        check_duration(args.duration, rate, concurrency)
    return points


async def _sweep(args: argparse.Namespace, cfg: RunConfig, points: list[tuple[float, int | None]]):
    async with make_control_client(cfg) as control:
        workload = await build_workload(args, control, cfg)
        print(f"Workload: {len(workload.requests)} requests for model {workload.model!r}; {len(points)} points",
              file=sys.stderr)
        if workload.note:
            print(f"Note: {workload.note}", file=sys.stderr)
        limits = [c for _, c in points]
        pool = None if None in limits else max(limits)
        results: list[RunResult] = []
        async with make_client(cfg, pool) as client:
            if cfg.warmup:
                failed = await warm_up(client, cfg, workload.model, workload.requests, cfg.max_concurrency)
                print(f"Warmup: {cfg.warmup} requests, {failed} failed", file=sys.stderr)
            for n, (rate, concurrency) in enumerate(points, 1):
                label = f"point {n}/{len(points)}"
                result = await run_load(client, control, cfg, workload.model, workload.requests, rate=rate,
                                        concurrency=concurrency, label=label)
                print(report.format_summary(result.summary, f" {label}: {report.point_label(result.summary)} "))
                results.append(result)
    return workload, results


def run_sweep(args: argparse.Namespace) -> int:
    points = sweep_points(args)
    cfg = RunConfig.from_args(args)
    check_results_args(args)
    if args.plot:
        report.require_matplotlib()
    workload, results = asyncio.run(_sweep(args, cfg, points))
    summaries = [r.summary for r in results]
    print(report.format_sweep(summaries))
    path = results_path(args, workload.model, "sweep")
    if path:
        report.write_json(path, {
            "config": config_json(args, workload),
            "points": [{"summary": r.summary, "records": [rec.to_json() for rec in r.records]} for r in results],
        })
        print(f"Results written to {path}", file=sys.stderr)
    if args.plot:
        title = report.plot_title(workload.model, workload.label,
                                  report.load_label([r for r, _ in points], [c for _, c in points]))
        report.plot_sweep(args.plot, summaries, title)
        print(f"Plot written to {args.plot}", file=sys.stderr)
    return 0 if any(s["completed"] for s in summaries) else 1
