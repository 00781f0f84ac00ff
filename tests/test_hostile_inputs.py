"""A catalogue of hostile inputs, each sent to a live server on loopback.

One parametrized test walks the table below. For every case it sends the hostile request (through httpx, or through
a raw socket where httpx cannot produce the bytes: HTTP/1.0, lying Content-Length, trickled heads and bodies, 50 MB
uploads), asserts the exact HTTP status and, for a JSON error, OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}` with `code` equal to the status, and then checks that the same
server still answers a normal completion. The last test checks that the engine ended idle with every KV block free.

Two in-process servers: the main one has an API key (every case except the auth ones sends it) and a short body
timeout; the second serves a copy of the checkpoint whose chat template tries to reach Python internals (it must be
refused with a 400 naming the chat template, and nothing in it may run).

Every network wait is bounded: sockets carry timeouts, and trickling senders stop as soon as the server answers.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from checkpoints import copy_with_chat_template
from server_process import InProcessServer

MODEL = "test-model"
MAX_MODEL_LEN = 128
API_KEY = "sk-hostile-test-key"
AUTH = {"authorization": f"Bearer {API_KEY}"}
BODY_TIMEOUT_S = 1.5  # the main server's body timeout: slow bodies get 408 after this
MAX_BODY = 4 * 1024 * 1024  # ServerConfig defaults, left as they are
MAX_HEAD = 64 * 1024
IO_TIMEOUT_S = 15.0  # no single exchange may take longer than this

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ROUTES = {"completions": COMPLETIONS, "chat": CHAT}
BASE = {
    COMPLETIONS: {"model": MODEL, "prompt": "Hello", "max_tokens": 2},
    CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2},
}
# The normal request every case is followed by: greedy, two tokens, never stopped early.
PROBE = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 2, "temperature": 0, "ignore_eos": True}

ERROR_TYPES = {  # server/errors.py
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    431: "RequestHeaderFieldsTooLargeError",
}
ANY = object()  # "param" not checked


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(make_ckpt) -> Path:
    return make_ckpt("llama")


@pytest.fixture(scope="module")
def server(llama):
    with InProcessServer(llama, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, num_kv_blocks=64,
                         server_kwargs={"api_key": API_KEY, "body_timeout_s": BODY_TIMEOUT_S}) as srv:
        yield srv


@pytest.fixture(scope="module")
def vocab_size(server) -> int:
    return server.engine.engine.info.vocab_size


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    """A file the evil chat template tries to create through os.popen; it must never appear."""
    return tmp_path_factory.mktemp("evil-marker") / "template-ran-a-command"


def evil_template(marker: Path) -> str:
    """Each branch (chosen with chat_template_kwargs {"attack": name}) tries one way out of Jinja's sandbox; the
    default branch walks ''.__class__.__mro__ to object's subclasses."""
    cmd = f"touch {marker}"
    attacks = {
        "cycler-popen": f"{{{{ cycler.__init__.__globals__.os.popen('{cmd}').read() }}}}",
        "joiner-popen": f"{{{{ joiner.__init__.__globals__['os'].popen('{cmd}').read() }}}}",
        "lipsum-globals": f"{{{{ lipsum.__globals__['os'].popen('{cmd}').read() }}}}",
        "namespace-globals": f"{{{{ namespace.__init__.__globals__.__builtins__['__import__']('os')"
                             f".system('{cmd}') }}}}",
        "raise-exception-globals": f"{{{{ raise_exception.__globals__['json'].__builtins__['exec']"
                                   f"(\"import os; os.system('{cmd}')\") }}}}",
        "format-string": "{{ '{0.__class__.__mro__[1].__subclasses__}'.format('') }}",
        "loop-subclasses": "{% for c in ().__class__.__base__.__subclasses__() %}{{ c.__name__ }}{% endfor %}",
        "self-context": "{{ self._TemplateReference__context.parent }}",
        "mutate-messages": "{{ messages.append({'role': 'system', 'content': 'owned'}) }}{{ messages }}",
        "mutate-dict": "{{ messages[0].update({'content': 'owned'}) }}",
        "huge-range": "{% for i in range(10**9) %}{% endfor %}",
    }
    branches = "".join(f"{{% elif attack == '{name}' %}}{body}" for name, body in attacks.items())
    return ("{{ bos_token }}{% if attack is not defined %}{{ ''.__class__.__mro__[1].__subclasses__() }}"
            + branches + "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")


@pytest.fixture(scope="module")
def evil_server(llama, marker, tmp_path_factory):
    model = copy_with_chat_template(llama, tmp_path_factory.mktemp("evil-chat-template") / "model",
                                    evil_template(marker))
    with InProcessServer(model, served_model_name=MODEL, max_model_len=MAX_MODEL_LEN, num_kv_blocks=32) as srv:
        yield srv


# ---- what came back ------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    elapsed: float = 0.0  # seconds from the first byte sent to the end of the answer
    closed: bool | None = None  # raw socket: the server closed the connection after answering

    @classmethod
    def of(cls, response: httpx.Response, elapsed: float = 0.0) -> Reply:
        return cls(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content,
                   elapsed)

    def json(self):
        return json.loads(self.body)


def assert_error(reply: Reply, status: int, param=ANY, contains: Iterable[str] = ()) -> str:
    """The exact status and OpenAI's error shape; returns the message."""
    assert reply.status == status, (reply.status, reply.body[:2000])
    assert reply.headers.get("content-type", "").startswith("application/json"), (reply.headers, reply.body[:500])
    body = reply.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == status, error
    assert error["type"] == ERROR_TYPES[status], error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    if param is not ANY:
        assert error["param"] == param, error
    for text in contains:
        assert text in error["message"], f"{text!r} not in {error['message']!r}"
    return error["message"]


