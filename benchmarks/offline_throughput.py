"""Offline throughput: attnserve vs transformers' generate, same model, same prompts, same run.

    python benchmarks/offline_throughput.py                 # CPU default: 64 requests, a ~50M Llama-shape model
    python benchmarks/offline_throughput.py --num-requests 256 --input-len 100 1024 --output-len 100 1024  # standard shape

Each request has a random prompt (token ids) and a random output length, both uniform in the given
ranges; generation is greedy with ignore_eos, so both engines produce exactly the requested number of
tokens. Throughput = requested output tokens / wall time.

transformers is measured once per --hf-batch-size: batch 1 is generate run per prompt; a larger batch
is left-padded and generates its longest requested output, which is how HF generate serves a mixed
workload; only the requested tokens count towards its throughput. Needs the test extra
(transformers) for the reference and for building the random model.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams  # noqa: E402


def build_llama_50m(out_dir: Path, vocab_size: int = 32000) -> Path:
    """A random-weight Llama-shape checkpoint of ~56M parameters (8 layers, hidden 512, GQA 8/4, untied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.default_model import build_bpe_tokenizer, write_tokenizer_files

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(out_dir, safe_serialization=True)
    write_tokenizer_files(build_bpe_tokenizer(), out_dir)
    return out_dir


def make_workload(n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(*input_len))] for _ in range(n)]
    outputs = [rng.randint(*output_len) for _ in range(n)]
    return prompts, outputs


def run_attnserve(model_dir: Path, prompts, out_lens, args) -> dict:
    llm = LLM(str(model_dir), max_model_len=args.input_len[1] + args.output_len[1], device=args.device,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(r.outputs[0].token_ids) for r in results)
    assert generated == sum(out_lens), "attnserve produced a different number of tokens than requested"
    return {"seconds": elapsed, "output_tokens": generated, "tokens_per_s": generated / elapsed}


@torch.inference_mode()
def run_transformers(model_dir: Path, prompts, out_lens, batch_size: int, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    pad = 2
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, lens = prompts[i : i + batch_size], out_lens[i : i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        new = max(lens)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=pad, eos_token_id=None)
    elapsed = time.perf_counter() - start
    useful = sum(out_lens)
    return {"batch_size": batch_size, "seconds": elapsed, "output_tokens": useful, "tokens_per_s": useful / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="HF model directory (default: build a random ~50M Llama)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    p.add_argument("--hf-batch-size", type=int, nargs="+", default=[1, 16],
                   help="transformers batch sizes to measure (1 = generate per prompt)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true", help="only measure attnserve")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_llama_50m(Path(tmp) / "llama-50m")
        from engine.config import ModelConfig

        vocab = ModelConfig.from_dir(model_dir).vocab_size
        prompts, out_lens = make_workload(args.num_requests, tuple(args.input_len), tuple(args.output_len), vocab,
                                          args.seed)
        ours = run_attnserve(model_dir, prompts, out_lens, args)
        hf = [] if args.skip_hf else [
            run_transformers(model_dir, prompts, out_lens, bs, args.device) for bs in args.hf_batch_size
        ]

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "device": args.device,
        "workload": {"requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len},
        "attnserve": ours,
        "transformers": hf,
        "ratios": {r["batch_size"]: ours["tokens_per_s"] / r["tokens_per_s"] for r in hf},
    }
    print(f"attnserve:                {ours['output_tokens']} tokens in {ours['seconds']:6.1f} s = "
          f"{ours['tokens_per_s']:7.1f} tok/s")
    for r in hf:
        print(f"transformers (batch {r['batch_size']:3d}): {r['output_tokens']} tokens in {r['seconds']:6.1f} s = "
              f"{r['tokens_per_s']:7.1f} tok/s   ratio attnserve/transformers {report['ratios'][r['batch_size']]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
