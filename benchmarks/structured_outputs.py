"""What structured outputs cost attnserve: output tokens/s with half of the requests constrained by a JSON schema vs
none, in alternating rounds on the same engine; and how long compiling the constraints of benchmarks/grammar_cases.py
takes through the engine's GrammarCompiler (p50 and p99 over fresh compilers, so no cache helps).

    python -m benchmarks.structured_outputs                     # 64 requests, 128 output tokens, 3 round pairs
    python -m benchmarks.structured_outputs --rounds 5 --enforce-eager

The model is the ~28M Llama shape of docs/benchmarks.md (benchmarks/offline.py, vocab 4096 with a real byte-level
BPE, so masks are over real tokens). Prompts are random token ids, drawn afresh each round (the prefix cache would
otherwise skip later rounds' prefills); generation is greedy with ignore_eos, max_tokens --output-len, and the schema
cannot be complete sooner, so every request generates exactly that many tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.grammar_cases import cases
from benchmarks.offline import build_llama_50m, make_workload, redraw

# Records until max_tokens: at least 1,000 of them, so that no output can be complete (and end) before max_tokens and
# both halves of a comparison generate the same number of tokens (otherwise a batch that empties sooner runs slower).
RECORDS = {
    "type": "object",
    "properties": {"records": {"type": "array", "minItems": 1000, "items": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                       "name": {"type": "string", "maxLength": 12},
                       "level": {"enum": ["low", "medium", "high"]}},
        "required": ["id", "name", "level"], "additionalProperties": False}}},
    "required": ["records"], "additionalProperties": False,
}


def structured_params(case) -> dict:
    kind = {"json": "json", "regex": "regex", "choice": "choice", "lark": "grammar"}[case.kind]
    return {kind: case.spec}


def compile_times(llm, reps: int) -> dict[str, list[float]]:
    """Seconds per compile of each case, each time on a fresh GrammarCompiler (whose LLTokenizer is built first)."""
    from engine.sampling_params import StructuredOutputsParams
    from engine.structured_output import GrammarCompiler

    info = llm.engine.info
    times: dict[str, list[float]] = {}
    for _ in range(reps):
        compiler = GrammarCompiler(info.tokenizer, info.vocab_size, info.tokenizer.eos_token_ids)
        compiler.compile(StructuredOutputsParams(regex="warm"))  # the tokenizer, built once per compiler
        for case in cases():
            spec = StructuredOutputsParams(**structured_params(case))
            start = time.perf_counter()
            compiler.compile(spec)
            times.setdefault(case.name, []).append(time.perf_counter() - start)
    return times


def run_round(llm, prompts, output_len: int, constrained_share: float) -> dict:
    from engine import SamplingParams
    from engine.sampling_params import StructuredOutputsParams

    free = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    schema = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(json=RECORDS))
    every = round(1 / constrained_share) if constrained_share else 0
    params = [schema if every and i % every == 0 else free for i in range(len(prompts))]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert tokens == output_len * len(prompts), "an output ended before max_tokens"
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "constrained": sum(p is schema for p in params)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="round pairs (none, then half constrained)")
    parser.add_argument("--compile-reps", type=int, default=20)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from engine import LLM

    with tempfile.TemporaryDirectory() as tmp:
        model = build_llama_50m(Path(tmp) / "llama", vocab_size=4096)
        llm = LLM(str(model), max_model_len=512, enforce_eager=args.enforce_eager)
        vocab = llm.engine.info.vocab_size
        prompts, _ = make_workload(args.num_prompts, (32, 256), (1, 1), vocab, seed=0)
        run_round(llm, redraw(prompts, vocab, -1)[:8], 16, 0.5)  # warm-up (compiles, caches the schema)
        pairs = []
        for r in range(args.rounds):
            round_prompts = redraw(prompts, vocab, r)
            none = run_round(llm, round_prompts, args.output_len, 0.0)
            half = run_round(llm, redraw(prompts, vocab, 1000 + r), args.output_len, 0.5)
            pairs.append((none, half))
            print(f"round {r + 1}: none {none['tokens_per_s']:.1f} tok/s, half constrained "
                  f"{half['tokens_per_s']:.1f} tok/s ({half['tokens']} tokens), "
                  f"ratio {half['tokens_per_s'] / none['tokens_per_s']:.3f}", flush=True)
        times = compile_times(llm, args.compile_reps)

    ratios = [half["tokens_per_s"] / none["tokens_per_s"] for none, half in pairs]
    print(f"median ratio (half constrained / none): {statistics.median(ratios):.3f}")
    all_times = sorted(t for ts in times.values() for t in ts)
    print(f"compile over {len(times)} cases x {args.compile_reps}: p50 {_ms(all_times, 0.5)} ms, "
          f"p99 {_ms(all_times, 0.99)} ms")
    for name, ts in times.items():
        print(f"  {name:22s} p50 {_ms(sorted(ts), 0.5):>7} ms  p99 {_ms(sorted(ts), 0.99):>7} ms")
    if args.out:
        args.out.write_text(json.dumps({"pairs": pairs, "ratios": ratios, "compile_s": times}, indent=1))
    return 0


def _ms(sorted_times: list[float], q: float) -> str:
    return f"{sorted_times[min(len(sorted_times) - 1, int(q * len(sorted_times)))] * 1000:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
