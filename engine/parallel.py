"""Tensor parallelism over torch.distributed: starting the ranks, the messages and collectives between them, and the
checks of a layout against a model and a machine.

Process layout. Rank 0 is the engine's own process: the scheduler runs there once, and only rank 0 samples (from
the logits it gathers). Ranks 1..N-1 are worker processes (engine/model_runner.py `worker_main`), started by rank 0 on
its node ("mp"), by `attnserve serve --headless` on the other nodes, or all by torchrun ("external_launcher"). Each
holds 1/N of the weights and of the KV cache (engine/models/common.py Shard) and runs the same forward over the same
block tables. Every step, rank 0 broadcasts one message of int64 arrays (the step's token ids, positions, slots,
block tables, and the rows that need logits); each row-parallel layer all-reduces, and rank 0 gathers the
vocab-parallel logits. The other ranks never decide anything, so they cannot disagree with rank 0.

Backends: gloo on CPU; on CUDA one group that carries CUDA tensors over NCCL and the CPU messages over gloo. On one
CPU node the all-reduces go through shared memory instead (engine/shm_allreduce.py): gloo's loopback latency is the
larger part of a step there.

Failures: a worker that exits or is stopped is seen by rank 0 at its next collective (the peer's sockets close;
shared-memory and, on CPU, gloo waits ask `check_workers` every few milliseconds) and, while idle, by `check_workers`
(the engine loop calls it every turn); either way the engine dies with the reason. A worker that
hangs is the engine watchdog's to catch (on by default with tensor parallelism). Workers die with rank 0's process
(PR_SET_PDEATHSIG on Linux) or at their next collective, so none is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine import config as config_module
from engine.config import EngineConfig, ModelConfig, ParallelConfig
from engine.errors import ValidationError
from engine.models.common import Shard
from engine.shm_allreduce import CHECK_S, SharedAllReduce, segment_path
from engine.shm_allreduce import supported as shm_supported

logger = logging.getLogger(__name__)

# Start-up: how long the ranks may take to join and to load (and compile) their shards, and the bound on any one
# collective after it. A hang at run time is the engine watchdog's to catch well before this.
STARTUP_TIMEOUT_S = 600.0
_HEAD = 2048  # int64 entries in a message's first broadcast; a longer message takes a second one
_STATUS = 1024  # bytes of a rank's start-up status (its error, if any)

# Message kinds, rank 0 -> the others.
STEP, ALLOCATE, PROFILE, SHUTDOWN = 1, 2, 3, 4

_GROUPS: dict[int, TensorParallelGroup] = {}
_KEYS = itertools.count()


@torch.library.custom_op("attnserve::all_reduce", mutates_args=())
def _all_reduce(x: torch.Tensor, group_key: int) -> torch.Tensor:
    # An opaque op, so that torch.compile keeps the collective out of the graph it fuses (engine/compilation.py).
    return _GROUPS[group_key].all_reduce(x)


@_all_reduce.register_fake
def _(x, group_key):
    return torch.empty_like(x)


class TensorParallelGroup:
    """This process's rank in the (default) torch.distributed group, and the local worker processes it started."""

    def __init__(self, rank: int, size: int, workers: list[subprocess.Popen]):
        self.rank, self.size = rank, size
        self.key = next(_KEYS)
        self.workers = workers  # rank 0 on an mp node: the processes of its node's other ranks
        # Set while a rank compiles or warms up on its own: the all-reduces return their input (shapes only).
        self.quiet = False
        self.closed = self.killed = False
        self._stopped_since: dict[int, float] = {}  # worker pid -> when check_workers first saw it stopped
        self.threads = torch.get_num_threads()  # this process's setting before the ranks split the cores
        # One CPU node: all-reduces meet in shared memory (engine/shm_allreduce.py), else they go through gloo/NCCL.
        self.shm: SharedAllReduce | None = None
        _GROUPS[self.key] = self

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.size, self.key)

    @contextlib.contextmanager
    def alone(self):
        """Run code on this rank only (compilation warm-ups): the model's all-reduces do not communicate."""
        self.quiet = True
        try:
            yield
        finally:
            self.quiet = False

    # ---- messages (rank 0 -> all) -----------------------------------------------------------------

    def send(self, kind: int, fields: list) -> None:
        """Broadcast a message: its kind and a list of integer arrays (or ints), as one int64 array."""
        arrays = [np.asarray(f, dtype=np.int64).reshape(-1) for f in fields]
        flat = np.concatenate([np.array([0, kind, len(arrays)] + [a.size for a in arrays], dtype=np.int64), *arrays])
        flat[0] = flat.size
        head = torch.zeros(_HEAD, dtype=torch.long)
        head[: min(flat.size, _HEAD)] = torch.from_numpy(flat[:_HEAD])
        dist.broadcast(head, 0)
        if flat.size > _HEAD:
            dist.broadcast(torch.from_numpy(flat[_HEAD:].copy()), 0)

    def receive(self) -> tuple[int, list[np.ndarray]]:
        head = torch.empty(_HEAD, dtype=torch.long)
        dist.broadcast(head, 0)
        size = int(head[0])
        flat = head.numpy()[:size]
        if size > _HEAD:
            rest = torch.empty(size - _HEAD, dtype=torch.long)
            dist.broadcast(rest, 0)
            flat = np.concatenate([head.numpy(), rest.numpy()])
        kind, count = int(flat[1]), int(flat[2])
        sizes = flat[3 : 3 + count]
        fields, at = [], 3 + count
        for n in sizes:
            fields.append(flat[at : at + n])
            at += n
        return kind, fields

    # ---- collectives -------------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks, as a new tensor (alone(): x itself, copied)."""
        if self.quiet:
            return x.clone()
        if self.shm is not None and self.shm.fits(x):
            return self.shm.all_reduce(x.contiguous(), self.check_workers)
        out = x.clone()
        self._wait(dist.all_reduce(out, async_op=True), out)
        return out

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: the full [rows, vocab] logits from every rank's vocabulary slice, in rank order. Others: None."""
        local = local.contiguous()
        if self.rank != 0:
            dist.gather(local, None, dst=0)
            return None
        parts = [torch.empty_like(local) for _ in range(self.size)]
        self._wait(dist.gather(local, parts, dst=0, async_op=True), local)
        return torch.cat(parts, dim=-1)

    def _wait(self, work, tensor: torch.Tensor) -> None:
        """Wait for an asynchronous collective. Rank 0 on CPU (gloo) asks check_workers between polls, as the
        shared-memory all-reduce does: a local worker that has died or been stopped ends the wait with an error,
        where a plain wait would hold the engine until gloo's timeout (the step's other collectives come first, so
        a worker stopped during its LM head left rank 0 in here). CUDA (NCCL) keeps a plain wait."""
        if self.rank != 0 or not self.workers or tensor.device.type != "cpu":
            work.wait()
            return
        pause = 2e-5  # the first polls come quickly: the other ranks are usually a fraction of a millisecond behind
        next_check = time.monotonic() + CHECK_S
        while not work.is_completed():
            time.sleep(pause)
            pause = min(2 * pause, _MAX_PAUSE_S)
            if time.monotonic() >= next_check:
                self.check_workers()
                next_check = time.monotonic() + CHECK_S
        work.wait()  # raises if the collective failed

    def min(self, value: int) -> int:
        """The smallest of every rank's value (the KV budget all ranks can hold)."""
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t)

    def agree_ready(self, error: str | None) -> None:
        """Every rank says whether it loaded; rank 0 raises the first failure. A worker that failed exits after this."""
        status = torch.zeros(_STATUS, dtype=torch.uint8)
        if error is not None:
            raw = error.encode("utf-8", "replace")[: _STATUS - 1]
            status[0] = 1
            status[1 : 1 + len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        statuses = [torch.empty_like(status) for _ in range(self.size)]
        dist.all_gather(statuses, status)
        for rank, s in enumerate(statuses):
            if int(s[0]) and self.rank == 0 and rank != 0:
                text = bytes(s[1:].numpy()).rstrip(b"\0").decode("utf-8", "replace")
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start: {text}")

    # ---- lifecycle ---------------------------------------------------------------------------------

    def check_workers(self) -> None:
        """Raise if a local worker process has exited, or has been stopped (SIGSTOP, a job-control stop) for over a
        second: a rank that cannot run holds every other rank at its next collective. (rank 0: between steps, and
        during shared-memory waits.)"""
        now = time.monotonic()
        for rank, proc in enumerate(self.workers, start=1):
            if proc.poll() is not None:
                raise RuntimeError(f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited with code "
                                   f"{proc.returncode}; the engine cannot continue without it")
            if _stopped(proc.pid):
                since = self._stopped_since.setdefault(proc.pid, now)
                if now - since > _STOPPED_S:
                    raise RuntimeError(f"tensor-parallel worker rank {rank} (pid {proc.pid}) has been stopped for "
                                       f"{now - since:.1f} s (SIGSTOP?); the engine cannot continue without it")
            else:
                self._stopped_since.pop(proc.pid, None)

    def kill_workers(self) -> None:
        """Kill the local workers now (any thread): a rank may be hung, and rank 0's thread may be blocked in a
        collective with it, which then fails and returns."""
        self.killed = True
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()

    def abandon(self) -> None:
        """A start that failed: kill the local workers and leave the group at once (no stop message to send)."""
        self.kill_workers()
        self.shutdown()

    def shutdown(self) -> None:
        """Rank 0's driving thread: ask every rank to stop, wait a little for the local ones (then kill them), and
        leave the group. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.rank == 0 and not self.killed:
            try:
                self.send(SHUTDOWN, [])
            except Exception as exc:  # noqa: BLE001 - a dead peer; the processes are killed below either way
                logger.warning("tensor parallel: could not tell the workers to stop (%s)", exc)
        deadline = time.monotonic() + 5.0
        for proc in self.workers:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        _GROUPS.pop(self.key, None)
        torch.set_num_threads(self.threads)


_STOPPED_S = 1.0  # a worker stopped this long is hung, not paused by a debugger's brief attach
# A gloo wait on rank 0 (TensorParallelGroup._wait) polls at most _MAX_PAUSE_S apart (a step waits at most that much
# longer than the collective) and checks the workers every CHECK_S, as a shared-memory wait does.
_MAX_PAUSE_S = 0.0005


def _stopped(pid: int) -> bool:
    """Is the process stopped by a signal (state T in /proc; Linux only, else never)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"T"
    except (OSError, IndexError):
        return False


# ---- checks -----------------------------------------------------------------------------------------


def check_layout(model: ModelConfig, parallel: ParallelConfig, device: torch.device) -> None:
    """ValidationError unless tensor_parallel_size N can shard this model on this machine."""
    n = parallel.tensor_parallel_size
    if n == 1:
        return
    problems = _indivisible(model, n)
    if problems:
        fits = [k for k in range(1, max(model.num_heads, 1) + 1) if not _indivisible(model, k)]
        raise ValidationError(f"tensor_parallel_size {n} does not divide the model's {'; '.join(problems)}; sizes "
                              f"that would: {', '.join(map(str, fits))}", "tensor_parallel_size")
    local = parallel.ranks_per_node
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local > count:
            raise ValidationError(f"tensor_parallel_size {n} needs {local} GPUs on this node, but it has {count}",
                                  "tensor_parallel_size")
    else:
        cores = _usable_cores()
        if local > cores:
            raise ValidationError(f"tensor_parallel_size {n} puts {local} ranks on this node, but this process may "
                                  f"use only {cores} CPU cores; each rank needs one", "tensor_parallel_size")


def _indivisible(model: ModelConfig, n: int) -> list[str]:
    kv = model.num_kv_heads
    problems = []
    if model.num_heads % n:
        problems.append(f"{model.num_heads} attention heads")
    if kv % n and n % kv:  # more ranks than KV heads works when each head serves a whole number of ranks
        problems.append(f"{kv} KV heads (N must divide them, or be a multiple of them)")
    if model.intermediate_size % n:
        problems.append(f"MLP intermediate size {model.intermediate_size}")
    if model.vocab_size % n:
        problems.append(f"vocabulary of {model.vocab_size}")
    return problems


def describe_layout(parallel: ParallelConfig, device: torch.device) -> str:
    """One line on the layout, for the logs and /metrics' info."""
    if parallel.tensor_parallel_size == 1:
        return "one process"
    backend = "nccl" if device.type == "cuda" else "gloo"
    return (f"tensor parallel size {parallel.tensor_parallel_size} over {parallel.nnodes} node(s), "
            f"{parallel.ranks_per_node} rank(s) per node, {backend}, executor {parallel.distributed_executor_backend}")


# ---- starting the ranks ---------------------------------------------------------------------------------


def _usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _shares_memory(config: EngineConfig) -> bool:
    """Can the ranks all-reduce through shared memory: all CPU processes on this one node?"""
    return config.device.type == "cpu" and config.parallel.nnodes == 1 and shm_supported()


def _backend(device: torch.device) -> str:
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _rank_config(config: EngineConfig, local_rank: int) -> EngineConfig:
    """A rank's config: on CUDA its node-local device."""
    if config.device.type != "cuda":
        return config
    return dataclasses.replace(config, device=torch.device("cuda", local_rank))


def _set_threads(parallel: ParallelConfig) -> None:
    """Split this node's cores between its ranks (on CPU they would otherwise all spin on every core)."""
    torch.set_num_threads(max(1, _usable_cores() // parallel.ranks_per_node))


def _spawn(config: EngineConfig, rank: int, local_rank: int, port: int) -> subprocess.Popen:
    """A worker rank as a fresh interpreter (engine/tp_worker.py), its arguments written down its stdin as JSON. Not
    multiprocessing: that would re-run the caller's main script in the child (and pickle, which nothing here uses)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # where the engine package is, for the child's imports
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "engine.tp_worker"], stdin=subprocess.PIPE, env=env)
    with proc.stdin:
        proc.stdin.write(json.dumps({"config": encode_config(config), "rank": rank, "local_rank": local_rank,
                                     "port": port}).encode())
    return proc


# The config's types, for its JSON form: dataclasses of engine/config.py by name, and the few other types they hold.
_CONFIG_CLASSES = ("EngineConfig", "ModelConfig", "RopeConfig", "CacheConfig", "SchedulerConfig", "SpeculativeConfig",
                   "ParallelConfig")


def encode_config(value):
    """An EngineConfig as JSON-ready plain data, each non-JSON value tagged with its type."""
    if dataclasses.is_dataclass(value):
        fields = {f.name: encode_config(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__config__": type(value).__name__, **fields}
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, (frozenset, tuple)):
        return {"__" + type(value).__name__ + "__": [encode_config(v) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot send a {type(value).__name__} to a tensor-parallel worker")


def decode_config(data):
    if isinstance(data, list):
        return [decode_config(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "__config__" in data:
        name = data.pop("__config__")
        if name not in _CONFIG_CLASSES:
            raise ValueError(f"not a config class: {name!r}")
        return getattr(config_module, name)(**{k: decode_config(v) for k, v in data.items()})
    (tag, value), = data.items()
    if tag == "__path__":
        return Path(value)
    if tag == "__device__":
        return torch.device(value)
    if tag == "__dtype__":
        dtype = getattr(torch, value)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"not a dtype: {value!r}")
        return dtype
    if tag == "__frozenset__":
        return frozenset(decode_config(value))
    if tag == "__tuple__":
        return tuple(decode_config(value))
    raise ValueError(f"unknown tag {tag!r} in a worker's config")


def start(config: EngineConfig) -> tuple[EngineConfig, TensorParallelGroup]:
    """Rank 0 (this process): start this node's other ranks ("mp"), or join torchrun's ("external_launcher"), and
    rendezvous with every rank. Returns rank 0's config (its device) and the group."""
    parallel = config.parallel
    if dist.is_initialized():
        gc.collect()  # an engine nobody holds any more, caught in a reference cycle, stops its ranks when collected
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process: one tensor-parallel engine per "
                           "process (shut the other one down first: LLM.shutdown())")
    size = parallel.tensor_parallel_size
    if parallel.distributed_executor_backend == "external_launcher":
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if rank != 0:
            raise RuntimeError(f"the engine runs on rank 0; rank {rank} must run as a worker")
        group = TensorParallelGroup(0, size, [])
        _set_threads(parallel)
        if config.device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(_backend(config.device), init_method="env://", rank=0, world_size=size,
                                timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
        return _rank_config(config, local_rank), group
    port = parallel.master_port or _free_port(parallel.master_addr)
    store = dist.TCPStore(parallel.master_addr, port, size, is_master=True,
                          timeout=timedelta(seconds=STARTUP_TIMEOUT_S), wait_for_workers=False)
    shm = _create_segment(config, port)
    workers = [_spawn(config, rank, rank, port) for rank in range(1, parallel.ranks_per_node)]
    group = TensorParallelGroup(0, size, workers)
    try:
        _wait_for_ranks(store, size, workers)
        if shm is not None:  # shared memory only if every rank could map it; all ranks learn the answer from the store
            if all(store.get(f"attnserve/shm/{rank}") == b"1" for rank in range(1, size)):
                group.shm = shm
            else:
                shm.close()
        store.set("attnserve/shm", "1" if group.shm is not None else "0")
        _set_threads(parallel)
        if config.device.type == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(_backend(config.device), store=store, rank=0, world_size=size,
                                timeout=timedelta(seconds=STARTUP_TIMEOUT_S))
    except BaseException:
        group.abandon()
        raise
    finally:
        if shm is not None:  # mapped by every rank that will use it by now; the name is not needed any more
            segment_path(port).unlink(missing_ok=True)
    logger.info("%s: %d local worker process(es) started (pids %s), rendezvous at %s:%d, all-reduce through %s",
                describe_layout(parallel, config.device), len(workers), [p.pid for p in workers], parallel.master_addr,
                port, "shared memory" if group.shm is not None else "torch.distributed")
    return _rank_config(config, 0), group


def _create_segment(config: EngineConfig, port: int) -> SharedAllReduce | None:
    """Rank 0's shared-memory all-reduce segment, where every rank is a CPU process on this node; else None."""
    if not _shares_memory(config):
        return None
    try:
        return SharedAllReduce(segment_path(port), 0, config.parallel.tensor_parallel_size, create=True)
    except OSError as exc:
        logger.warning("tensor parallel: no shared-memory segment for the all-reduces (%s); they go through gloo, "
                       "which is slower", exc)
        return None


def _wait_for_ranks(store, size: int, workers: list[subprocess.Popen]) -> None:
    """Wait until every rank has reached the store, failing fast if a local worker dies first."""
    keys = [f"attnserve/joined/{rank}" for rank in range(1, size)]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not store.check(keys):
        for rank, proc in enumerate(workers, start=1):
            if proc.poll() is not None:
                raise RuntimeError(f"tensor-parallel worker rank {rank} exited with code {proc.returncode} before "
                                   "joining (its log says why)")
        if time.monotonic() > deadline:
            missing = [k.rsplit("/", 1)[1] for k in keys if not store.check([k])]
            raise RuntimeError(f"tensor-parallel ranks {', '.join(missing)} did not join within {STARTUP_TIMEOUT_S:g} "
                               "s (are the other nodes started, with the same --master-addr/--master-port?)")
        time.sleep(0.05)


def join(config: EngineConfig, rank: int, local_rank: int, port: int | None) -> tuple[EngineConfig,
                                                                                        TensorParallelGroup]:
    """A worker rank: rendezvous with rank 0 (mp: its store at master_addr:port; external_launcher: env://)."""
    _die_with_parent()
    parallel = config.parallel
    _set_threads(parallel)
    if config.device.type == "cuda":
        torch.cuda.set_device(local_rank)
    size = parallel.tensor_parallel_size
    timeout = timedelta(seconds=STARTUP_TIMEOUT_S)
    if parallel.distributed_executor_backend == "external_launcher":
        dist.init_process_group(_backend(config.device), init_method="env://", rank=rank, world_size=size,
                                timeout=timeout)
        return _rank_config(config, local_rank), TensorParallelGroup(rank, size, [])
    store = dist.TCPStore(parallel.master_addr, port, size, is_master=False, timeout=timeout)
    shm = None
    if _shares_memory(config):
        with contextlib.suppress(OSError):  # rank 0 made none, or this rank cannot map it: gloo it is, for every rank
            shm = SharedAllReduce(segment_path(port), rank, size, create=False)
    store.set(f"attnserve/shm/{rank}", "1" if shm is not None else "0")
    store.set(f"attnserve/joined/{rank}", "1")
    group = TensorParallelGroup(rank, size, [])
    if store.get("attnserve/shm") == b"1":  # rank 0's decision, once every rank has answered
        group.shm = shm
    elif shm is not None:
        shm.close()
    dist.init_process_group(_backend(config.device), store=store, rank=rank, world_size=size, timeout=timeout)
    return _rank_config(config, local_rank), group


def _die_with_parent() -> None:
    """A worker started by rank 0 dies with it; Ctrl-C in a terminal is rank 0's to handle, not the workers'."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def node_worker_ranks(parallel: ParallelConfig) -> list[tuple[int, int]]:
    """(rank, local rank) of the ranks a headless node (node_rank > 0) runs."""
    per = parallel.ranks_per_node
    return [(parallel.node_rank * per + i, i) for i in range(per)]


def run_headless(config: EngineConfig) -> int:
    """A node other than rank 0's (mp): run its ranks as worker processes until rank 0 stops them. Returns an exit
    status: 0 when every worker ended cleanly."""
    port = config.parallel.master_port
    procs = [_spawn(config, rank, local, port) for rank, local in node_worker_ranks(config.parallel)]
    logger.info("%s: node %d runs ranks %s (pids %s), joining %s:%d", describe_layout(config.parallel, config.device),
                config.parallel.node_rank, [r for r, _ in node_worker_ranks(config.parallel)],
                [p.pid for p in procs], config.parallel.master_addr, port)

    def stop(signum, frame):  # SIGTERM/SIGINT: the workers go too
        for proc in procs:
            if proc.poll() is None:
                proc.kill()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return max((abs(proc.wait()) for proc in procs), default=0)
