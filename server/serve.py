"""Running the server: bind, load the model, log what was loaded, serve, and drain on SIGTERM/SIGINT.

The drain: new requests get 503 (the socket stays open so they get an answer rather than a refused connection),
in-flight requests have --shutdown-timeout seconds to finish, then the engine stops, which ends what is left with
an error (an error event for streams), and the process exits 0. A second signal cuts the grace short: every open
request ends at once (streams with their error event and `data: [DONE]`), they get a moment to flush, and the process
exits 0 without waiting for connections; a third exits immediately.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys

import uvicorn

from engine.async_engine import AsyncEngine
from engine.engine_args import EngineArgs
from engine.errors import AttnServeError
from engine.engine_info import EngineInfo
from engine.tp_worker import run_worker_node
from server import accept_errors
from server.app import build_app
from server.config import DEFAULT_MODEL_NAME, ServerConfig
from server.http_protocol import protocol_class
from server.logs import DEFAULT_STATS_INTERVAL_S, STATS_INTERVAL_ENV, configure_logging, log_stats_periodically

logger = logging.getLogger("attnserve")
# A GPU step takes milliseconds to a few seconds; two minutes without one returning means a hung device.
DEFAULT_CUDA_WATCHDOG_S = 120.0
# After a second signal has ended every open request, how long their last events get to reach the clients.
_FLUSH_S = 1.0


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: ours drains first, and exits 0 (uvicorn re-raises the signal)."""

    @contextlib.contextmanager
    def capture_signals(self):  # uvicorn >= 0.29
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


def _fail(message: str) -> int:
    print(f"attnserve: error: {message}", file=sys.stderr)
    return 1


