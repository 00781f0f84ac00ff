"""vLLM's side of `attnserve bench offline --compare vllm`: runs inside the peer's own venv (`make bench-peer`).

    .bench/vllm/bin/python benchmarks/vllm_offline.py --model DIR --workload W.json --max-model-len N --out R.json

W.json holds {"prompts": [[token ids], ...], "output_lens": [n, ...]}: the same requests attnserve ran. Generation is
greedy with ignore_eos, so vLLM produces exactly the requested tokens; one warm-up of two requests first, as on our
side. The result goes to R.json (vLLM prints its own lines on stdout). It imports nothing of attnserve: only vLLM and the standard library.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from vllm import LLM, SamplingParams

    work = json.loads(open(args.workload).read())
    prompts = [{"prompt_token_ids": ids} for ids in work["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in work["output_lens"]]
    start = time.perf_counter()
    # On CPU, gpu_memory_utilization is the share of host memory vLLM reserves, and it refuses to start unless that
    # much is free (0.92 by default). The calling benchmark still holds attnserve's compiled engine, so ask for half:
    # still far more KV cache than these workloads fill.
    llm = LLM(model=args.model, dtype="float32", max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              seed=0, gpu_memory_utilization=0.5)
    ready_s = time.perf_counter() - start
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    if generated != sum(work["output_lens"]):
        raise SystemExit(f"vLLM produced {generated} tokens, {sum(work['output_lens'])} were requested")
    with open(args.out, "w") as f:
        json.dump({"seconds": elapsed, "output_tokens": generated, "tokens_per_s": generated / elapsed,
                   "ready_s": ready_s, "vllm": __import__("vllm").__version__}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
