"""Prefix caching: TTFT and total time with it on and off, in one run, on the same model and prompts.

    python benchmarks/prefix_cache.py --model DIR        # default: a ~51M Llama shape built in a temp dir

Two workloads of --num-prompts requests, all queued at once, greedy, --output-len tokens each (ignore_eos):
  shared  a --prefix-len token system prompt shared by every request, plus a --suffix-len unique suffix;
  random  prompts of the same total length with nothing in common (a 0% hit rate: what caching costs).
Each workload runs on two engines, caching on and off; the outputs must be identical. TTFT is the engine's own
(arrival to first token, from RequestOutput.metrics).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import SamplingParams  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402


def workloads(n: int, prefix_len: int, suffix_len: int, vocab: int, seed: int) -> dict[str, list[list[int]]]:
    rng = random.Random(seed)

    def tokens(k: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(k)]

    system = tokens(prefix_len)
    return {"shared": [system + tokens(suffix_len) for _ in range(n)],
            "random": [tokens(prefix_len + suffix_len) for _ in range(n)]}


def run(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    total = time.perf_counter() - start
    ttfts = [finals[str(i)].metrics.ttft_s for i in range(len(prompts))]
    tokens = [finals[str(i)].outputs[0].token_ids for i in range(len(prompts))]
    return {"total_s": total, "ttft_p50_s": statistics.median(ttfts), "cached": sum(
        finals[str(i)].num_cached_tokens for i in range(len(prompts))), "tokens": tokens}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="HF model directory (default: build a ~51M Llama shape)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--num-requests", type=int, dest="num_prompts", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the former name; `attnserve bench` says --num-prompts, as vLLM does
    p.add_argument("--prefix-len", type=int, default=1000)
    p.add_argument("--suffix-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from benchmarks.offline import build_llama_50m

            args.model = str(build_llama_50m(Path(tmp) / "llama", vocab_size=4096, num_hidden_layers=16))
        max_len = args.prefix_len + args.suffix_len + args.output_len
        engines = {on: LLMEngine.from_args(args.model, max_model_len=max_len, enable_prefix_caching=on)
                   for on in (True, False)}
        vocab = engines[True].vocab_size
        for engine in engines.values():  # warm-up: first-call costs stay out of the timings
            run(engine, [[11 + i for i in range(64)]], 4)
        print(f"# {platform.processor() or platform.machine()}, {args.model}, {args.num_prompts} requests, "
              f"prefix {args.prefix_len} + suffix {args.suffix_len}, output {args.output_len}")
        print(f"{'workload':8} {'caching':8} {'total (s)':>10} {'TTFT p50 (s)':>13} {'cached tokens':>14}")
        results = {}
        for name, prompts in workloads(args.num_prompts, args.prefix_len, args.suffix_len, vocab,
                                       args.seed).items():
            for on in (True, False):
                r = results[name, on] = run(engines[on], prompts, args.output_len)
                print(f"{name:8} {'on' if on else 'off':8} {r['total_s']:10.2f} {r['ttft_p50_s']:13.3f} "
                      f"{r['cached']:14d}")
            if results[name, True]["tokens"] != results[name, False]["tokens"]:
                print(f"ERROR: {name}: outputs differ with caching on and off")
                return 1
        shared_on, shared_off = results["shared", True], results["shared", False]
        print(f"shared: TTFT p50 {shared_off['ttft_p50_s'] / shared_on['ttft_p50_s']:.1f}x lower with caching, "
              f"total time {shared_off['total_s'] / shared_on['total_s']:.1f}x lower")
        cost = results["random", True]["total_s"] / results["random", False]["total_s"] - 1
        print(f"random (0% hits): caching costs {cost * 100:+.1f}% total time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
