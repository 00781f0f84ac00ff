"""Speculative decoding with n-gram proposals vs plain decoding, on the demo model, side by side in one process.

    python -m benchmarks.spec_decode                      # batch 1, 4 and 16; K = 6; 2 rounds
    python -m benchmarks.spec_decode --k 3 --rounds 3 --output-len 64
    python -m benchmarks.spec_decode --draft DIR --k 4   # a draft model proposes instead of prompt lookup

Two workloads:
- code editing: a standard-library source file the model has partly seen, then the same file again from its start,
  to be continued (what an editor's "rewrite this file" looks like: the answer repeats much of its context);
- random: prompts of random token ids, where prompt lookup has little to find.
Each cell runs the same prompts on two engines of the same model (one with --speculative-config, one without), in
alternating order, greedy, and reports output tokens/s, their ratio and the share of draft tokens accepted. Batch 1
runs the prompts one at a time; batch B runs B of them together.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sysconfig
import time
from pathlib import Path

SOURCES = ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "colorsys.py", "keyword.py",
           "heapq.py", "queue.py", "sched.py", "calendar.py", "netrc.py", "graphlib.py", "numbers.py", "stat.py",
           "copy.py")


def code_edit_prompts(tokenizer, count: int, budget: int) -> list[list[int]]:
    """A file's first lines, a marker, then the same file from its start again: at most `budget` tokens."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for name in SOURCES[:count]:
        text = (stdlib / name).read_text()
        seen, again = text[:900], text[:300]
        ids = tokenizer.encode(f"# {name}\n{seen}\n\n# {name}, edited\n{again}")
        prompts.append(ids[-budget:])
    return prompts


def random_prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(count)]


def timed(llm, prompts: list[list[int]], batch: int, output_len: int) -> dict:
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    before = llm.engine.stats()
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), batch):
        outputs = llm.generate(prompts[i : i + batch], params, use_tqdm=False)
        tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
    seconds = time.perf_counter() - start
    after = llm.engine.stats()
    drafts = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    return {"tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
            "acceptance": accepted / drafts if drafts else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the demo model)")
    parser.add_argument("--k", type=int, default=6, help="num_speculative_tokens")
    parser.add_argument("--draft", default=None, metavar="DIR",
                        help="propose with this draft model (same vocabulary) instead of prompt lookup")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from engine import LLM

    spec_config = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2,
                   "prompt_lookup_max": 4}
    if args.draft:
        spec_config = {"model": args.draft, "num_speculative_tokens": args.k}
    proposer = "draft" if args.draft else "ngram"
    common = dict(enforce_eager=args.enforce_eager, max_num_seqs=max(args.batch_sizes))
    plain = LLM(args.model, **common)
    spec = LLM(args.model, speculative_config=spec_config, **common)
    budget = plain.engine.info.max_model_len - args.output_len
    count = max(args.batch_sizes)
    workloads = {"code editing": code_edit_prompts(plain.get_tokenizer(), count, budget),
                 "random": random_prompts(plain.engine.info.vocab_size, count, min(budget, 256))}
    for prompts in workloads.values():  # warm-up: both engines' kernels for these shapes
        timed(plain, prompts[:2], 2, 8)
        timed(spec, prompts[:2], 2, 8)
    results = []
    for name, prompts in workloads.items():
        for batch in args.batch_sizes:
            # Batch 1 runs 4 prompts one at a time; batch B runs B prompts together.
            chosen = prompts[: max(batch, 4)] if batch == 1 else prompts[:batch]
            pairs = []
            for r in range(args.rounds):
                order = [(plain, "plain"), (spec, "spec")] if r % 2 == 0 else [(spec, "spec"), (plain, "plain")]
                run = {label: timed(llm, chosen, batch, args.output_len) for llm, label in order}
                pairs.append(run)
            ratio = statistics.median(p["spec"]["tokens_per_s"] / p["plain"]["tokens_per_s"] for p in pairs)
            row = {"workload": name, "batch": batch,
                   "plain_tok_s": statistics.median(p["plain"]["tokens_per_s"] for p in pairs),
                   "spec_tok_s": statistics.median(p["spec"]["tokens_per_s"] for p in pairs),
                   "ratio": ratio, "acceptance": pairs[-1]["spec"]["acceptance"], "pairs": pairs}
            results.append(row)
            acceptance = "-" if row["acceptance"] is None else f"{100 * row['acceptance']:.0f}%"
            print(f"{name:13s} batch {batch:3d}: plain {row['plain_tok_s']:7.1f} tok/s, {proposer} K={args.k} "
                  f"{row['spec_tok_s']:7.1f} tok/s, ratio {ratio:.2f}, drafts accepted {acceptance}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
