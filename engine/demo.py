"""Streaming generation demo: `python -m engine.demo [--model DIR] [--prompt TEXT ...]`.

`make serve` runs this until the HTTP server lands. Without --model it uses the built-in random-weight
model, whose output is noise: point --model at a Hugging Face model directory for real text.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from engine.async_engine import AsyncEngine
from engine.errors import AttnServeError
from engine.sampling_params import SamplingParams

DEFAULT_PROMPTS = ["The capital of France is", "Once upon a time,"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: the built-in demo model)")
    p.add_argument("--prompt", action="append", help="prompt to complete; repeat for several (run as one batch)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    return p.parse_args(argv)


async def stream_all(engine: AsyncEngine, prompts: list[str], params: SamplingParams) -> None:
    async def one(i: int, prompt: str) -> None:
        async for out in engine.add_request(prompt, params):
            for c in out.outputs:
                if c.text:
                    print(f"[{i}] {c.text!r}", flush=True)
                if c.finish_reason:
                    print(f"[{i}] finished: {c.finish_reason}", flush=True)

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        engine = AsyncEngine.from_args(args.model, device=args.device, dtype=args.dtype)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    except AttnServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = engine.engine.config
    if args.model is None:
        print("note: built-in random-weight demo model; its output is noise. Use --model DIR for a real model.")
    print(f"loaded {cfg.model.architecture} from {cfg.model.path} on {cfg.device} ({cfg.dtype}); "
          f"{engine.stats().num_kv_blocks} KV blocks, max_model_len {cfg.scheduler.max_model_len}")
    try:
        asyncio.run(stream_all(engine, args.prompt or DEFAULT_PROMPTS, params))
    except AttnServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
