"""Train the demo model: a small Llama that completes Python code, trained on the Python standard library.

    nice -n 19 .venv/bin/python -m tools.train_demo_model --out models/demo --threads 1

made the committed checkpoint (models/demo/training_metrics.json records the command and every setting).

Plain PyTorch; transformers is not imported. The corpus is the running interpreter's standard library, the
tokenizer a byte-level BPE trained on it with the `tokenizers` library, and the model a Llama written below with
Hugging Face parameter names, so the checkpoint in --out loads in attnserve and in transformers alike. The split,
the tokenizer, the initial weights and the batch order follow from --seed and the Python version; on one machine
with one thread count a run repeats exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, pre_tokenizers
from torch import nn

from tools.bpe import IM_END_TOKEN, IM_START_TOKEN, train_byte_level_bpe, write_tokenizer_files

# ----- corpus -----

# Test packages are left out. test/ alone is bigger than the rest of the library (19 of 34 MB of source), the
# training budget covers the rest only a few times, and library code is what the model is meant to complete:
# unittest boilerplate would take over half of a capacity that is small to begin with.
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test"})
VALIDATION_PERCENT = 4


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the stdlib root, '/'-separated: the split hashes it, so it must not vary by OS
    text: str


def stdlib_files() -> list[SourceFile]:
    """The running interpreter's standard library: its .py files in sorted path order, without tests, generated
    tables and files that are not UTF-8."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = PurePosixPath(path.relative_to(root).as_posix())
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not _is_generated(rel, text):
            files.append(SourceFile(str(rel), text))
    return files


def _is_generated(rel: PurePosixPath, text: str) -> bool:
    # Data rather than code anyone writes: the codec tables made by gencodec.py, pydoc's help-topic text, and the
    # build's sysconfig dump (which also differs between machines). Together they are ~16% of the remaining bytes.
    return (
        rel.parts[0] == "pydoc_data"
        or rel.name.startswith("_sysconfigdata")
        or "gencodec.py" in text.partition("\n")[0]
    )


def is_validation(path: str) -> bool:
    """The held-out split is by file, from a hash of the relative path: the same on every run and machine."""
    digest = hashlib.sha256(path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < VALIDATION_PERCENT


def split_files(files: list[SourceFile]) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, validation)."""
    return [f for f in files if not is_validation(f.path)], [f for f in files if is_validation(f.path)]


# ----- tokenizer -----

EOT_TOKEN = "<|endoftext|>"
# The trainer gives the special tokens the first ids, in this order.
SPECIAL_TOKENS = (EOT_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

# Llama 3's pre-tokenizer split, except that newlines are always tokens of their own. GPT-2's split joins a newline
# to the indentation after it, Llama 3's to the punctuation before it; with either, a prompt ending in a newline
# ("def f(n):\n") ends on a token the model never saw in that place and continues badly. Costs ~3% more tokens.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with the split above. Every training file follows an <|endoftext|>, so it doubles as bos: a
    prompt encoded with special tokens starts the way a file does."""
    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    return train_byte_level_bpe(texts, vocab_size, SPECIAL_TOKENS, EOT_TOKEN, split)


def encode_stream(tokenizer: Tokenizer, files: list[SourceFile]) -> torch.Tensor:
    """All files as one token stream, each file preceded by <|endoftext|>."""
    eot = tokenizer.token_to_id(EOT_TOKEN)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch([f.text for f in files], add_special_tokens=False):
        ids.append(eot)
        ids.extend(encoding.ids)
    return torch.tensor(ids, dtype=torch.long)


# ----- model: Llama with Hugging Face parameter names -----

