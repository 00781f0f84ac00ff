"""Engine options: validation messages, defaults and the KV pool sizing."""

import pytest
import torch

from engine import LLM, EngineArgs, ValidationError
from engine.engine_args import parse_size
from engine.kv_cache import bytes_per_block


@pytest.fixture(scope="module")
def llama(make_ckpt):
    return make_ckpt("llama")


@pytest.mark.parametrize("kwargs,match", [
    ({"block_size": 0}, "block_size must be a positive integer"),
    ({"max_num_seqs": 0}, "max_num_seqs must be a positive integer"),
    ({"dtype": "int8"}, "dtype must be one of auto, float32, float16, bfloat16"),
    ({"device": "tpu"}, "device must be auto, cpu, cuda"),
    ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization must be in \(0, 1\]"),
    ({"kv_cache_memory": "lots"}, "kv_cache_memory must be a byte count"),
    ({"max_num_batched_tokens": 8, "max_num_seqs": 16}, r"max_num_batched_tokens \(8\) must be >= max_num_seqs"),
    ({"enable_chunked_prefill": False, "max_num_batched_tokens": 64, "max_model_len": 128},
     "without chunked prefill"),
])
def test_bad_engine_options_name_the_option(llama, kwargs, match):
    with pytest.raises(ValidationError, match=match):
        EngineArgs(model=str(llama), **kwargs).create_config()


def test_unknown_option_is_a_type_error(llama):
    with pytest.raises(TypeError, match="unknown engine argument.*max_batch"):
        LLM(str(llama), max_batch=4)


def test_small_token_budget_lowers_the_default_max_num_seqs(llama):
    cfg = EngineArgs(model=str(llama), max_num_batched_tokens=8).create_config()
    assert cfg.scheduler.max_num_seqs == 8


def test_pool_sized_from_memory_budget(llama):
    llm = LLM(str(llama), kv_cache_memory="1MiB", block_size=16)
    per_block = bytes_per_block(llm.engine.core.config.model, 16, torch.float32)
    assert llm.engine.core.pool.num_blocks == (1 << 20) // per_block
    assert llm.engine.core.config.dtype == torch.float32  # the CPU default


@pytest.mark.parametrize("text,expected", [("1GiB", 1 << 30), ("512MiB", 512 << 20), ("2G", 2 << 30), (4096, 4096),
                                           ("1.5KiB", 1536)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected
