"""`--load-format dummy`: a model from config.json alone, with random weights, as vLLM's dummy format.

It exists to benchmark published shapes (e.g. an 8B Llama) without their checkpoints. The model is built on
the meta device, then every parameter is allocated once, directly on the target device in the target dtype,
and filled there: no safetensors file is opened and no CPU copy of the weights exists at any point.

Values follow transformers' initialisation of a fresh model (matrices and embeddings N(0, 0.02), biases 0,
norm weights 1), so hidden states keep their scale through any depth and the logits are finite. They come
from a generator on the device seeded with the engine seed: the same seed on the same device gives the
same weights, and nothing else in the process changes them (the global RNG is not touched).

A directory holding only config.json has no tokenizer either; then the demo model's tokenizer, read from its
checkpoint, stands in.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.config import ModelConfig
from engine.default_model import DEMO_MODEL_ENV, demo_model_path
from engine.errors import ModelLoadError
from engine.models.common import RMSNorm
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

INIT_STD = 0.02  # transformers' initializer_range default, which Llama 3 and Qwen3 also publish
_NORMS = (RMSNorm, nn.LayerNorm)


def init_dummy_weights(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Replace every meta parameter of `model` by a random one on `device`. Tied parameters stay tied."""
    generator = torch.Generator(device=device).manual_seed(seed)
    made: dict[int, nn.Parameter] = {}  # id of the meta parameter -> its replacement, so ties survive
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            new = made.get(id(param))
            if new is None:
                data = torch.empty(param.shape, device=device, dtype=dtype)
                _fill(data, module, name, generator)
                new = made[id(param)] = nn.Parameter(data, requires_grad=False)
            setattr(module, name, new)


def _fill(data: torch.Tensor, module: nn.Module, name: str, generator: torch.Generator) -> None:
    if name == "bias":
        data.zero_()
    elif isinstance(module, _NORMS):
        data.fill_(1.0)
    else:
        data.normal_(0.0, INIT_STD, generator=generator)


def warn_random_weights(cfg: ModelConfig, seed: int) -> None:
    # NOTE: the design forbids random weights as a silent default; dummy is explicit, and the start-up log
    # says so in words an operator cannot miss.
    logger.warning(
        "load_format=dummy: the weights are RANDOM (N(0, %s), seed %d), built from %s alone; no checkpoint "
        "was read. Outputs are meaningless: this is for benchmarking the model's shape only.",
        INIT_STD, seed, cfg.path / "config.json",
    )


def tokenizer_for(cfg: ModelConfig, load_format: str) -> Tokenizer:
    """The model directory's tokenizer. Only under load_format dummy may tokenizer.json be missing: then the demo
    model's tokenizer stands in, with a warning (any other format needs the model's own)."""
    if load_format != "dummy" or (cfg.path / "tokenizer.json").is_file():
        return Tokenizer.from_dir(cfg.path)
    demo_dir = demo_model_path()
    if not (demo_dir / "tokenizer.json").is_file():
        raise ModelLoadError(
            f"load_format=dummy and no tokenizer.json in {cfg.path}; its stand-in, the demo model's tokenizer, is "
            f"not at {demo_dir} either. Add the model's tokenizer.json, or set ${DEMO_MODEL_ENV} to the demo "
            "model's directory")
    demo = Tokenizer.from_dir(demo_dir)
    # NOTE: without the demo's eos ids on purpose: they mean nothing in this model's vocabulary, so generation stops
    # only on the eos ids of the model's own config.json.
    special = {name: token for name, token in demo.special_tokens.items() if name != "eos_token"}
    tokenizer = Tokenizer(demo.backend, special_tokens=special, chat_templates={"default": demo.chat_template})
    size = tokenizer.vocab_size
    short = (f"; this model's vocabulary has only {cfg.vocab_size} ids, so text prompts with ids >= {cfg.vocab_size} "
             "are refused") if cfg.vocab_size < size else ""
    logger.warning(
        "load_format=dummy and no tokenizer.json in %s: using the demo model's tokenizer (%s, %d tokens), not "
        "this model's. This is for benchmarks only: text is encoded with that vocabulary, and generated token ids "
        ">= %d decode to no text%s. Send prompts as token ids, or add the model's tokenizer.json, for meaningful "
        "token counts.",
        cfg.path, demo_dir / "tokenizer.json", size, size, short,
    )
    return tokenizer
