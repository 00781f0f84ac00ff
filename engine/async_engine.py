"""The engine loop on its own thread, and the asyncio client the server uses.

The loop thread owns the LLMEngine: it builds it (loads, compiles and warms up the model), takes queued adds
and aborts, runs steps while there is work, and hands each request's delta outputs to that request's asyncio queue
with call_soon_threadsafe. So the event loop never waits on a forward pass (torch releases the GIL in its kernels),
and a forward pass never waits on HTTP.

NOTE: every torch computation of the engine runs on that one thread, start-up included. With OpenMP (torch's CPU
thread pool), each thread that starts a parallel region gets a team of worker threads of its own, and once a
process has more worker threads than cores, libgomp stops spinning between regions and puts its workers to sleep,
so every parallel region pays a futex wake-up. A model loaded on one thread and run on another thus ran 30% slower
on 2 cores (docs/benchmarks.md). The thread that builds the engine must be the one that steps it.

Backpressure: a request's undelivered output is bounded. When its caller stops taking outputs (an HTTP client that
does not read its stream blocks the handler that would take them), the request is paused once MAX_PENDING_ENTRIES
are waiting (its running samples are preempted, so it holds neither slots nor KV blocks nor engine time), and it
resumes when the caller has taken half of them. A caller that never comes back is the server's to abort
(--stream-write-timeout).

If the loop dies, the error is delivered to every waiting caller, `is_healthy` turns False, and new
requests fail fast with EngineDeadError: nothing hangs. A watchdog thread does the same when the loop stops
making progress (a step that never returns, as on a hung device): a supervisor polling /health then sees the
engine as dead and can restart the process, and no caller waits on a step that may never end.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.engine_info import EngineInfo
from engine.errors import EngineDeadError, ValidationError
from engine.core import EngineStats, PreparedRequest
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.stats import IterationStats, RequestTimes

logger = logging.getLogger(__name__)


class RequestStream:
    """Delta outputs of one request, ending after the output marked finished. An error in the engine is
    raised from the iteration. If the consumer leaves before the end, the request is aborted.

    It also keeps a running summary for request logs: tokens received, when the first of them arrived, each
    sample's finish reason, and the engine's timestamps once the request finished."""

    def __init__(self, request_id: str, queue: asyncio.Queue, abort: Callable[[str], None],
                 taken: Callable[[str, int], None]):
        self.request_id = request_id
        self._queue = queue
        self._abort = abort
        self._taken = taken  # told how many pending entries each output took off the queue
        self._done = False
        self.num_output_tokens = 0
        self.finish_reasons: dict[int, str] = {}  # sample index -> "stop" | "length" | "abort"
        self.metrics: RequestTimes | None = None
        # time.monotonic() when the first token reached the caller: a request cut short (client gone, engine
        # stopped) never gets `metrics`, which come with the finished output only.
        self.first_token_at: float | None = None
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled while waiting (e.g. the client disconnected)
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._taken(self.request_id, _entries(item))
        self._done = item.finished
        self._record(item, reached_the_caller=True)
        return item

    def _record(self, item: RequestOutput, reached_the_caller: bool) -> None:
        self.num_cached_tokens = item.num_cached_tokens
        for completion in item.outputs:
            self.num_output_tokens += len(completion.token_ids)
            if self.first_token_at is None and completion.token_ids and reached_the_caller:
                self.first_token_at = time.monotonic()
            if completion.finish_reason is not None:
                self.finish_reasons[completion.index] = completion.finish_reason
        if item.finished:
            self.metrics = item.metrics

    def __await__(self):
        # Lets callers write `stream = await engine.add_request(...)` as well.
        async def itself() -> RequestStream:
            return self

        return itself().__await__()

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._abort(self.request_id)
            # Outputs the engine produced that the caller never took (it left first): still part of the summary, so
            # a request the engine had finished keeps its finish reasons and token count in the request log.
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not isinstance(item, BaseException):
                    self._record(item, reached_the_caller=False)

    def __del__(self) -> None:
        if not self._done:
            self._abort(self.request_id)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput, or an exception to raise in the caller
    pending: int = 0  # entries (see _entries) put on the queue and not yet taken
    paused: bool = False  # the engine was told to pause the request; it resumes when half the entries are taken


class AsyncEngine:
    def __init__(self, build_engine: Callable[[], LLMEngine], watchdog_timeout_s: float | None = None):
        """Build the engine on the loop thread (see the module's NOTE on why there) and start the loop; an error in
        `build_engine` is raised here. `watchdog_timeout_s`: declare the engine dead when one turn of its loop (a
        step, or applying queued commands) takes longer than this; None turns the watchdog off."""
        self.engine: LLMEngine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams, _pending_adds and _dead_error across threads
        self._dead_error: BaseException | None = None
        self._pending_adds = 0  # queued "add" commands the loop has not applied yet
        # monotonic time at which the loop last began a turn; an idle loop wakes at least every _IDLE_WAIT_S
        self._heartbeat = time.monotonic()
        self._shutdown_reason = "engine was shut down"
        self._stopping = threading.Event()
        self._stats_listeners: list[Callable[[IterationStats], None]] = []
        self._ids = itertools.count()
        built: Future[None] = Future()
        self._thread = threading.Thread(target=self._build_and_run, args=(build_engine, built),
                                        name="attnserve-engine", daemon=True)
        self._thread.start()
        built.result()  # raises the build's error, if any
        if watchdog_timeout_s is not None:
            threading.Thread(target=self._watch, args=(watchdog_timeout_s,), name="attnserve-watchdog",
                             daemon=True).start()
        if self.engine.info.tensor_parallel_size > 1:
            threading.Thread(target=self._watch_workers, name="attnserve-worker-monitor", daemon=True).start()

    @classmethod
    def from_args(cls, model: str | None = None, **kwargs) -> AsyncEngine:
        return cls(lambda: LLMEngine.from_args(model, **kwargs))

    @classmethod
    def from_config(cls, config: EngineConfig, *, watchdog_timeout_s: float | None = None) -> AsyncEngine:
        """Load the model and start the loop."""
        return cls(lambda: LLMEngine(config), watchdog_timeout_s=watchdog_timeout_s)

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    # ---- client side (event loop thread) -------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        return self._dead_error is None and self._thread.is_alive()

    @property
    def dead_reason(self) -> str | None:
        """Why the engine is not healthy (None while it is)."""
        if self._dead_error is not None:
            return str(self._dead_error)
        return None if self._thread.is_alive() else "the engine loop has exited"

    def stats(self) -> EngineStats:
        """A snapshot taken by the loop thread after its latest step."""
        return self._stats

    def add_stats_listener(self, listener: Callable[[IterationStats], None]) -> None:
        """Call `listener` on the engine thread with the measurements of each loop turn (see engine.stats). It must be
        quick and thread-safe (prometheus_client metrics are); an exception in it is logged, not raised."""
        self._stats_listeners.append(listener)
        self.engine.processor.collect_stats = True

    def num_waiting_requests(self) -> int:
        """Requests not yet running: the engine's waiting queue plus adds still in the command queue. Never below
        the true count (the snapshot is refreshed before the pending count drops), so admission control built on
        it cannot overshoot its bound."""
        with self._lock:
            return self._stats.num_waiting + self._pending_adds

    def prepare(self, prompt: str | list[int], params: SamplingParams | None = None,
                request_id: str | None = None, cache_salt: str | None = None, priority: int = 0,
                group: str | None = None) -> PreparedRequest:
        """Validate (raises ValidationError) without queueing; for callers that must answer errors before streaming.
        Requests of one `group` (e.g. the prompts of one HTTP request) count as one under the fair policy."""
        self._check_alive()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        return self.engine.prepare_request(request_id, prompt, params, cache_salt=cache_salt, priority=priority,
                                           group=group)

    def add_request(
        self, prompt: str | list[int] | PreparedRequest, params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> RequestStream:
        """Queue a request and return the async iterator of its delta outputs (`async for out in
        engine.add_request(...)`; awaiting it first also works). Must be called with an event loop running.
        Validation errors raise here, before anything is queued. Leaving the iteration early (e.g. a
        client disconnect) and calling `aclose()`, or dropping the stream, aborts the request."""
        req = prompt if isinstance(prompt, PreparedRequest) else self.prepare(prompt, params, request_id)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self._dead_error is not None:
                raise EngineDeadError(f"the engine is not running: {self._dead_error}")
            if req.request_id in self._streams:
                raise ValidationError(f"request id {req.request_id!r} is already in use", "request_id")
            self._streams[req.request_id] = stream
            self._pending_adds += 1
        self._commands.put(("add", req))
        return RequestStream(req.request_id, stream.queue, self.abort, self._taken)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def _taken(self, request_id: str, entries: int) -> None:
        """The caller took an output of `entries`; resume its request if it was paused and is now half drained."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None:
                return
            stream.pending -= entries
            resume = stream.paused and stream.pending <= MAX_PENDING_ENTRIES // 2
            if resume:
                stream.paused = False
        if resume:
            self._commands.put(("resume", request_id))

    def shutdown(self, timeout: float | None = 10.0, reason: str = "engine was shut down") -> None:
        """Stop the loop; requests still in flight end with EngineDeadError(reason)."""
        self._shutdown_reason = reason
        self._stopping.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout)
        if self._thread.is_alive():
            if self._dead_error is None:
                # The loop is stuck inside a step: end the requests now rather than leave their callers waiting on it.
                self._fail_all(EngineDeadError(reason))
            if self._kill_workers():  # a step blocked on a hung tensor-parallel rank now fails: let the loop end
                self._thread.join(5.0)

    def _kill_workers(self) -> bool:
        """Kill the tensor-parallel workers, if any (any thread): a step blocked on a hung rank then fails and returns.
        Returns whether there were any."""
        engine = getattr(self, "engine", None)
        if engine is None or engine.info.tensor_parallel_size == 1:
            return False
        engine.shutdown(kill=True)
        return True

    def _check_alive(self) -> None:
        if not self.is_healthy:
            raise EngineDeadError(f"the engine is not running: {self.dead_reason}")

    # ---- loop side (engine thread) -------------------------------------------------------------

    def _build_and_run(self, build_engine: Callable[[], LLMEngine], built: Future[None]) -> None:
        try:
            self.engine = build_engine()
            self._stats = self.engine.stats()
            self._heartbeat = time.monotonic()  # the build may outlast the watchdog's timeout; it is not a stall
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor, which raises it in the caller
            built.set_exception(exc)
            return
        built.set_result(None)
        self._run()

    def _run(self) -> None:
        try:
            # NOTE: a loop the watchdog declared dead stops here, even if its stalled step returns later.
            while not self._stopping.is_set() and self._dead_error is None:
                self._heartbeat = time.monotonic()
                self.engine.check_health()
                # NOTE: paused requests are unfinished but give the loop nothing to do: it waits for commands.
                outputs = self._drain_commands(block=not self.engine.has_schedulable_requests())
                if self.engine.has_schedulable_requests():
                    outputs += self.engine.step()
                # NOTE: report the measurements first, then refresh the snapshot, then deliver: a caller that saw
                # its request finish, or saw the engine idle, never reads stats or metrics that still lack it.
                self._report_stats()
                self._stats = self.engine.stats()
                for out in outputs:
                    self._deliver(out)
        except BaseException as exc:  # noqa: BLE001 - any loop failure must reach every waiting caller
            logger.exception("engine loop died")
            self._fail_all(exc)
            return
        finally:
            self.engine.shutdown()  # the thread that drove the tensor-parallel ranks stops them
        if self._dead_error is None:  # else the watchdog has already failed everything, with its reason
            self._fail_all(EngineDeadError(self._shutdown_reason))

    def _report_stats(self) -> None:
        if not self._stats_listeners:
            return
        stats = self.engine.pop_iteration_stats()
        if stats.is_empty:
            return
        for listener in self._stats_listeners:
            try:
                listener(stats)
            except Exception:  # noqa: BLE001 - metrics must never take the engine down
                logger.exception("stats listener failed")

    def _drain_commands(self, block: bool) -> list[RequestOutput]:
        """Apply queued adds and aborts; returns the final outputs of aborted requests."""
        outputs: list[RequestOutput] = []
        added = 0
        while True:
            try:
                kind, arg = self._commands.get(block=block, timeout=_IDLE_WAIT_S if block else None)
            except queue.Empty:
                break
            block = False
            if kind == "add":
                added += 1
                try:
                    self.engine.add_prepared(arg)
                except Exception as exc:  # noqa: BLE001 - a bad request must not take the loop down
                    self._deliver_error(arg.request_id, exc)
            elif kind == "abort":
                out = self.engine.abort_request(arg)
                if out is not None:
                    outputs.append(out)
            elif kind == "resume":
                self.engine.resume_request(arg)
        if added:
            # NOTE: snapshot first, then drop the pending count: num_waiting_requests may overcount for a moment,
            # never undercount.
            self._stats = self.engine.stats()
            with self._lock:
                self._pending_adds -= added
        return outputs

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
            if stream is None:
                return
            stream.pending += _entries(out)
            pause = not out.finished and not stream.paused and stream.pending > MAX_PENDING_ENTRIES
            stream.paused |= pause
        _put(stream, out)
        if pause:
            self.engine.pause_request(out.request_id)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            _put(stream, exc)

    def _watch(self, timeout_s: float) -> None:
        """Watchdog thread: fail everything once the loop has spent more than timeout_s in one turn."""
        while not self._stopping.wait(min(1.0, timeout_s / 4)):
            if self._dead_error is not None or not self._thread.is_alive():
                return
            stalled = time.monotonic() - self._heartbeat
            if stalled > timeout_s:
                logger.error("engine loop stalled: no progress for %.1f s (watchdog timeout %g s); the engine is "
                             "now reported dead", stalled, timeout_s)
                self._fail_all(EngineDeadError(f"the engine loop stalled: one step took longer than the watchdog "
                                               f"timeout of {timeout_s:g} s"))
                self._kill_workers()  # a hung tensor-parallel rank: its peers' blocked step then fails and returns
                return

    def _watch_workers(self) -> None:
        """Tensor parallelism: check the workers from this thread too. The loop sees a dead or stopped worker at its
        next collective or turn, but a collective that waits without checking (any gloo or NCCL call that is not
        rank 0's CPU wait) would hold it until the collective's own timeout, minutes away. If the loop has not
        ended a second after a failed check, this fails everything with the check's reason and kills the workers,
        which unblocks the loop, as the stall watchdog does."""
        failing_since = None
        while not self._stopping.wait(_WORKER_CHECK_S):
            if self._dead_error is not None or not self._thread.is_alive():
                return
            try:
                self.engine.check_health()
                failing_since = None
            except Exception as exc:  # noqa: BLE001 - the check's reason is what every caller should see
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since >= 1.0 and self._dead_error is None:
                    logger.error("a tensor-parallel worker failed and the engine loop has not noticed: %s", exc)
                    self._fail_all(exc)
                    self._kill_workers()
                    return

    def _fail_all(self, exc: BaseException) -> None:
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine loop died: {exc!r}")
        with self._lock:
            # The first reason stands: a later failure (a step that a killed worker made fail) is its consequence.
            self._dead_error = error = self._dead_error or error
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            _put(stream, error)


# Output entries (a token, or one of its top logprobs) a request may have waiting for its caller before it is paused:
# at most about half a MB of Python objects (a top logprob is a (token id, logprob) tuple of about 120 bytes).
MAX_PENDING_ENTRIES = 4096
_IDLE_WAIT_S = 0.5  # how long an idle loop blocks on the command queue before its next turn (and heartbeat)
_WORKER_CHECK_S = 0.5  # how often the worker monitor checks the tensor-parallel workers


def _entries(out: RequestOutput) -> int:
    """An output's size for backpressure: its tokens and their top logprobs (prompt logprobs come once, at the start,
    and are bounded by the server's size cap instead)."""
    return sum(len(c.token_ids) + sum(len(lp.top) for lp in c.logprobs or ()) for c in out.outputs)


def _put(stream: _Stream, item: RequestOutput | BaseException) -> None:
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
    except RuntimeError:
        pass  # that caller's event loop is already closed; nobody is listening
