"""Decode attention in C++ for the CPU (kernels/csrc/paged_decode.cpp), built on first use and called through ctypes.

Why native code: the same attention written as tensor expressions and compiled by inductor (this module's
predecessor) spent its time on per-element index arithmetic, cross-lane sums and materialised scores; the C++ loop
nest reads every key and value once, straight from its block, keeps each head's query and accumulator in vector
registers, and runs 1.4-3x faster (docs/benchmarks.md). It needs no torch headers, so it builds in a few seconds
with the compiler that torch.compile (which the engine turns it on with) needs anyway.

The library is compiled with -march=native, so its cache key includes this CPU's model and flags (a cache directory
shared between machines never hands one host another's instructions), the compiler's version and the source.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_decode.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_COMPILE_TIMEOUT_S = 120


def cache_dir() -> Path:
    """$ATTNSERVE_CACHE_DIR, else $XDG_CACHE_HOME/attnserve, else ~/.cache/attnserve; then kernels/ under it."""
    root = os.environ.get("ATTNSERVE_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "attnserve")
    return Path(root) / "kernels"


def _cpu_identity() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("no C++ compiler found (set CXX, or install g++)")


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:  # missing, not executable, or past the timeout
        raise RuntimeError(f"{cmd[0]} failed: {exc}") from exc


def _build(compiler: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: ranks or servers starting together never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = _run([compiler, *FLAGS, str(SOURCE), "-o", tmp], _COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built the CPU decode attention kernel: %s", path)


@functools.lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """The built kernel, compiled on first use into cache_dir() (or, where that is not writable, a directory under
    the system's temporary one); RuntimeError, with the compiler's message, if it cannot be built."""
    compiler = _compiler()
    version = _run([compiler, "--version"], 30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *FLAGS, _cpu_identity()]).encode())
    name = f"paged_decode-{key.hexdigest()[:20]}.so"
    fallback = Path(tempfile.gettempdir()) / f"attnserve-{os.getuid()}" / "kernels"
    for directory in (cache_dir(), fallback):
        path = directory / name
        if path.exists():
            break
        try:
            _build(compiler, path)
            break
        except OSError as exc:  # not writable: try the next directory
            logger.info("cannot build the CPU decode kernel in %s (%s)", directory, exc)
    else:
        raise RuntimeError(f"no writable directory for the CPU decode kernel (tried {cache_dir()} and {fallback})")
    lib = ctypes.CDLL(str(path))  # a CDLL call releases the GIL while the kernel runs
    fn = lib.attnserve_paged_decode
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_float, i64,
                   ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


class NativeDecode:
    """Decode attention: q [B, heads, dim], one query per sequence at position context_lens[b] - 1; caches
    [blocks, block_size, kv_heads, dim]; block_tables [B, M]; context_lens [B]; keys before
    context_lens[b] - sliding_window are not seen. Returns [B, heads, dim] in q's dtype."""

    def __init__(self) -> None:
        self._fn = load_library().attnserve_paged_decode
        self._checked: tuple[torch.Tensor, torch.Tensor, int] | None = None  # the tables last validated

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, sliding_window: int | None) -> torch.Tensor:
        if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in _DTYPES:
            raise TypeError(f"the CPU decode kernel takes float32, bfloat16 or float16 for q and the caches alike, "
                            f"got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
        if q.device.type != "cpu" or k_cache.device.type != "cpu" or v_cache.device.type != "cpu":
            raise ValueError("the CPU decode kernel takes CPU tensors")
        seqs, heads, dim = q.shape
        blocks, block_size, kv_heads, cache_dim = k_cache.shape
        if cache_dim != dim or heads % kv_heads or v_cache.shape != k_cache.shape or block_tables.shape[0] != seqs:
            raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} "
                             f"and block tables {tuple(block_tables.shape)}")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("the CPU decode kernel reads contiguous caches")  # a copy per call would cost more
        tables = block_tables.to(torch.int64).contiguous()
        lens = context_lens.to(torch.int64).contiguous()
        if self._checked is None or self._checked[0] is not block_tables or self._checked[1] is not context_lens \
                or self._checked[2] != blocks:
            # The C++ reads wherever the tables point: a bad entry must be an exception here, not a crash there.
            # Every layer of a step passes the same tensors, so they are checked once per step.
            _check_tables(tables, lens, blocks, block_size)
            self._checked = (block_tables, context_lens, blocks)
        q = q.contiguous()
        out = torch.empty_like(q)
        status = self._fn(_DTYPES[q.dtype], q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                          tables.shape[1], lens.data_ptr(), out.data_ptr(), seqs, heads, kv_heads, dim, block_size,
                          scale, sliding_window or 0, torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"the CPU decode kernel refused dtype code {_DTYPES[q.dtype]}")
        return out


def _check_tables(tables: torch.Tensor, lens: torch.Tensor, blocks: int, block_size: int) -> None:
    if tables.dim() != 2 or lens.shape != (tables.shape[0],):
        raise ValueError(f"block tables {tuple(tables.shape)} and context lengths {tuple(lens.shape)} do not match")
    if tables.numel() and (int(tables.min()) < 0 or int(tables.max()) >= blocks):
        raise IndexError(f"a block table entry is outside the cache's {blocks} blocks")
    reach = tables.shape[1] * block_size
    if lens.numel() and (int(lens.min()) < 1 or int(lens.max()) > reach):
        raise IndexError(f"a context length is outside 1..{reach} (what the block tables cover)")