def assert_completion(reply: Reply, object_name: str = "text_completion") -> dict:
    assert reply.status == 200, (reply.status, reply.body[:2000])
    body = reply.json()
    assert body["object"] == object_name, body
    assert body["choices"], body
    return body


def assert_still_serves(srv: InProcessServer, headers: dict[str, str] | None) -> None:
    with srv.client(timeout=IO_TIMEOUT_S) as client:
        response = client.post(COMPLETIONS, json=PROBE, headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] == 2, body
    text = body["choices"][0]["text"]
    assert isinstance(text, str) and text, body


# ---- sending -------------------------------------------------------------------------------------


def hostport(srv: InProcessServer) -> tuple[str, int]:
    host, port = srv.url.removeprefix("http://").split(":")
    return host, int(port)


def post(srv, path: str, *, json_body=None, content=None, headers: dict | None = None, auth: bool = True,
         content_type: str | None = "application/json") -> Reply:
    """One request through httpx; `content` is raw bytes (or an iterator of chunks: sent chunked)."""
    sent = dict(AUTH) if auth else {}
    if content is not None and content_type is not None:
        sent["content-type"] = content_type
    sent.update(headers or {})
    start = time.monotonic()
    with srv.client(timeout=IO_TIMEOUT_S) as client:
        response = client.post(path, json=json_body, content=content, headers=sent)
    return Reply.of(response, time.monotonic() - start)


def request_head(method: str, path: str, headers: dict[str, str] | list[tuple[str, str]], *, version="1.1",
                 body: bytes = b"", auth: bool = True, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1"]
    if auth:
        lines.append(f"Authorization: Bearer {API_KEY}")
    items = headers.items() if isinstance(headers, dict) else headers
    lines += [f"{name}: {value}" for name, value in items]
    if length is not None or body:
        lines.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def raw_exchange(srv, parts: Iterable[bytes | float], *, timeout: float = IO_TIMEOUT_S) -> Reply:
    """Send `parts` over a fresh connection (bytes are sent, a number is a pause in seconds) and read one answer.
    Sending stops as soon as the server answers (it may answer before the body is complete), and a server that
    resets the connection is tolerated as long as a complete answer arrived first."""
    start = time.monotonic()
    deadline = start + timeout
    sock = socket.create_connection(hostport(srv), timeout=timeout)
    try:
        answered = False
        for part in parts:
            if answered:
                break
            if isinstance(part, (int, float)):
                readable, _, _ = select.select([sock], [], [], part)
                answered = bool(readable)
                continue
            view = memoryview(part)
            while view and not answered:
                left = deadline - time.monotonic()
                assert left > 0, "timed out sending the request"
                readable, writable, _ = select.select([sock], [sock], [], left)
                if readable:
                    answered = True
                elif writable:
                    try:
                        view = view[sock.send(view[:1 << 20]):]
                    except (BrokenPipeError, ConnectionResetError):
                        answered = True  # the server stopped reading; its answer may be waiting
        reply = read_reply(sock, deadline)
        reply.elapsed = time.monotonic() - start
        if not reply.closed and "close" in reply.headers.get("connection", "").lower():
            reply.closed = _closes_soon(sock)
        return reply
    finally:
        sock.close()


def read_reply(sock: socket.socket, deadline: float) -> Reply:
    """Parse one HTTP/1.x response: Content-Length, chunked, or delimited by the server closing."""
    data = bytearray()
    closed = reset = False

    def more() -> bool:
        nonlocal closed, reset
        if closed:
            return False
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            chunk, reset = b"", True
        except socket.timeout:
            raise AssertionError(f"no complete HTTP answer in time; got {bytes(data[:500])!r}") from None
        if not chunk:
            closed = True
            return False
        data.extend(chunk)
        return True

    while b"\r\n\r\n" not in data:
        if not more():
            how = "was reset" if reset else "closed"
            raise AssertionError(f"the connection {how} before a complete HTTP answer; got {bytes(data[:500])!r}")
    head = bytes(data).partition(b"\r\n\r\n")[0]
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    match = re.fullmatch(r"HTTP/1\.[01] (\d{3})(?: .*)?", status_line)
    assert match, status_line
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    del data[:len(head) + 4]
    if "chunked" in headers.get("transfer-encoding", ""):
        body = bytearray()
        while True:
            while b"\r\n" not in data:
                assert more(), "the connection closed inside a chunked body"
            size_line, _, _ = bytes(data).partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            del data[:len(size_line) + 2]
            while len(data) < size + 2:
                assert more(), "the connection closed inside a chunk"
            body += data[:size]
            del data[:size + 2]
            if size == 0:
                break
    elif "content-length" in headers:
        size = int(headers["content-length"])
        while len(data) < size:
            assert more(), f"the connection closed after {len(data)} of {size} body bytes"
        body = data[:size]
    else:
        while more():
            pass
        body = data
    return Reply(int(match.group(1)), headers, bytes(body), closed=closed)


def _closes_soon(sock: socket.socket, wait: float = 2.0) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except (socket.timeout, OSError):
        return False


# ---- the cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    send: Callable  # (server, vocab_size) -> Reply
    status: int
    param: object = ANY
    contains: tuple[str, ...] = ()
    check: Callable[[Reply], None] | None = None  # further checks on the reply
    target: str = "main"  # or "evil": the server with the hostile chat template


CASES: list[Case] = []


def case(id: str, send: Callable, status: int, param=ANY, contains=(), check=None, target="main") -> None:
    assert id not in {c.id for c in CASES}, id
    CASES.append(Case(id, send, status, param, tuple(contains), check, target))


def fields(route: str, **changes) -> Callable:
    """A case sending BASE[route] with some fields replaced (a value of REMOVE drops the field)."""
    def send(srv, vocab):
        body = {k: v for k, v in {**BASE[route], **changes}.items() if v is not REMOVE}
        return post(srv, route, json_body=body)
    return send


def body_of(route: str, make: Callable[[int], dict]) -> Callable:
    """A case whose body depends on the vocabulary size."""
    def send(srv, vocab):
        return post(srv, route, json_body={**BASE[route], **make(vocab)})
    return send


def raw_body(route: str, content: bytes, content_type: str | None = "application/json", **kw) -> Callable:
    return lambda srv, vocab: post(srv, route, content=content, content_type=content_type, **kw)


REMOVE = object()


# 1. Wrong JSON types: every request field given a value of another JSON type is a 400 naming the field. (A whole
# float such as 2.0 may count as an integer; a fractional one may not.)
SHARED_MISTYPED = [
    ("model", 5), ("n", "2"), ("n", 1.5), ("n", True), ("temperature", "0.5"), ("temperature", False),
    ("top_p", [1]), ("presence_penalty", {}), ("frequency_penalty", None), ("logit_bias", ["5", 1]),
    ("logit_bias", {"5": "1"}), ("seed", "42"), ("stop", 7), ("stop", ["a", 7]), ("stream", "true"),
    ("stream_options", "yes"), ("user", 5), ("top_k", 1.5), ("min_p", "0.1"), ("repetition_penalty", "1"),
    ("min_tokens", "1"), ("stop_token_ids", 5), ("stop_token_ids", ["1"]), ("ignore_eos", "false"),
    ("skip_special_tokens", 0), ("include_stop_str_in_output", "no"), ("cache_salt", 5),
]
COMPLETION_MISTYPED = [
    ("prompt", 5), ("prompt", None), ("prompt", True), ("prompt", {"text": "hi"}), ("prompt", [1, "a"]),
    ("prompt", [[1], "a"]), ("prompt", [1.5]), ("max_tokens", "5"), ("max_tokens", 2.5), ("logprobs", True),
    ("echo", "true"), ("suffix", 5), ("best_of", "1"), ("add_special_tokens", "yes"),
]
CHAT_MISTYPED = [
    ("messages", "hi"), ("messages", {"role": "user", "content": "hi"}), ("messages", [["user", "hi"]]),
    ("messages", [{"role": 5, "content": "hi"}]), ("messages", [{"role": "user", "content": 5}]),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}]),
    ("messages", [{"role": "user", "content": "hi", "name": 5}]), ("max_tokens", "5"),
    ("max_completion_tokens", 2.5), ("logprobs", 1), ("top_logprobs", "2"), ("response_format", "text"),
    ("response_format", {"type": 5}), ("tools", {}), ("tools", ["x"]), ("add_generation_prompt", "yes"),
    ("continue_final_message", 1), ("chat_template_kwargs", []),
]
for _name, _route in ROUTES.items():
    for _field, _value in SHARED_MISTYPED + (COMPLETION_MISTYPED if _route == COMPLETIONS else CHAT_MISTYPED):
        case(f"{_name}-type-{_field}={json.dumps(_value)}", fields(_route, **{_field: _value}), 400, _field, [_field])
case("completions-type-stream_options.include_usage",
     fields(COMPLETIONS, stream=True, stream_options={"include_usage": "yes"}), 400, "stream_options",
     ["stream_options"])

# 2. Numbers: NaN, Infinity, 1e999 (an infinite float), and integers no 64-bit type holds.
for _name, _route, _raw, _field in [
    ("completions", COMPLETIONS, b'"temperature": NaN', "temperature"),
    ("completions", COMPLETIONS, b'"top_p": Infinity', "top_p"),
    ("completions", COMPLETIONS, b'"max_tokens": 1e999', "max_tokens"),
    ("completions", COMPLETIONS, b'"n": -Infinity', "n"),
    ("completions", COMPLETIONS, b'"logit_bias": {"5": NaN}', "logit_bias"),
    ("chat", CHAT, b'"temperature": NaN', "temperature"),
    ("chat", CHAT, b'"frequency_penalty": 1e999', "frequency_penalty"),
    ("chat", CHAT, b'"seed": Infinity', "seed"),
]:
    _content = json.dumps(BASE[_route]).encode()[:-1] + b", " + _raw + b"}"
    _shown = _raw.decode().replace('": ', "=").replace('"', "")
    case(f"{_name}-raw-{_shown}", raw_body(_route, _content), 400, _field, [_field])
