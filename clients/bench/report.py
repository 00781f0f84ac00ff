"""What a run leaves behind: the console table (laid out like vLLM's benchmark_serving, so the two read alike),
the JSON results file, and the plots (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clients.bench import BenchError
from clients.bench.metrics import LATENCY_METRICS, METRIC_TITLES, RequestRecord

WIDTH = 50
_STAT_LABELS = (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99"), ("max", "Max"))


def _line(label: str, value: Any, digits: int = 2) -> str:
    if value is None:
        text = "n/a"
    elif isinstance(value, float):
        text = f"{value:.{digits}f}"
    else:
        text = str(value)
    return f"{label:<40} {text:<10}"


def _rule(title: str = "", fill: str = "-") -> str:
    return f"{title:{fill}^{WIDTH}}"


def format_summary(summary: dict, title: str = " Serving Benchmark Result ") -> str:
    lines = [_rule(title, "="),
             _line("Successful requests:", summary["completed"]),
             _line("Failed requests:", summary["failed"])]
    if summary.get("max_concurrency") is not None:
        lines.append(_line("Maximum request concurrency:", summary["max_concurrency"]))
    if "request_rate" in summary:
        lines.append(_line("Request rate configured (RPS):", summary["request_rate"]))
    lines += [
        _line("Benchmark duration (s):", summary["duration_s"]),
        _line("Total input tokens:", summary["total_input_tokens"]),
        _line("Total generated tokens:", summary["total_output_tokens"]),
        _line("Request throughput (req/s):", summary["request_throughput"]),
        _line("Output token throughput (tok/s):", summary["output_throughput"]),
        _line("Total token throughput (tok/s):", summary["total_token_throughput"]),
    ]
    if summary.get("goodput"):
        good = summary["goodput"]
        slos = " ".join(f"{k}:{v:g}" for k, v in good["slos_ms"].items())
        lines.append(_line(f"Request goodput (req/s) [{slos}]:", good["request_goodput"]))
    for metric in LATENCY_METRICS:
        stats = summary[f"{metric}_ms"]
        lines.append(_rule(METRIC_TITLES[metric]))
        name = metric.upper()
        lines += [_line(f"{label} {name} (ms):", stats[key]) for key, label in _STAT_LABELS]
    server = summary.get("server")
    if server:
        lines.append(_rule("Server-side (/metrics deltas)"))
        lines.append(_line("Server TTFT p50 (ms):", server["ttft_p50_ms"])
                     + f" client p50: {_fmt(summary['ttft_ms']['median'])}")
        lines.append(_line("Server prompt tokens:", server["prompt_tokens"])
                     + f" client: {summary['total_input_tokens']}")
        lines.append(_line("Server generated tokens:", server["generation_tokens"])
                     + f" client: {summary['total_output_tokens']}")
    if summary["failures"]:
        lines.append(_rule("Failures"))
        lines += [_line(f"{kind}:", count) for kind, count in summary["failures"].items()]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def format_sweep(points: Sequence[dict]) -> str:
    """One row per point: the load, throughput, and the latencies a capacity plan is read from."""
    header = (f"{'rate':>6} {'conc':>5} {'ok':>5} {'fail':>5} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} "
              f"{'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'ITL p50':>8} {'E2EL p50':>9}")
    rows = [header, "-" * len(header)]
    for s in points:
        conc = "-" if s["max_concurrency"] is None else str(s["max_concurrency"])
        rate = s["request_rate"] if isinstance(s["request_rate"], str) else f"{s['request_rate']:g}"
        rows.append(f"{rate:>6} {conc:>5} {s['completed']:>5} {s['failed']:>5} {s['request_throughput']:>7.2f} "
                    f"{s['output_throughput']:>10.1f} {_fmt(s['ttft_ms']['median']):>9} {_fmt(s['ttft_ms']['p99']):>9} "
                    f"{_fmt(s['tpot_ms']['median']):>9} {_fmt(s['tpot_ms']['p99']):>9} "
                    f"{_fmt(s['itl_ms']['median']):>8} {_fmt(s['e2el_ms']['median']):>9}")
    return "\n".join(rows) + "\n(latencies in ms)"


def write_json(path: str | Path, data: dict) -> None:
    # allow_nan=False: a NaN or infinity must never reach the file, since strict JSON readers reject it.
    Path(path).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib, which is not installed: pip install matplotlib "
                         "(or the attnserve[plot] extra)")


def _figure(rows: int, cols: int, size: tuple[float, float]):
    """A Figure with its own Agg canvas: no pyplot, so no global state and no display needed."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _cdf(ax, values: Sequence[float], title: str) -> None:
    ordered = sorted(values)
    if ordered:
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], drawstyle="steps-post")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of samples")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)


