"""Shared plumbing for the Triton kernels: interpreter detection, dot operand types, sizes.

Triton fixes at its own import whether kernels are compiled or run by its CPU interpreter
(TRITON_INTERPRET=1): its library functions (tl.max, tl.sum, ...) are wrapped then. So the mode is
per process, and importing anything that imports triton (torch._dynamo does) settles it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import triton
import triton.language as tl

# NOTE: tl.dot(input_precision=...) arrived in Triton 3.0; without it fp32 dots silently run in tf32.
if "input_precision" not in inspect.signature(tl.dot).parameters:
    raise ImportError(f"the Triton kernels need triton >= 3.0 (tl.dot input_precision); found {triton.__version__}")


def interpreter_enabled() -> bool:
    """Whether triton runs kernels through its interpreter in this process."""
    return type(tl.sum).__name__ == "InterpretedFunction"


def dot_config(dtype: torch.dtype) -> tuple[Any, str | None]:
    """(operand dtype for tl.dot, input precision; None = Triton's default). fp32 stays exact ("ieee",
    not tf32), to match SDPA to ~1e-5. The interpreter keeps bf16 as raw uint16 bits and would multiply
    those, so there bf16 operands are widened to fp32 (values unchanged, products exact)."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreter_enabled()):
        return tl.float32, "ieee"
    if dtype == torch.float16:
        return tl.float16, None
    if dtype == torch.bfloat16:
        return tl.bfloat16, None
    raise TypeError(f"the Triton attention kernels support float32, float16 and bfloat16; got {dtype}")


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, table, n, n_mask, kv_head, d, d_mask,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE: tl.constexpr):
    """K and V of the keys at positions n of one sequence ([BLOCK_N, BLOCK_D] each), read through its block
    table row `table`: key n lives in block table[n // PAGE] at offset n % PAGE. No gather copy."""
    block = tl.load(table + n // PAGE, mask=n_mask, other=0)
    slot_k = block[:, None] * stride_kb + (n % PAGE)[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
    slot_v = block[:, None] * stride_vb + (n % PAGE)[:, None] * stride_vs + kv_head * stride_vh + d[None, :]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    # Masked loads, not masked scores: stale cache slots may hold NaN/inf, and 0 * NaN is NaN.
    k = tl.load(k_cache_ptr + slot_k, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + slot_v, mask=kv_mask, other=0.0)
    return k, v


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(n))