case("completions-max_tokens-5000-digit-integer",  # more digits than Python's int parser allows
     raw_body(COMPLETIONS, b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}"), 400, None)

# 3. Out-of-range values.
for _name, _route in ROUTES.items():
    for _field, _value in [("max_tokens", -1), ("max_tokens", 0), ("n", 10**6), ("temperature", -0.5),
                           ("top_p", 0), ("top_p", 1.0000001), ("top_k", -2)]:
        if _route == COMPLETIONS and (_field, _value) == ("max_tokens", 0):
            continue  # completions take 0: the prompt is scored, nothing is generated (test_prompt_logprobs.py)
        case(f"{_name}-{_field}={_value}", fields(_route, **{_field: _value}), 400, _field, [_field])
    for _value in (10**12, 2**64, 10**400):  # fits no context: 400 naming max_tokens and the limit
        _id = "10**400" if _value == 10**400 else str(_value)
        case(f"{_name}-max_tokens={_id}", fields(_route, max_tokens=_value), 400, "max_tokens",
             ["max_tokens", str(MAX_MODEL_LEN)])
case("completions-top_k=-2**63", fields(COMPLETIONS, top_k=-2**63), 400, "top_k", ["top_k"])
case("completions-seed=2**64", fields(COMPLETIONS, seed=2**64), 400, "seed", ["seed"])
case("chat-seed=-2**63-1", fields(CHAT, seed=-2**63 - 1), 400, "seed", ["seed"])
case("chat-max_completion_tokens=10**12", fields(CHAT, max_completion_tokens=10**12), 400, "max_tokens",
     ["max_tokens"])

# 4. Empty and missing prompts and messages. The engine refuses an empty string even though the tokenizer would
# add a BOS (the API answers "a prompt needs at least one character or token").
for _id, _prompt in [("empty-string", ""), ("empty-list", []), ("list-of-empty-string", [""]),
                     ("list-of-empty-list", [[]])]:
    case(f"completions-prompt-{_id}", fields(COMPLETIONS, prompt=_prompt), 400, "prompt", ["prompt", "empty"])
case("completions-prompt-missing", fields(COMPLETIONS, prompt=REMOVE), 400, "prompt", ["prompt", "required"])
case("completions-prompt-257-prompts", fields(COMPLETIONS, prompt=["x"] * 257), 400, "prompt", ["prompt"])
case("completions-prompt-whitespace-only", fields(COMPLETIONS, prompt=" "), 200, check=assert_completion)
case("completions-prompt-nul-and-controls", fields(COMPLETIONS, prompt="\x00\x01\x1b[2J\x7f"), 200,
     check=assert_completion)
case("chat-messages-empty", fields(CHAT, messages=[]), 400, "messages", ["messages"])
case("chat-messages-missing", fields(CHAT, messages=REMOVE), 400, "messages", ["messages", "required"])
case("chat-message-without-content", fields(CHAT, messages=[{"role": "user"}]), 400, "messages",
     ["messages", "content"])
case("chat-message-without-role", fields(CHAT, messages=[{"content": "hi"}]), 400, "messages", ["messages"])
case("chat-message-empty-object", fields(CHAT, messages=[{}]), 400, "messages", ["messages"])
# The checkpoint's ChatML template allows system, user and assistant and raises for the rest.
for _role in ("tool", "developer"):
    case(f"chat-role-{_role}-refused-by-template", fields(CHAT, messages=[{"role": _role, "content": "hi"}]), 400,
         "messages", ["Unsupported role", _role])
# With stream: true the same refusals still come before the 200, as JSON errors (not as events in a stream).
case("completions-stream-empty-prompt", fields(COMPLETIONS, prompt="", stream=True), 400, "prompt", ["prompt"])
case("chat-stream-role-tool-refused-by-template",
     fields(CHAT, messages=[{"role": "tool", "content": "hi"}], stream=True), 400, "messages", ["Unsupported role"])
case("chat-role-unknown", fields(CHAT, messages=[{"role": "root", "content": "hi"}]), 400, "messages",
     ["messages", "role"])
case("chat-3000-messages-over-context",
     fields(CHAT, messages=[{"role": "user", "content": "hi"}] * 3000), 400, "prompt", [str(MAX_MODEL_LEN)])

# 5. Token ids outside the vocabulary; prompts at and over max_model_len; a prompt of 10^6 ids.
for _id, _make in [("minus-1", lambda v: [-1]), ("vocab-size", lambda v: [v]), ("2**63", lambda v: [2**63]),
                   ("2**64", lambda v: [5, 2**64]), ("second-prompt-2**63", lambda v: [[5], [5, 2**63]])]:
    case(f"completions-token-id-{_id}", body_of(COMPLETIONS, lambda v, m=_make: {"prompt": m(v)}), 400, "prompt",
         ["prompt", "vocabulary"])
case("completions-token-id-bool", fields(COMPLETIONS, prompt=[True]), 400, "prompt", ["prompt"])
case("detokenize-token-id-2**63", lambda srv, vocab: post(srv, "/detokenize", json_body={"tokens": [2**63]}), 400,
     "tokens", ["tokens"])
case("completions-prompt-1e6-ids-6MB-body", fields(COMPLETIONS, prompt=[1000] * 10**6), 413, None,
     [str(MAX_BODY)])
case("completions-prompt-1e6-ids-compact-2MB-body",
     raw_body(COMPLETIONS, b'{"prompt":[' + b"5," * (10**6 - 1) + b'5],"max_tokens":1}'), 400, "prompt",
     [str(MAX_MODEL_LEN), str(10**6)])


def _fills_context(reply: Reply) -> None:
    usage = assert_completion(reply)["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == \
        (MAX_MODEL_LEN - 1, 1, MAX_MODEL_LEN), usage


case("completions-prompt-max_model_len-ids-max_tokens-1", fields(COMPLETIONS, prompt=[5] * MAX_MODEL_LEN,
                                                                 max_tokens=1), 400, "prompt",
     [str(MAX_MODEL_LEN), str(MAX_MODEL_LEN - 1)])
case("completions-prompt-max_model_len-ids-default-max_tokens",
     fields(COMPLETIONS, prompt=[5] * MAX_MODEL_LEN, max_tokens=REMOVE), 400, "prompt", [str(MAX_MODEL_LEN)])
case("completions-prompt-max_model_len-minus-1-ids-max_tokens-2",
     fields(COMPLETIONS, prompt=[5] * (MAX_MODEL_LEN - 1), max_tokens=2), 400, "max_tokens",
     [str(MAX_MODEL_LEN), str(MAX_MODEL_LEN + 1)])
case("completions-prompt-max_model_len-minus-1-ids-max_tokens-1",  # exactly fills the context: allowed
     fields(COMPLETIONS, prompt=[5] * (MAX_MODEL_LEN - 1), max_tokens=1), 200, check=_fills_context)
case("completions-prompt-text-over-context", fields(COMPLETIONS, prompt="hello " * 2000), 400, "prompt",
     [str(MAX_MODEL_LEN)])

# 6. Stop strings and logit_bias at absurd sizes.
for _name, _route in ROUTES.items():
    case(f"{_name}-stop-10000-strings", fields(_route, stop=[f"s{i}" for i in range(10_000)]), 400, "stop",
         ["stop", "16"])
    case(f"{_name}-stop-1MB-string", fields(_route, stop="x" * 1_000_000), 400, "stop", ["stop", "256"])
    case(f"{_name}-logit_bias-1e5-entries", fields(_route, logit_bias={str(i): 1.0 for i in range(100_000)}), 400,
         "logit_bias", ["logit_bias", "1024"])
    case(f"{_name}-logit_bias-token-vocab-size", body_of(_route, lambda v: {"logit_bias": {str(v): 5}}), 400,
         "logit_bias", ["logit_bias", "vocabulary"])
case("completions-logit_bias-token-minus-1", fields(COMPLETIONS, logit_bias={"-1": 5}), 400, "logit_bias",
     ["logit_bias"])
case("completions-logit_bias-token-2**70", fields(COMPLETIONS, logit_bias={str(2**70): 5}), 400, "logit_bias",
     ["logit_bias"])
case("completions-logit_bias-token-not-a-number", fields(COMPLETIONS, logit_bias={"__class__": 5}), 400,
     "logit_bias", ["logit_bias"])
case("completions-stop_token_ids-1e5", fields(COMPLETIONS, stop_token_ids=list(range(100_000))), 400,
     "stop_token_ids", ["stop_token_ids"])
case("chat-stop_token_ids-vocab-size", body_of(CHAT, lambda v: {"stop_token_ids": [v]}), 400, "stop_token_ids",
     ["stop_token_ids", "vocabulary"])

# 7. Deep nesting (Python's JSON parser has a recursion limit) and broken bodies.
_DEEP = 10_000
case("completions-prompt-nested-depth-10000",
     raw_body(COMPLETIONS, b'{"prompt": ' + b"[" * _DEEP + b"1" + b"]" * _DEEP + b"}"), 400, None)
case("completions-body-nested-array-depth-10000", raw_body(COMPLETIONS, b"[" * _DEEP + b"]" * _DEEP), 400, None)
case("chat-body-nested-object-depth-10000",
     raw_body(CHAT, b'{"a":' * _DEEP + b"1" + b"}" * _DEEP), 400, None)
case("chat-body-nested-depth-100000", raw_body(CHAT, b"[" * 100_000), 400, None)
case("completions-prompt-nested-depth-200",  # under the parser's limit: the prompt's type is wrong
     raw_body(COMPLETIONS, b'{"prompt": ' + b"[" * 200 + b"1" + b"]" * 200 + b"}"), 400, "prompt", ["prompt"])
case("chat-template-kwargs-nested-depth-200",  # deep but well-formed values the template never reads are fine
     raw_body(CHAT, json.dumps(BASE[CHAT]).encode()[:-1] + b', "chat_template_kwargs": {"x": '
              + b"[" * 200 + b"]" * 200 + b"}}"), 200, check=lambda r: assert_completion(r, "chat.completion"))
case("completions-truncated-json", raw_body(COMPLETIONS, json.dumps(BASE[COMPLETIONS]).encode()[:-9]), 400, None,
     ["JSON"])
case("chat-truncated-json", raw_body(CHAT, json.dumps(BASE[CHAT]).encode()[:-2]), 400, None, ["JSON"])
case("completions-empty-body", raw_body(COMPLETIONS, b""), 400, None)
case("completions-duplicate-key-last-wins",
     raw_body(COMPLETIONS, b'{"prompt": "x", "max_tokens": 1, "max_tokens": 1000000}'), 400, "max_tokens")

# 8. Bodies over the 4 MiB limit, declared or chunked; bodies that lie about their length.
_FIFTY_MB = 50 * 1024 * 1024


def _big_body() -> bytes:
    head = json.dumps(BASE[COMPLETIONS]).encode()
    return head[:-1] + b" " * (_FIFTY_MB - len(head)) + b"}"


def fifty_mb_content_length(srv, vocab):
    body = _big_body()
    return raw_exchange(srv, [request_head("POST", COMPLETIONS, {"Content-Type": "application/json"}, length=len(body)),
                              body])


def fifty_mb_chunked(srv, vocab):
    body = _big_body()
    step = 1 << 20
    chunks = [b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step]) for i in range(0, len(body), step)]
    chunks.append(b"0\r\n\r\n")
    head = request_head("POST", COMPLETIONS, {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    return raw_exchange(srv, [head, *chunks])


def fifty_mb_httpx(srv, vocab):
    return post(srv, COMPLETIONS, content=_big_body())


def _closed(reply: Reply) -> None:
    assert reply.headers.get("connection") == "close", reply.headers
    assert reply.closed, "the server kept the connection open"


case("completions-50MB-body-content-length", fifty_mb_content_length, 413, None, [str(MAX_BODY)], check=_closed)
case("completions-50MB-body-chunked", fifty_mb_chunked, 413, None, [str(MAX_BODY)], check=_closed)
case("completions-50MB-body-httpx", fifty_mb_httpx, 413, None, [str(MAX_BODY)])
case("chat-content-length-over-limit-no-body",  # refused on the declared length alone
     lambda srv, vocab: raw_exchange(srv, [request_head("POST", CHAT, {"Content-Type": "application/json"},
                                                        length=MAX_BODY + 1)]), 413, None, check=_closed)


def lying_content_length(srv, vocab):
    """Declares 1000 bytes, sends 20, then waits: the body never completes, so the body timeout answers."""
    body = json.dumps(BASE[COMPLETIONS]).encode()[:20]
    return raw_exchange(srv, [request_head("POST", COMPLETIONS, {"Content-Type": "application/json"}, length=1000),
                              body, BODY_TIMEOUT_S + 5])


def short_content_length(srv, vocab):
    """Declares fewer bytes than it sends: the body is cut at the declared length and is not valid JSON."""
    body = json.dumps(BASE[COMPLETIONS]).encode()
    return raw_exchange(srv, [request_head("POST", COMPLETIONS, {"Content-Type": "application/json"},
                                           length=len(body) - 10) + body])


def _timely(reply: Reply) -> None:
    assert reply.elapsed < BODY_TIMEOUT_S + 3, f"408 after {reply.elapsed:.1f}s"
    _closed(reply)


case("completions-content-length-larger-than-body", lying_content_length, 408, None, ["1.5"], check=_timely)
case("completions-content-length-smaller-than-body", short_content_length, 400, None, ["JSON"])

# 9. Content types and encodings.
_OK = json.dumps(BASE[COMPLETIONS]).encode()
case("completions-content-type-text-plain", raw_body(COMPLETIONS, _OK, "text/plain"), 415, None, ["text/plain"])
case("completions-content-type-form", raw_body(COMPLETIONS, b"prompt=x&max_tokens=2",
                                               "application/x-www-form-urlencoded"), 415, None)
case("chat-content-type-multipart", raw_body(CHAT, json.dumps(BASE[CHAT]).encode(), "multipart/form-data"), 415,
     None)
case("completions-content-type-xml", raw_body(COMPLETIONS, _OK, "application/xml"), 415, None)


def with_prompt_bytes(route: str, raw: bytes) -> Callable:
    """BASE[route] with the prompt (or the message content) replaced by raw bytes inside the JSON string."""
    def send(srv, vocab):
        marker = "PROMPT-PLACEHOLDER"
        body = {**BASE[route]}
        if route == COMPLETIONS:
            body["prompt"] = marker
        else:
            body["messages"] = [{"role": "user", "content": marker}]
        content = json.dumps(body).encode().replace(marker.encode(), raw)
        return post(srv, route, content=content)
    return send


for _id, _raw in [("latin1-e9", b"caf\xe9"), ("byte-ff", b"\xff\xfe"), ("bad-continuation", b"\xc3\x28"),
                  ("overlong-slash", b"\xc0\xaf"), ("truncated-sequence", b"ab\xe2\x82")]:
    case(f"completions-non-utf8-{_id}", with_prompt_bytes(COMPLETIONS, _raw), 400, None)
# A UTF-16 surrogate encoded as UTF-8 bytes (ED A0 80 .. ED BF BF) is invalid UTF-8 too, but Python's json.loads
# decodes bytes with "surrogatepass", so it arrives as a lone surrogate, like the escape "\ud800" below. Whichever
# layer refuses it (and names a param or not), the answer must be a 400.
for _id, _raw in [("encoded-surrogate", b"\xed\xa0\x80"), ("encoded-surrogate-low", b"x\xed\xbf\xbfy")]:
    case(f"completions-non-utf8-{_id}", with_prompt_bytes(COMPLETIONS, _raw), 400)
case("chat-non-utf8-encoded-surrogate", with_prompt_bytes(CHAT, b"\xed\xa0\x80"), 400)
for _field in ("stop", "user", "cache_salt", "model"):  # the same bytes in fields that are not tokenized
    case(f"completions-non-utf8-encoded-surrogate-in-{_field}", raw_body(
        COMPLETIONS, _OK[:-1] + f', "{_field}": "SURROGATE"}}'.encode().replace(b"SURROGATE", b"a\xed\xa0\x80")),
        400)
case("tokenize-non-utf8-encoded-surrogate", raw_body("/tokenize", b'{"prompt": "\xed\xa0\x80"}'), 400)
case("chat-non-utf8-latin1", with_prompt_bytes(CHAT, b"na\xefve"), 400, None)
case("completions-escaped-lone-surrogate-d800", with_prompt_bytes(COMPLETIONS, b"\\ud800"), 400, None,
     ["surrogate"])
case("chat-escaped-lone-surrogate-dfff", with_prompt_bytes(CHAT, b"a\\udfffb"), 400, None, ["surrogate"])
case("completions-escaped-lone-surrogate-in-key",
     raw_body(COMPLETIONS, _OK[:-1] + b', "\\udbff": 1}'), 400, None, ["surrogate"])
case("completions-escaped-reversed-pair", with_prompt_bytes(COMPLETIONS, b"\\ude00\\ud83d"), 400, None,
     ["surrogate"])
case("completions-escaped-surrogate-pair-ok", with_prompt_bytes(COMPLETIONS, b"\\ud83d\\ude00"), 200,
     check=assert_completion)

# 10. Heads: one huge header, many headers, a huge query string, a head trickled in pieces.
_HUGE = "a" * (MAX_HEAD + 6 * 1024)


def trickled_huge_header(srv, vocab):
    """A head well over the limit (160 KB) arriving in 8 KiB pieces, as over a slow link: the server must still
    answer 431 in the API's shape, however its HTTP parser buffers the pieces."""
    head = request_head("POST", COMPLETIONS, {"Content-Type": "application/json",
                                              "X-Big": "a" * (2 * MAX_HEAD + 32 * 1024)}, body=_OK)
    pieces: list = []
    for i in range(0, len(head), 8192):
        pieces += [head[i:i + 8192], 0.05]
    return raw_exchange(srv, [*pieces, _OK])


case("completions-header-70KB", lambda srv, vocab: post(srv, COMPLETIONS, json_body=BASE[COMPLETIONS],
                                                          headers={"x-big": _HUGE}), 431, None, [str(MAX_HEAD)])
case("completions-header-70KB-no-auth", lambda srv, vocab: post(srv, COMPLETIONS, json_body=BASE[COMPLETIONS],
                                                                  headers={"x-big": _HUGE}, auth=False), 431, None)
case("completions-header-160KB-trickled", trickled_huge_header, 431, None, [str(MAX_HEAD)])
case("completions-1000-headers", lambda srv, vocab: post(srv, COMPLETIONS, json_body=BASE[COMPLETIONS],
                                                           headers={f"x-h{i}": "v" for i in range(1000)}), 200,
     check=assert_completion)
case("completions-1000-headers-raw",
     lambda srv, vocab: raw_exchange(srv, [request_head("POST", COMPLETIONS, [("Content-Type", "application/json")]
                                                        + [("X-Same", str(i)) for i in range(1000)], body=_OK),
                                           _OK]), 200, check=assert_completion)
case("completions-6000-headers",  # ~80 KB of small headers (raw: httpx takes seconds to build so many)
     lambda srv, vocab: raw_exchange(srv, [request_head("POST", COMPLETIONS, [("Content-Type", "application/json")]
                                                        + [(f"X-H{i}", "v") for i in range(6000)], body=_OK) + _OK]),
     431, None, [str(MAX_HEAD)])
case("completions-query-70KB",  # httpx refuses such a URL; a raw client does not
     lambda srv, vocab: raw_exchange(srv, [request_head("POST", f"{COMPLETIONS}?q={_HUGE}",
                                                        {"Content-Type": "application/json"}, body=_OK) + _OK]),
     431, None, [str(MAX_HEAD)])

# 11. Model and API key.
for _name, _route in ROUTES.items():
    case(f"{_name}-unknown-model", fields(_route, model="gpt-4"), 404, "model", ["gpt-4", MODEL])
case("completions-model-empty-string", fields(COMPLETIONS, model=""), 404, "model")
case("completions-model-name-100KB", fields(COMPLETIONS, model="m" * 100_000), 404, "model")
for _id, _headers in [("missing", {}), ("wrong-key", {"authorization": "Bearer sk-wrong"}),
                      ("no-bearer-prefix", {"authorization": API_KEY}),
                      ("basic-scheme", {"authorization": f"Basic {API_KEY}"}),
                      ("key-with-suffix", {"authorization": f"Bearer {API_KEY}x"}),
                      ("non-ascii-bytes", {"authorization": b"Bearer \xff\xfe\x80"})]:
    for _name, _route in ROUTES.items():
        case(f"{_name}-api-key-{_id}", lambda srv, vocab, r=_route, h=_headers: post(
            srv, r, json_body=BASE[r], headers=h, auth=False), 401, None, ["API key"])


# 12. HTTP/1.0: a complete answer, then the server closes (no keep-alive without asking for it).
def http10(route: str, stream: bool = False) -> Callable:
    def send(srv, vocab):
        body = json.dumps({**BASE[route], "stream": stream}).encode()
        return raw_exchange(srv, [request_head("POST", route, {"Content-Type": "application/json"}, version="1.0",
                                               body=body) + body])
    return send


def _http10_json(object_name: str) -> Callable[[Reply], None]:
    def check(reply: Reply) -> None:
        assert_completion(reply, object_name)
        assert reply.closed, "HTTP/1.0 without keep-alive: the server must close"
    return check


def _http10_stream(reply: Reply) -> None:
    assert reply.headers["content-type"].startswith("text/event-stream"), reply.headers
    assert "chunked" not in reply.headers.get("transfer-encoding", ""), "HTTP/1.0 has no chunked encoding"
    events = [line.removeprefix("data: ") for line in reply.body.decode().split("\n\n") if line]
    assert events[-1] == "[DONE]", events
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(c["object"] == "text_completion" for c in chunks), chunks
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop"), chunks
    assert reply.closed


case("completions-http10", http10(COMPLETIONS), 200, check=_http10_json("text_completion"))
case("chat-http10", http10(CHAT), 200, check=_http10_json("chat.completion"))
case("completions-http10-stream", http10(COMPLETIONS, stream=True), 200, check=_http10_stream)
case("completions-http10-no-content-length",  # HTTP/1.0 without a length: the request has no body
     lambda srv, vocab: raw_exchange(srv, [request_head("POST", COMPLETIONS, {"Content-Type": "application/json"},
                                                        version="1.0")]), 400, None, ["JSON"])


# 13. Slow clients.
def slow_body(srv, vocab):
    """Declares the whole body, then sends it a byte every 0.3 s (it would take ~20 s): 408 at the body timeout."""
    body = json.dumps(BASE[COMPLETIONS]).encode()
    parts: list = [request_head("POST", COMPLETIONS, {"Content-Type": "application/json"}, body=body)]
    for byte in body:
        parts += [bytes([byte]), 0.3]
    return raw_exchange(srv, parts)


class Background:
    """A normal completion sent from another thread while the main thread plays the slow client."""

    def __init__(self, srv):
        self.reply: Reply | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(srv,), daemon=True)
        self.thread.start()

    def _run(self, srv) -> None:
        try:
            self.reply = post(srv, COMPLETIONS, json_body=PROBE)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            self.error = exc

    def result(self, what: str) -> Reply:
        self.thread.join(IO_TIMEOUT_S)
        assert not self.thread.is_alive(), f"{what} blocked another client"
        if self.error is not None:
            raise self.error
        return self.reply


def slow_headers(srv, vocab):
    """Trickles the head a byte every 0.3 s for ~2.4 s while another client is served, then sends the rest.
    uvicorn has no head timeout, so the connection is held; what matters is that others are served meanwhile and
    that the slow request, once complete, is answered normally."""
    head = request_head("POST", COMPLETIONS, {"Content-Type": "application/json"}, body=_OK)
    first, slow, rest = head[:40], head[40:48], head[48:]
    sock = socket.create_connection(hostport(srv), timeout=IO_TIMEOUT_S)
    try:
        sock.sendall(first)
        other = Background(srv)
        for byte in slow:
            time.sleep(0.3)
            sock.sendall(bytes([byte]))
        assert_completion(other.result("a trickling head"))
        readable, _, _ = select.select([sock], [], [], 0)
        assert not readable, "the server answered (or closed) a head that was still arriving"
        sock.sendall(rest + _OK)
        return read_reply(sock, time.monotonic() + IO_TIMEOUT_S)
    finally:
        sock.close()


def many_slow_heads(srv, vocab):
    """20 connections trickle their heads; a normal client is still served promptly."""
    socks = []
    try:
        for i in range(20):
            sock = socket.create_connection(hostport(srv), timeout=IO_TIMEOUT_S)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow-%d: " % i)
            socks.append(sock)
        start = time.monotonic()
        other = Background(srv)
        while other.thread.is_alive() and time.monotonic() - start < IO_TIMEOUT_S:
            for sock in socks:
                sock.sendall(b"a")
            other.thread.join(0.3)
        reply = other.result("20 trickling heads")
        assert reply.elapsed < 10, f"a normal request took {reply.elapsed:.1f}s next to 20 slow heads"
        return reply
    finally:
        for sock in socks:
            sock.close()


case("completions-slow-body-byte-every-0.3s", slow_body, 408, None, ["1.5"], check=_timely)
case("completions-slow-headers", slow_headers, 200, check=assert_completion)
case("completions-20-slow-heads", many_slow_heads, 200, check=assert_completion)


# 14. A chat template that tries to reach Python internals (the evil server). Refused as a 400 naming the chat
# template; nothing it asks for runs (the marker file is checked in the last test).
def evil_chat(attack: str | None) -> Callable:
    def send(srv, vocab):
        body = {**BASE[CHAT]}
        if attack is not None:
            body["chat_template_kwargs"] = {"attack": attack}
        with srv.client(timeout=IO_TIMEOUT_S) as client:  # the evil server has no API key
            return Reply.of(client.post(CHAT, json=body))
    return send


for _attack in [None, "cycler-popen", "joiner-popen", "lipsum-globals", "namespace-globals",
                "raise-exception-globals", "format-string", "loop-subclasses", "self-context", "mutate-messages",
                "mutate-dict", "huge-range"]:
    case(f"chat-template-{_attack or 'mro-subclasses'}", evil_chat(_attack), 400, "messages", ["chat template"],
         target="evil")
case("chat-template-mro-subclasses-stream",
     lambda srv, vocab: Reply.of(httpx.post(srv.url + CHAT, json={**BASE[CHAT], "stream": True}, timeout=IO_TIMEOUT_S)),
     400, "messages", ["chat template"], target="evil")
case("chat-template-tokenize-mro-subclasses",  # /tokenize renders the same template
     lambda srv, vocab: Reply.of(httpx.post(srv.url + "/tokenize", json={"messages": BASE[CHAT]["messages"]},
                                            timeout=IO_TIMEOUT_S)), 400, "messages", ["chat template"], target="evil")


# ---- the test ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(request, case: Case, vocab_size):
    srv = request.getfixturevalue("server" if case.target == "main" else "evil_server")
    reply = case.send(srv, vocab_size)
    # The normal request first: it also waits out the server's handling of the hostile one (e.g. logging a
    # traceback, which on Python 3.11 must not overlap pytest formatting this test's failure: both call ast.parse,
    # whose recursion counter is shared between threads).
    assert_still_serves(srv, AUTH if case.target == "main" else None)
    if case.status >= 400:
        assert_error(reply, case.status, case.param, case.contains)
    else:
        assert reply.status == case.status, (reply.status, reply.body[:2000])
    if case.check is not None:
        case.check(reply)


def test_catalogue_is_large_enough():
    assert len(CASES) >= 50
    assert len({c.id for c in CASES}) == len(CASES)


def test_engines_idle_and_nothing_ran_after_hostile_inputs(server, evil_server, marker):
    """Last (module order): after every case both engines are idle with all KV blocks free and healthy, and the
    evil template ran no command."""
    for srv in (server, evil_server):
        srv.wait_idle()
        pool = srv.engine.engine.core.pool
        assert pool.num_free == pool.num_blocks
        assert srv.engine.is_healthy
    assert not marker.exists(), "the chat template ran a shell command"