def token_rate_series(records: Sequence[RequestRecord], duration_s: float,
                      bins: int | None = None) -> tuple[list[float], list[float]]:
    """Output tokens/s over the run: (bin centres in s, rate). A request's usage-reported tokens are spread evenly
    over its content chunks (a chunk may carry several tokens), each chunk at its arrival time."""
    bins = bins or max(10, min(100, int(duration_s)))
    width = duration_s / bins if duration_s > 0 else 1.0
    counts = [0.0] * bins
    for r in records:
        if not r.success or r.ttft_ms is None or not r.output_len:
            continue
        times, t = [r.start_s + r.ttft_ms / 1000], r.start_s + r.ttft_ms / 1000
        for gap in r.itl_ms:
            t += gap / 1000
            times.append(t)
        share = r.output_len / len(times)
        for t in times:
            counts[min(bins - 1, max(0, int(t / width)))] += share
    return [(i + 0.5) * width for i in range(bins)], [c / width for c in counts]


def load_label(rates: Sequence[float], concurrencies: Sequence[int | None]) -> str:
    """The load of a run, "rate inf, concurrency 8", or of a sweep's points, "rate 1, 2, inf req/s, concurrency 8"."""
    rates, concurrencies = list(dict.fromkeys(rates)), list(dict.fromkeys(concurrencies))
    unit = " req/s" if any(math.isfinite(r) for r in rates) else ""
    rate_text = ", ".join("inf" if math.isinf(r) else f"{r:g}" for r in rates)
    concurrency_text = ", ".join("unlimited" if c is None else str(c) for c in concurrencies)
    return f"rate {rate_text}{unit}, concurrency {concurrency_text}"


def plot_title(model: str, workload: str, load: str) -> str:
    """What a plot shows, so a PNG read on its own says it: "demo · random 256→64 tok · rate inf, concurrency 8"."""
    return " · ".join((model, workload, load))


def run_figure(records: Sequence[RequestRecord], duration_s: float, title: str):
    fig, axes = _figure(2, 2, (11, 8))
    ok = [r for r in records if r.success]
    _cdf(axes[0][0], [r.ttft_ms for r in ok if r.ttft_ms is not None], "TTFT CDF")
    _cdf(axes[0][1], [gap for r in ok for gap in r.itl_ms], "ITL CDF")
    _cdf(axes[1][0], [r.e2el_ms for r in ok if r.e2el_ms is not None], "E2E latency CDF")
    centres, rates = token_rate_series(records, duration_s)
    ax = axes[1][1]
    ax.plot(centres, rates)
    ax.set_title("Output tokens/s over time")
    ax.set_xlabel("s since start")
    ax.set_ylabel("tokens/s")
    ax.grid(True, alpha=0.3)
    fig.suptitle(f"{title}\n{len(ok)} of {len(records)} requests succeeded in {duration_s:.1f} s")
    return fig


def plot_run(path: str | Path, records: Sequence[RequestRecord], duration_s: float, title: str) -> None:
    run_figure(records, duration_s, title).savefig(path, dpi=100)


def _label_points(ax, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str]) -> None:
    """Label each point on the side that faces the middle of the axes, so no label crosses the frame (the
    fastest point, often the rate-inf one, sits at the right edge and often at the top)."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()  # reading the limits autoscales to the lines drawn
    for x, y, label in zip(xs, ys, labels):
        right, top = x > (x0 + x1) / 2, y > (y0 + y1) / 2
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(-4 if right else 4, -4 if top else 4),
                    ha="right" if right else "left", va="top" if top else "bottom", fontsize=8)


def sweep_figure(points: Sequence[dict], title: str):
    fig, axes = _figure(1, 2, (12, 5))
    points = sorted(points, key=lambda p: p["output_throughput"])  # a curve along the throughput axis
    x = [p["output_throughput"] for p in points]
    # Point labels name what varies between the points; the title names what is fixed.
    varies = [len({p[key] for p in points}) > 1 for key in ("request_rate", "max_concurrency")]
    labels = [point_label(p, *(varies if any(varies) else (True, True))) for p in points]
    for ax, metric, name in ((axes[0][0], "ttft", "TTFT"), (axes[0][1], "tpot", "TPOT")):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            y = [p[f"{metric}_ms"][stat] for p in points]
            pairs = [(a, b) for a, b in zip(x, y) if b is not None and math.isfinite(b)]
            if pairs:
                ax.plot(*zip(*pairs), style, label=f"{name} {'p50' if stat == 'median' else stat}")
        labelled = [(xi, p[f"{metric}_ms"]["median"], label) for xi, p, label in zip(x, points, labels)
                    if p[f"{metric}_ms"]["median"] is not None]
        if labelled:
            _label_points(ax, *zip(*labelled))
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("ms")
        ax.set_title(f"{name} vs throughput")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return fig


def plot_sweep(path: str | Path, points: Sequence[dict], title: str) -> None:
    sweep_figure(points, title).savefig(path, dpi=100)


def point_label(summary: dict, rate: bool = True, concurrency: bool = True) -> str:
    """One sweep point, "inf req/s, c=8", or only the part asked for (the plot names what varies)."""
    parts = []
    if rate:
        value = summary["request_rate"]
        parts.append(f"{value if isinstance(value, str) else format(value, 'g')} req/s")
    if concurrency and summary["max_concurrency"] is not None:
        parts.append(f"c={summary['max_concurrency']}")
    return ", ".join(parts)