INIT_STD = 0.02


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    context_len: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def hf_config(self, eot_id: int) -> dict:
        """config.json as transformers writes a LlamaConfig; embeddings are tied (one tensor in the checkpoint)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": eot_id,
            "eos_token_id": eot_id,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": INIT_STD,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.context_len,
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "pad_token_id": eot_id,
            "pretraining_tp": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": None,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cos_sin(shape: LlamaShape) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, [context_len, head_dim], as Llama's default RoPE computes them."""
    dim = shape.head_dim
    inv_freq = 1.0 / shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.outer(torch.arange(shape.context_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; rotates the two halves of head_dim (HF's "rotate_half" layout)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.head_dim = shape.head_dim
        self.gqa = shape.num_kv_heads != shape.num_heads
        self.q_proj = nn.Linear(shape.hidden_size, shape.num_heads * shape.head_dim, bias=False)
        self.k_proj = nn.Linear(shape.hidden_size, shape.num_kv_heads * shape.head_dim, bias=False)
        self.v_proj = nn.Linear(shape.hidden_size, shape.num_kv_heads * shape.head_dim, bias=False)
        self.o_proj = nn.Linear(shape.num_heads * shape.head_dim, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = (proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = Attention(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = MLP(shape)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """state_dict names are transformers' (model.layers.N.self_attn.q_proj.weight, ...); lm_head is tied."""

    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.model = LlamaModel(shape)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_cos_sin(shape)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights(shape.num_layers)

    def _init_weights(self, num_layers: int) -> None:
        # GPT-2's scheme: N(0, 0.02), and the projections that write into the residual stream scaled down by
        # sqrt(2 * layers) so the stream's variance does not grow with depth. Norm weights stay 1.
        for name, param in self.named_parameters():
            if param.dim() == 2:
                residual = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(param, 0.0, INIT_STD / math.sqrt(2 * num_layers) if residual else INIT_STD)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [batch, seq] -> logits [batch, seq, vocab]."""
        seq = input_ids.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


# ----- training -----

MIN_LR_RATIO = 0.1  # the cosine schedule ends at a tenth of the peak learning rate


def learning_rate(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup, then cosine decay to MIN_LR_RATIO * peak at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_batch(stream: torch.Tensor, batch_size: int, context_len: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the training stream: inputs and next-token targets, [batch, context_len] each."""
    starts = torch.randint(0, len(stream) - context_len, (batch_size, 1), generator=generator)
    windows = stream[starts + torch.arange(context_len + 1)]
    return windows[:, :-1], windows[:, 1:]


def validation_windows(stream: torch.Tensor, context_len: int) -> torch.Tensor:
    """The validation stream cut into non-overlapping windows, [n, context_len + 1] (inputs plus one target)."""
    n = (len(stream) - 1) // context_len
    return stream[torch.arange(n)[:, None] * context_len + torch.arange(context_len + 1)]


def strided_subset(windows: torch.Tensor, count: int) -> torch.Tensor:
    """`count` windows spread over the whole validation set, for cheap evaluations during training."""
    return windows[:: max(1, len(windows) // count)][:count]


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int, device: torch.device,
             bf16: bool) -> float:
    """Mean next-token cross-entropy (nats) over all target tokens of `windows`."""
    model.eval()
    total = 0.0
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Weight decay on matrices (embedding included) only, not on norm gains.
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def save_checkpoint(model: LlamaForCausalLM, shape: LlamaShape, tokenizer: Tokenizer, out_dir: Path) -> None:
    """config.json, model.safetensors (bf16), tokenizer files and generation_config.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    eot = tokenizer.token_to_id(EOT_TOKEN)
    # lm_head.weight is the embedding (tied); transformers' checkpoints hold only model.embed_tokens.weight.
    weights = {name: t.detach().to("cpu", torch.bfloat16).contiguous()
               for name, t in model.state_dict().items() if name != "lm_head.weight"}
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", shape.hf_config(eot))
    # <|im_end|> closes an assistant turn in ChatML, so chat replies end there too.
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": eot, "eos_token_id": [eot, tokenizer.token_to_id(IM_END_TOKEN)], "pad_token_id": eot,
    })
    # <|endoftext|> is bos, eos and pad: ChatML writes {{ bos_token }} first, and the model saw it before every file.
    write_tokenizer_files(tokenizer, out_dir, model_max_length=shape.context_len, special_tokens=SPECIAL_TOKENS,
                          bos_token=EOT_TOKEN, eos_token=EOT_TOKEN, pad_token=EOT_TOKEN)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _log(message: str, start: float) -> None:
    print(f"[{time.monotonic() - start:7.0f}s] {message}", flush=True)


def train(args: argparse.Namespace) -> None:
    start = time.monotonic()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_files, val_files = split_files(stdlib_files())
    tokenizer = train_tokenizer([f.text for f in train_files], args.vocab_size)
    train_stream, val_stream = encode_stream(tokenizer, train_files), encode_stream(tokenizer, val_files)
    val_all = validation_windows(val_stream, args.context_len)
    val_subset = strided_subset(val_all, args.eval_windows)
    _log(f"corpus: Python {platform.python_version()} stdlib, {len(train_files)} train files "
         f"({len(train_stream):,} tokens), {len(val_files)} validation files ({len(val_stream):,} tokens); "
         f"vocab {tokenizer.get_vocab_size()}", start)

    shape = LlamaShape(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads, context_len=args.context_len,
    )
    model = LlamaForCausalLM(shape).to(device)
    num_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = args.batch_size * args.context_len
    _log(f"model: {num_params:,} parameters {asdict(shape)}; {args.steps} steps x {tokens_per_step} tokens = "
         f"{args.steps * tokens_per_step / len(train_stream):.2f} epochs", start)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    batches = torch.Generator().manual_seed(args.seed)

    train_start = time.monotonic()
    interval_loss, interval_start = 0.0, time.monotonic()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.lr, args.warmup_steps, args.steps)
        inputs, targets = (t.to(device) for t in sample_batch(train_stream, args.batch_size, args.context_len, batches))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        interval_loss += loss.item()

        done = step + 1
        if done % args.log_every == 0:
            elapsed = time.monotonic() - interval_start
            _log(f"step {done}/{args.steps} loss {interval_loss / args.log_every:.4f} "
                 f"lr {optimizer.param_groups[0]['lr']:.2e} grad_norm {grad_norm:.2f} "
                 f"{args.log_every * tokens_per_step / elapsed:,.0f} tok/s", start)
            interval_loss, interval_start = 0.0, time.monotonic()
        if done % args.eval_every == 0 and done < args.steps:
            val = evaluate(model, val_subset, args.batch_size, device, args.bf16)
            _log(f"step {done} val loss {val:.4f} ppl {math.exp(val):.2f} ({len(val_subset)} windows)", start)
    train_seconds = time.monotonic() - train_start

    # Measure what is shipped, the way attnserve serves it on CPU: weights rounded to bf16, computed in float32,
    # on the whole validation set.
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16))
    val_loss = evaluate(model, val_all, args.batch_size, device, bf16=False)
    _log(f"final val loss {val_loss:.4f} ppl {math.exp(val_loss):.2f} "
         f"({len(val_all)} windows of {args.context_len} tokens; bf16 weights, float32 compute)", start)

    out_dir = Path(args.out)
    save_checkpoint(model, shape, tokenizer, out_dir)
    metrics = {
        "command": shlex.join(sys.orig_argv),
        "args": vars(args),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
        "device": str(device),
        "num_parameters": num_params,
        "train_files": len(train_files),
        "validation_files": len(val_files),
        "train_tokens": len(train_stream),
        "validation_tokens": len(val_stream),
        "tokens_seen": args.steps * tokens_per_step,
        "train_seconds": round(train_seconds),
        "total_seconds": round(time.monotonic() - start),
        "validation_loss": round(val_loss, 4),
        "validation_perplexity": round(math.exp(val_loss), 2),
    }
    _write_json(out_dir / "training_metrics.json", metrics)
    _log(f"wrote {out_dir}", start)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/demo", help="checkpoint directory (default: models/demo)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--context-len", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="sequences of --context-len tokens per step")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=75)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--eval-windows", type=int, default=32, help="validation windows for the periodic evaluations")
    # On an AVX512-BF16 CPU autocast trains 2-3x faster than float32; --no-bf16 for CPUs without bf16 units.
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast for training and the periodic evaluations (default: on)")
    # One thread beats two on a CPU shared with other work: a descheduled thread stalls the other at every op.
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0, torch's choice)")
    return p.parse_args()


def main() -> None:
    train(parse_args())


if __name__ == "__main__":
    main()
