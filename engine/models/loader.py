"""Loading HF safetensors checkpoints straight into the model.

The model is built on the meta device (no memory, no init), then each checkpoint tensor's bytes are
read once, straight into the parameter (or its row slice of a fused parameter) when dtype and device
already match, else through one temporary tensor. Peak memory is the model plus at most one tensor.
Only safetensors are read: never torch.load or pickle.

load_format "dummy" skips the checkpoint: random weights made on the device (engine/models/dummy.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig, read_json
from engine.errors import ModelLoadError
from engine.models.common import WHOLE, Shard, WeightTarget
from engine.models.dummy import init_dummy_weights, warn_random_weights
from engine.models.gpt2 import GPT2LMHeadModel
from engine.models.llama import LlamaForCausalLM
from engine.models.safetensors_io import SafetensorsFile

logger = logging.getLogger(__name__)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no weight_map")
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
    elif (model_dir / "model.safetensors").exists():
        files = [model_dir / "model.safetensors"]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        bins = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = f" (found {', '.join(bins)}: pickle checkpoints are not loaded; convert to safetensors)" if bins else ""
        raise ModelLoadError(f"no safetensors weights in {model_dir}{hint}")
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ModelLoadError(f"missing weight files in {model_dir}: {', '.join(missing)}")
    return files


def build_meta_model(cfg: ModelConfig, shard: Shard = WHOLE) -> nn.Module:
    """The model (this rank's shard of it) with every parameter on the meta device: shapes only, no memory, no init."""
    with torch.device("meta"):
        return (GPT2LMHeadModel if cfg.is_gpt2 else LlamaForCausalLM)(cfg, shard)


def load_model(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype, load_format: str = "auto", seed: int = 0,
    shard: Shard = WHOLE,
) -> nn.Module:
    """load_format "auto"/"safetensors": the checkpoint's weights; "dummy": random weights from `seed`,
    made from config.json alone (no weight file is looked at). A tensor-parallel shard reads only its part of each
    tensor from the files (engine/models/safetensors_io.py read_part)."""
    model = build_meta_model(cfg, shard)
    if load_format == "dummy":
        if shard.rank == 0:
            warn_random_weights(cfg, seed)
        init_dummy_weights(model, device, dtype, seed + shard.rank)
        return model.eval()
    if load_format not in ("auto", "safetensors"):
        raise ValueError(f"load_format must be one of auto, safetensors, dummy; got {load_format!r}")
    params = dict(model.named_parameters())  # tied parameters appear once
    rows_loaded = {name: 0 for name in params}
    unexpected: list[str] = []
    bytes_read = 0
    for file in checkpoint_files(cfg.path):
        with SafetensorsFile(file) as f:
            for name in f.keys():
                target = model.map_weight(name)
                if target is None:
                    continue
                if target.param not in params:
                    unexpected.append(name)
                    continue
                rows_loaded[target.param] += _place(model, params, target, f, name, device, dtype)
            bytes_read += f.bytes_read
    _check_complete(model, params, rows_loaded)
    if shard.size > 1:
        logger.info("tensor-parallel rank %d of %d read %.1f MiB of checkpoint tensors", shard.rank, shard.size,
                    bytes_read / 2**20)
    if unexpected:
        logger.warning("ignored %d unexpected checkpoint tensors, e.g. %s", len(unexpected), unexpected[:5])
    model.tie_weights()
    return model.eval()


def _place(model, params, target: WeightTarget, f: SafetensorsFile, name: str, device, dtype) -> int:
    """Read one checkpoint tensor into the model; returns how many parameter rows it filled."""
    shape = list(f.shape(name)[::-1] if target.transpose else f.shape(name))
    if target.segments is not None:
        shape[target.split_dim] = sum(length for _, length in target.segments)
    param = params[target.param]
    # Same dtype on CPU, no transpose and the whole tensor: the file's bytes are read straight into the parameter.
    direct = f.dtype(name) == dtype and device.type == "cpu" and not target.transpose and target.segments is None

    def loaded() -> torch.Tensor:
        if target.segments is None:
            data = f.read(name)
        else:  # this rank's part only; a transposed (Conv1D) tensor is split along the file's other dimension
            dim = 1 - target.split_dim if target.transpose else target.split_dim
            data = f.read_part(name, dim, target.segments)
        return data.t() if target.transpose else data

    if target.row_offset is None:
        if tuple(shape) != tuple(param.shape):
            raise ModelLoadError(f"{name}: checkpoint shape {tuple(shape)}, model expects {tuple(param.shape)}")
        if direct:
            data = torch.empty(shape, dtype=dtype)
            f.read_into(name, data)
        else:
            data = loaded().to(device=device, dtype=dtype).contiguous()
        new = nn.Parameter(data, requires_grad=False)
    else:
        # A piece of a fused parameter: allocate the whole parameter on first sight, then fill its rows.
        if tuple(shape[1:]) != tuple(param.shape[1:]) or target.row_offset + shape[0] > param.shape[0]:
            raise ModelLoadError(f"{name}: checkpoint shape {tuple(shape)} does not fit {target.param}")
        new = param if param.device == device else nn.Parameter(
            torch.empty(param.shape, device=device, dtype=dtype), requires_grad=False
        )
        rows = new.data.narrow(0, target.row_offset, shape[0])
        if direct:
            f.read_into(name, rows)
        else:
            rows.copy_(loaded())
    module_name, _, attr = target.param.rpartition(".")
    setattr(model.get_submodule(module_name), attr, new)
    params[target.param] = new
    return shape[0]


def _check_complete(model: nn.Module, params: dict, rows_loaded: dict[str, int]) -> None:
    # A fused parameter is complete once all its pieces (e.g. q, k and v) have filled every row.
    missing = []
    for name, param in params.items():
        if param.device.type == "meta" or rows_loaded[name] < param.shape[0]:
            missing.append(name)
    if missing:
        raise ModelLoadError(
            f"checkpoint in {model.config.path} is missing {len(missing)} tensors, e.g. {', '.join(missing[:5])}"
        )
