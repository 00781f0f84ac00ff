"""GPU suite: kernel correctness at real shapes, decode attention timing, end-to-end decode step time, in one run.

    python benchmarks/gpu_suite.py --out gpu.json          # everything on the GPU, a few minutes on an H200
    python benchmarks/gpu_suite.py --parts correctness     # just the checks
    python benchmarks/gpu_suite.py --smoke                 # tiny shapes, on the CPU in seconds
    TRITON_INTERPRET=1 python benchmarks/gpu_suite.py --smoke --parts correctness   # + Triton, interpreted

Parts (benchmarks/gpusuite/): correctness (Triton kernels and TritonBackend vs the torch references and the
SDPA backend), attention (paged decode kernel vs the SDPA gather path: us per call, GB/s of K/V read, % of
the copy bandwidth), decode (LLMEngine step time for batch 1-256 at context 1k with --load-format dummy, and
its roofline %). The shapes are those of benchmarks/configs (Qwen3-0.6B, Llama-3-8B). What this process
cannot run (Triton off CUDA without the interpreter) is skipped and named in the output.

The run stays inside --time-budget: once it is spent, the remaining points are skipped (and say so). --out gets
the JSON of every number after each part, so a run cut short still leaves what it measured.
Exit status: 1 if a correctness check failed, else 2 if a part raised, else 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

_BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCHMARKS.parent))  # engine, kernels
sys.path.insert(0, str(_BENCHMARKS))  # gpusuite
sys.path.append(str(_BENCHMARKS.parent / "tests"))  # kernel_oracles: the references the kernels are checked against

import torch  # noqa: E402

from gpusuite import attention, correctness, decode  # noqa: E402
from gpusuite.env import Env, detect_env  # noqa: E402
from gpusuite.report import format_table  # noqa: E402
from gpusuite.shapes import attention_shapes, model_dirs  # noqa: E402
from gpusuite.timing import Deadline, Timer, copy_bandwidth  # noqa: E402

PARTS = ("correctness", "attention", "decode")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few repeats (runs on a CPU)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--out", type=Path, help="write every number as JSON here")
    p.add_argument("--time-budget", type=float, default=480.0,
                   help="seconds; points not started by then are skipped (default: 480)")
    p.add_argument("--decode-backends", default="auto,sdpa",
                   help="attention backends of the decode part, comma-separated (default: auto,sdpa)")
    p.add_argument("--enforce-eager", action="store_true", help="decode part: no CUDA graphs")
    p.add_argument("--inject-failure", action="store_true",
                   help="perturb the first correctness reference: the run must then report FAIL and exit 1")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    args.decode_backends = [x.strip() for x in args.decode_backends.split(",") if x.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Line by line, so a run cut off by its caller's time limit still shows how far it got.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    logging.basicConfig(level=logging.WARNING, format="  [%(name)s] %(levelname)s %(message)s")
    logging.getLogger("engine.model_runner").setLevel(logging.INFO)  # which attention backend the engine took
    started = time.monotonic()
    deadline = Deadline(args.time_budget)
    env = detect_env()
    report = {"env": env.describe(), "args": {k: str(v) for k, v in vars(args).items()}, "parts": {}}
    print(f"device {env.device_name} ({env.device}); torch {torch.__version__}; triton {env.triton_version} "
          f"({env.triton_mode}); {'smoke shapes' if args.smoke else 'published shapes'}")

    timer = _timer(env, args.smoke)
    needs_bandwidth = {"attention", "decode"} & set(args.parts)
    copy_bw = copy_bandwidth(timer, (32 << 20) if args.smoke else (1 << 30)) if needs_bandwidth else 0.0
    if needs_bandwidth:
        report["copy_bandwidth_gb_per_s"] = copy_bw / 1e9
        print(f"device copy bandwidth (read + write of one large copy): {copy_bw / 1e9:.0f} GB/s")

    failed = errored = False
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as scratch:
        for part in args.parts:
            print(f"\n[{time.monotonic() - started:.0f} s] {part} ...")
            try:
                part_failed, part_errored = _run_part(part, args, env, timer, copy_bw, deadline, Path(scratch),
                                                      report)
            except Exception as exc:  # noqa: BLE001 - a broken part is reported, the others still run
                traceback.print_exc()
                report["parts"][part] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"\n## {part}: ERROR {type(exc).__name__}: {exc}")
                part_failed, part_errored = False, True
            failed |= part_failed
            errored |= part_errored
            gc.collect()
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
            _write(args.out, report)

    report["seconds"] = time.monotonic() - started
    _write(args.out, report)
    verdict = "FAIL: a correctness check failed" if failed else ("ERROR: a part raised" if errored else "OK")
    print(f"\n{verdict} ({report['seconds']:.0f} s)")
    return 1 if failed else (2 if errored else 0)


def _run_part(part: str, args: argparse.Namespace, env: Env, timer: Timer, copy_bw: float, deadline: Deadline,
              scratch: Path, report: dict) -> tuple[bool, bool]:
    """Run one part, print its table, store its JSON; (a check failed, something raised)."""
    if part == "correctness":
        run = correctness.CorrectnessRun(env, correctness.SMOKE if args.smoke else correctness.FULL,
                                         args.inject_failure)
        run.run(attention_shapes(args.smoke))
        title = "Correctness: Triton kernels and backend vs torch references and SDPA (bf16, block 16)"
        print(format_table(title, correctness.TABLE_COLUMNS, run.table_rows(), run.notes))
        report["parts"][part] = run.as_json()
        return not run.passed, False
    if part == "attention":
        run = attention.AttentionRun(env, timer, copy_bw, deadline, args.smoke)
        run.run(attention_shapes(args.smoke))
        title = "Decode attention per layer call (bf16, block 16): Triton kernel vs SDPA gather path"
        print(format_table(title, attention.TABLE_COLUMNS, run.table_rows(), run.notes + run.errors))
        report["parts"][part] = run.as_json()
        return False, bool(run.errors)
    run = decode.DecodeRun(env, decode.SMOKE if args.smoke else decode.FULL, copy_bw, deadline,
                           args.decode_backends, args.enforce_eager)
    run.run(model_dirs(args.smoke, scratch))
    context = (decode.SMOKE if args.smoke else decode.FULL).context
    title = (f"End-to-end decode step, --load-format dummy, context {context} "
             "(roofline: weights + KV bytes / copy bandwidth)")
    print(format_table(title, decode.TABLE_COLUMNS, run.table_rows(), run.notes + run.errors))
    report["parts"][part] = run.as_json()
    return False, bool(run.errors)


def _timer(env: Env, smoke: bool) -> Timer:
    if smoke:
        return Timer(env.device, max_reps=5, warmup=1, target_s=0.05)
    return Timer(env.device, max_reps=50, warmup=5, target_s=0.25)


def _write(path: Path | None, report: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