def bind_socket(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = accept_errors.ListeningSocket(family, kind, proto)  # accept() backs off when out of descriptors
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def warn_if_exposed(sock: socket.socket, api_key: str | None) -> bool:
    """Warn (and return True) when the server listens beyond loopback with no API key."""
    host = sock.getsockname()[0]
    try:
        loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        loopback = False
    if loopback or api_key:
        return False
    logger.warning("listening on %s without --api-key: anyone who can reach this port can use the model; "
                   "set --api-key (or $ATTNSERVE_API_KEY), or listen on 127.0.0.1", host)
    return True


def engine_args_from(args: argparse.Namespace) -> EngineArgs:
    extra = {} if args.kv_cache_memory is None else {"kv_cache_memory": args.kv_cache_memory}
    return EngineArgs(
        model=args.model, revision=args.revision, chat_template=args.chat_template, device=args.device, dtype=args.dtype, seed=args.seed, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_chunked_prefill=args.enable_chunked_prefill,
        enable_prefix_caching=args.enable_prefix_caching, scheduling_policy=args.scheduling_policy,
        speculative_config=args.speculative_config, tensor_parallel_size=args.tensor_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend, nnodes=args.nnodes, node_rank=args.node_rank,
        master_addr=args.master_addr, master_port=args.master_port,
        attention_backend=args.attention_backend, load_format=args.load_format, enforce_eager=args.enforce_eager,
        **extra,
    )


def serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    logging.getLogger("uvicorn.access").disabled = args.disable_access_log
    if _is_worker_node(args):
        return _serve_headless(args)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        return _fail(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
    try:
        engine_config = engine_args_from(args).create_config()
        watchdog = args.engine_watchdog_timeout
        if watchdog is None:  # a hung device, or a hung tensor-parallel rank, must not hold requests forever
            hangs = engine_config.device.type == "cuda" or engine_config.parallel.tensor_parallel_size > 1
            watchdog = DEFAULT_CUDA_WATCHDOG_S if hangs else 0.0
        async_engine = AsyncEngine.from_config(engine_config, watchdog_timeout_s=watchdog or None)
    except AttnServeError as exc:
        return _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - one clear line for an operator; the traceback at debug level
        logger.debug("model load failed", exc_info=True)
        return _fail(f"could not load the model: {type(exc).__name__}: {exc}")
    names = tuple(args.served_model_name or [args.model if args.model is not None else DEFAULT_MODEL_NAME])
    _log_loaded(async_engine.info, args.model is None)
    config = ServerConfig(
        served_model_names=names, api_key=args.api_key, max_queued_requests=args.max_queued_requests,
        max_body_bytes=args.max_request_body_size, shutdown_timeout_s=args.shutdown_timeout,
        log_requests=not args.disable_log_requests, log_prompts=args.log_prompts,
        allowed_origins=tuple(args.allowed_origins), max_header_bytes=args.max_header_size,
        body_timeout_s=args.request_body_timeout, limit_concurrency=args.limit_concurrency,
        max_request_tokens=args.max_request_tokens, max_response_logprobs=args.max_response_logprobs,
        request_head_timeout_s=args.request_head_timeout, max_connections=args.max_connections or None,
        stream_write_timeout_s=args.stream_write_timeout,
        tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
    )
    warn_if_exposed(sock, args.api_key)
    app = build_app(async_engine, config)
    server = _Server(uvicorn_config(app, config, timeout_keep_alive=args.timeout_keep_alive,
                                    access_log=not args.disable_access_log))
    try:
        stats_interval = None if args.disable_log_stats else _stats_interval()
        asyncio.run(_serve(server, sock, app.state.ctx, names, stats_interval))
    finally:
        async_engine.shutdown(timeout=5.0)
        sock.close()
    logger.info("shut down")
    return 0


def _is_worker_node(args: argparse.Namespace) -> bool:
    """Does this process run tensor-parallel ranks only, without HTTP: a --headless node (any node but 0), or a rank
    other than 0 under torchrun?"""
    if args.distributed_executor_backend == "external_launcher":
        return os.environ.get("RANK", "0") != "0"
    return args.headless or args.node_rank > 0


def _serve_headless(args: argparse.Namespace) -> int:
    if args.distributed_executor_backend == "mp" and args.node_rank == 0:
        return _fail("--headless runs the ranks of a node other than node 0 (--node-rank >= 1); node 0 serves HTTP")
    try:
        config = engine_args_from(args).create_config()
    except AttnServeError as exc:
        return _fail(str(exc))
    status = run_worker_node(config)
    logger.info("tensor-parallel ranks of this node stopped (status %d)", status)
    return status


def uvicorn_config(app, config: ServerConfig, *, timeout_keep_alive: float = 5.0,
                   access_log: bool = True) -> uvicorn.Config:
    """The uvicorn settings every server of ours runs with (tests included, so they see the same limits)."""
    return uvicorn.Config(app, log_config=None, lifespan="off", access_log=access_log, timeout_graceful_shutdown=5,
                          timeout_keep_alive=timeout_keep_alive,
                          http=protocol_class(config.request_head_timeout_s, config.max_connections,
                                              config.stream_write_timeout_s),
                          h11_max_incomplete_event_size=config.max_header_bytes)


def _log_loaded(info: EngineInfo, builtin: bool) -> None:
    logger.info("loaded %s from %s: %.1fM parameters, dtype %s, device %s", info.architecture, info.model_path,
                info.num_parameters / 1e6, str(info.dtype).removeprefix("torch."), info.device)
    blocks, block_size = info.num_kv_blocks, info.block_size
    logger.info("KV cache: %d blocks x %d tokens = %d tokens of capacity; max_model_len %d, max_num_seqs %d, "
                "max_num_batched_tokens %d, prefix caching %s", blocks, block_size, blocks * block_size,
                info.max_model_len, info.max_num_seqs, info.max_num_batched_tokens,
                "on" if info.enable_prefix_caching else "off")
    if info.tensor_parallel_size > 1:
        logger.info("%s; KV blocks are per rank, each holding its share of the KV heads", info.parallel_layout)
    if builtin:
        logger.info("serving the built-in demo model: a small Python code-completion model trained on the standard "
                    "library (models/demo/README.md); it completes code, it does not chat. Pass --model DIR to "
                    "serve another model.")


def _stats_interval() -> float:
    text = os.environ.get(STATS_INTERVAL_ENV)
    try:
        value = float(text) if text else DEFAULT_STATS_INTERVAL_S
    except ValueError:
        value = -1.0
    if not value > 0:
        logger.warning("%s=%r is not a positive number of seconds; using %g", STATS_INTERVAL_ENV, text,
                       DEFAULT_STATS_INTERVAL_S)
        value = DEFAULT_STATS_INTERVAL_S
    return value


async def _serve(server: _Server, sock: socket.socket, ctx, names: tuple[str, ...],
                 stats_interval: float | None) -> None:
    loop = asyncio.get_running_loop()
    draining: asyncio.Task | None = None
    hurrying: asyncio.Task | None = None

    def on_signal(sig: signal.Signals) -> None:
        nonlocal draining, hurrying
        if draining is None:
            logger.info("received %s: draining", sig.name)
            draining = loop.create_task(_drain(server, ctx))
        elif hurrying is None:
            logger.warning("received %s again: ending %s now and exiting", sig.name,
                           plural(ctx.state.in_flight, "open request"))
            hurrying = loop.create_task(_exit_now(server, ctx))
        else:
            logger.warning("received %s a third time: exiting immediately", sig.name)
            server.should_exit = server.force_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    accept_errors.install(loop, ctx.config.max_connections)
    # A forced exit cancels whatever uvicorn still runs; that is the exit asked for, not an application error.
    quiet = _DropCancelledTracebacks()
    logging.getLogger("uvicorn.error").addFilter(quiet)
    background = [loop.create_task(_announce(server, sock, names))]
    if stats_interval is not None:
        background.append(loop.create_task(log_stats_periodically(ctx.engine, stats_interval)))
    try:
        await server.serve(sockets=[sock])
    finally:
        for task in background:
            task.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        logging.getLogger("uvicorn.error").removeFilter(quiet)


async def _announce(server: _Server, sock: socket.socket, names: tuple[str, ...]) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    logger.info("listening on http://%s:%d (model name: %s)", shown, port, ", ".join(names))


async def _drain(server: _Server, ctx) -> None:
    state, engine = ctx.state, ctx.engine
    state.draining = True
    timeout = ctx.config.shutdown_timeout_s
    if state.in_flight:
        logger.info("waiting up to %gs for %s", timeout, plural(state.in_flight, "in-flight request"))
        try:
            await asyncio.wait_for(state.idle.wait(), timeout)
        except asyncio.TimeoutError:
            logger.warning("shutdown timeout: aborting %s", plural(state.in_flight, "request"))
    loop = asyncio.get_running_loop()
    # Stopping the engine ends every request still running with an error (an error event on a stream).
    await loop.run_in_executor(None, lambda: engine.shutdown(timeout=5.0, reason="the server is shutting down"))
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(state.idle.wait(), 5.0)
    server.should_exit = True


async def _exit_now(server: _Server, ctx) -> None:
    """The second signal: no more grace. Stopping the engine ends every open request with an error (a stream gets
    its error event and [DONE]); they have a moment to flush, then uvicorn stops without waiting for connections."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: ctx.engine.shutdown(timeout=1.0,
                                                                 reason="the server is shutting down now"))
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(ctx.state.idle.wait(), _FLUSH_S)
    server.should_exit = server.force_exit = True


class _DropCancelledTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
