"""vLLM's side of `attnserve bench offline --compare vllm`: runs inside the peer's own venv (`make bench-peer`).

    .bench/vllm/bin/python benchmarks/vllm_offline.py --model DIR --warm-up W.json --max-model-len N

A workload file holds {"prompts": [[token ids], ...], "output_lens": [n, ...]}: the same requests attnserve runs.
Generation is greedy with ignore_eos, so vLLM produces exactly the requested tokens. A scoring workload
(benchmarks/scoring.py) also has "prompt_logprobs": K: each prompt is scored (vLLM needs max_tokens >= 1, so it also
samples one token), and the result gives prompt tokens/s and each prompt's summed logprob, for the caller to check.
It loads the model, runs the warm-up workload (as on our side), prints `@@READY {"ready_s": ..}`, then runs the
workload named by each `run PATH` line on stdin, printing `@@RESULT {..}` after each, until stdin closes. So the
caller can alternate runs of both engines, each idle while the other runs, on a machine whose speed drifts. vLLM
prints its own lines on stdout too; the markers tell ours apart. It imports nothing of attnserve: only vLLM and the
standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--warm-up", required=True, help="a workload file run once before @@READY")
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--memory-share", type=float, default=0.25)
    args = p.parse_args()
    from vllm import LLM, SamplingParams

    def load(path: str):
        work = json.loads(open(path).read())
        prompts = [{"prompt_token_ids": ids} for ids in work["prompts"]]
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                                 prompt_logprobs=work.get("prompt_logprobs")) for n in work["output_lens"]]
        return prompts, params

    start = time.perf_counter()
    # On CPU, gpu_memory_utilization is the share of host memory vLLM reserves for its KV cache, and it refuses to
    # start unless that much is free (0.92 by default). The calling benchmark holds attnserve's engine and may hold
    # another vLLM (its other thread setting), so each asks for a quarter: still far more KV cache than these
    # workloads fill.
    llm = LLM(model=args.model, dtype="float32", max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              seed=0, gpu_memory_utilization=args.memory_share)
    ready_s = time.perf_counter() - start
    llm.generate(*load(args.warm_up), use_tqdm=False)
    print("@@READY " + json.dumps({"ready_s": ready_s, "vllm": __import__("vllm").__version__}), flush=True)
    for line in sys.stdin:
        command, _, path = line.strip().partition(" ")
        if command != "run":
            continue
        prompts, params = load(path)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        requested = sum(p.max_tokens for p in params)
        if generated != requested:
            raise SystemExit(f"vLLM produced {generated} tokens, {requested} were requested")
        result = {"seconds": elapsed, "output_tokens": generated, "tokens_per_s": generated / elapsed}
        if params[0].prompt_logprobs is not None:
            prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
            result.update(prompt_tokens_per_s=prompt_tokens / elapsed, prompt_logprob_sums=[
                sum(entry[ids].logprob for entry, ids in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:]))
                for o in outs])
        print("@@RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
