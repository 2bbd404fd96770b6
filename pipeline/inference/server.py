"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

    POST /v1/completions        prompt (text or token ids, or a batch of either) -> text; "stream": true
                                for server-sent events
    POST /v1/chat/completions   messages, rendered with our chat template -> the assistant's reply
    GET  /v1/models             the one served model
    POST /tokenize, /detokenize vLLM's: text or messages -> token ids, and back
    GET  /health                200 while the engine loop is alive; 503 saying why once it is not
    GET  /metrics               Prometheus text: vLLM's metric names (vllm:...), http_requests_total

`python -m pipeline serve` (pipeline/inference/serve.py) runs it over one model.

One thread runs the engine, and only it touches the engine. The event loop never waits on it:
handlers put requests and aborts on a thread-safe queue (`AsyncEngine.inbox`) that the engine
thread drains before each step, and each step's outputs come back to the loop in one
`call_soon_threadsafe`, onto each request's asyncio queue. Tokenizing and chat rendering run in
worker threads, after a size check that needs no tokenizing. A client that disconnects aborts its
request (streaming or not), which frees its KV blocks; a request whose sampling fails is failed
alone (500) and the engine goes on; if the engine loop itself dies, new requests get 503 at once.
A request of several choices (a batch of prompts, `n` > 1) is one engine request per choice, all
added in one command so that siblings share their prompt's cached blocks; stop strings are cut
here, on the loop (`ReplyText`), which then finishes the choice's engine request.

Every error has OpenAI's body, {"error": {"message", "type", "param", "code"}}: 4xx for what the
client sent (`param` names the field), 500/503 for server faults (docs/inference.md, "Errors").
Every request field is honoured or refused: a field this server does not build is accepted only
at the default that asks for nothing (`best_of: 1`, `suffix: ""`, ...), anything else is a 400.
With `api_key`, every path but /health and /metrics (those too with `protect_health_metrics`)
needs `Authorization: Bearer <key>`, else 401.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from pipeline.inference.engine import Engine
from pipeline.inference.sampling import MAX_LOGPROBS, SEED_RANGE, InvalidParam, SamplingParams
from pipeline.inference.sequence import RequestOutput, TokenLogprobs
from pipeline.tokenizer.bpe import ASSISTANT_END, BPETokenizer, token_to_str
from pipeline.tokenizer.chat_template import chat_prompt_ids

log = logging.getLogger(__name__)

# vLLM's buckets (vllm/v1/metrics/loggers.py), seconds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)

# The request fields each endpoint honours (OpenAI's, and vLLM's extras top_k, min_p,
# repetition_penalty, ignore_eos, stop_token_ids, return_token_ids). `user` is OpenAI's end-user
# id: it is logged with the request's failures.
SAMPLING_FIELDS = {"model", "stream", "stream_options", "temperature", "top_p", "top_k", "min_p",
                   "repetition_penalty", "presence_penalty", "frequency_penalty", "max_tokens",
                   "max_completion_tokens", "seed", "ignore_eos", "stop", "stop_token_ids", "n", "logprobs",
                   "return_token_ids", "user"}
FIELDS = {"completions": SAMPLING_FIELDS | {"prompt", "echo"},
          "chat": SAMPLING_FIELDS | {"messages", "top_logprobs"}}
# Fields not built, with the values that ask for nothing, which clients send as defaults; any
# other value is refused with a 400 naming the field.
NOT_BUILT: dict[str, tuple] = {
    "best_of": (1,), "suffix": ("",), "logit_bias": ({},), "response_format": ({"type": "text"},), "tools": ([],),
    "tool_choice": ("none",),
}
NOT_BUILT_BY_ENDPOINT = {"completions": NOT_BUILT | {"top_logprobs": ()}, "chat": NOT_BUILT | {"echo": (False,)}}
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256
MESSAGE_FIELDS = {"role", "content", "name"}
RETRY_AFTER_S = 1  # a full queue drains in about this long at the batch sizes served here


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def server_error(message: str, status: int = 500, code: str | None = None) -> APIError:
    return APIError(status, message, kind="server_error", code=code)


def shutting_down() -> APIError:
    return server_error("the server is shutting down", status=503, code="shutting_down")


class Metrics:
    """vLLM's Prometheus names, one registry per server (tests run several in one process)."""

    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = dict(labelnames=["model_name"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS, **labels)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between successive token outputs",
                             buckets=ITL_BUCKETS, **labels)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request arrival to finish", buckets=E2E_BUCKETS,
                             **labels)
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch", **labels)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", **labels)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache blocks in use (1 = full)", **labels)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of admitted requests", **labels)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", **labels)
        self.success = Counter("vllm:request_success",
                               "Finished requests (abort: the client went away; error: the request failed)",
                               ["model_name", "finished_reason"], registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Preempted requests (recomputed)", **labels)
        self.rejected = Counter("wetstone:requests_rejected",
                                "Requests refused before admission (queue_full: 429; shutting_down, engine_stopped: 503)",
                                ["model_name", "reason"], registry=r)
        # prometheus-fastapi-instrumentator's name, which vLLM also serves, with whole status codes:
        # the alert rules tell 429 (queue full) from other 4xx
        self.responses = Counter("http_requests", "HTTP responses by handler, method and status code",
                                 ["handler", "method", "status"], registry=r)
        self.model_name = model_name


class CountResponses:
    """ASGI middleware: every response counted in `http_requests_total` by its route (`other` for
    paths the app does not have), method and status; one the app never began counts as the 500
    that is sent for it."""

    def __init__(self, app, counter: Counter, routes: set[str]):
        self.app, self.counter, self.routes = app, counter, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            handler = scope["path"] if scope["path"] in self.routes else "other"
            self.counter.labels(handler, scope["method"], str(status)).inc()


class RequireAPIKey:
    """ASGI middleware: `Authorization: Bearer <key>` on every path but `open_paths`, else 401 with
    OpenAI's body (compared in constant time)."""

    def __init__(self, app, key: str, open_paths: set[str]):
        self.app, self.key, self.open_paths = app, f"Bearer {key}".encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.key):
            error = APIError(401, "a valid API key is needed: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


# --- the hand-off between the event loop and the engine thread ---------------------------------

@dataclass(eq=False)
class Stream:
    """One engine request on its way to the engine thread, and its outputs on the way back: onto
    `queue` (read on the event loop) as (index, output); the choices of one HTTP request share
    the queue, each with its own `index`."""
    prompt: list[int]
    params: SamplingParams
    user: str | None = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    index: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    request_id: int | None = None  # the engine's id, set on the engine thread
    last: float | None = None  # when its last token was delivered


CLIENT_GONE = object()  # put on a stream's queue when its client disconnects


class AsyncEngine:
    """The engine on its own thread, fed through `inbox`: ("add", [streams]) (one request's
    choices, added together), ("abort" | "finish", stream) (its client went; a stop string ended
    it), or ("abort_all" | "stop", None). The loop side only puts on the queue, so it never waits."""

    def __init__(self, engine: Engine, metrics: Metrics, max_waiting: int):
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[int, Stream] = {}  # engine request id -> stream; engine thread only
        self.num_waiting = 0  # the engine's waiting queue as of its last step, for the 429 check
        self.error: BaseException | None = None  # what killed the engine loop
        self.closing = False  # every request aborted for a shutdown: new ones are refused
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.error is None

    def stop(self, timeout: float) -> None:
        """Abort what is left and end the thread (after its current step, within `timeout`)."""
        self.inbox.put(("stop", None))
        if self.thread is not None:
            self.thread.join(timeout)

    def abort_all(self) -> None:
        """Abort every request (a shutdown's grace period is over): each gets a 503. Any thread."""
        self.inbox.put(("abort_all", None))

    # loop side

    def submit(self, streams: list[Stream]) -> None:
        """Queue one HTTP request's engine requests, or refuse them all (429, 503), counted in
        `wetstone:requests_rejected_total`."""
        try:
            if not self.alive():
                raise self.dead()
            if self.closing:
                raise shutting_down()
            if self.num_waiting + self.inbox.qsize() + len(streams) > self.max_waiting:
                raise APIError(429, f"the queue is full ({self.max_waiting} requests waiting); retry later",
                               kind="rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        except APIError as e:
            self.metrics.rejected.labels(self.metrics.model_name, e.code).inc()
            raise
        self.inbox.put(("add", streams))
        if not self.alive():  # it died as we queued: nothing will answer
            raise self.dead()

    def abort(self, stream: Stream) -> None:
        self.inbox.put(("abort", stream))

    def finish(self, stream: Stream) -> None:
        """End a request whose reply is complete before the engine knows it (a stop string)."""
        self.inbox.put(("finish", stream))

    def dead(self) -> APIError:
        why = f": {self.error!r}" if self.error is not None else ""
        return server_error(f"the engine loop has stopped{why}", status=503, code="engine_stopped")

    # engine thread

    def _run(self) -> None:
        try:
            while self._take_commands(wait=not self.engine.has_work()):
                if self.engine.has_work():
                    self._deliver(self.engine.step())
                self._publish()
        except BaseException as e:  # outside any one request: no state to trust; refuse new work at once
            self.error = e
            log.exception("the engine loop died; new requests get 503")
            self._send([(stream, e) for stream in [*self.streams.values(), *self._unread_adds()]])
        else:
            self._abort_all()
            self._send([(stream, aborted(stream)) for stream in self._unread_adds()])

    def _take_commands(self, wait: bool) -> bool:
        """Apply the inbox's commands (waiting for one when idle); False on stop."""
        while True:
            try:
                command, stream = self.inbox.get() if wait else self.inbox.get_nowait()
            except queue.Empty:
                return True
            wait = False
            if command == "stop":
                return False
            if command == "abort_all":
                self._abort_all()
            elif command == "add":
                for one in stream:
                    self._add(one)
            elif stream.request_id is not None and self.engine.abort(stream.request_id):
                del self.streams[stream.request_id]
                m = self.metrics
                if command == "finish":
                    m.e2e.labels(m.model_name).observe(time.perf_counter() - stream.arrival)
                    m.success.labels(m.model_name, "stop").inc()
                    continue
                m.success.labels(m.model_name, "abort").inc()
                log.info("request %d aborted (client gone%s)", stream.request_id,
                         f", user {stream.user!r}" if stream.user else "")

    def _add(self, stream: Stream) -> None:
        if self.closing:
            self._send([(stream, aborted(stream))])
            return
        try:
            stream.request_id = self.engine.add_request(stream.prompt, stream.params)
        except Exception as e:  # checked on the loop already; if it fails anyway, it fails alone
            self._send([(stream, e)])
            return
        self.streams[stream.request_id] = stream
        self.metrics.prompt_tokens.labels(self.metrics.model_name).inc(len(stream.prompt))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        m, name, now = self.metrics, self.metrics.model_name, time.perf_counter()
        sends = []
        for out in outputs:
            stream = self.streams.get(out.request_id)
            if stream is None:
                continue
            if out.new_token_ids:
                m.generation_tokens.labels(name).inc(len(out.new_token_ids))
                if stream.last is None:
                    m.ttft.labels(name).observe(now - stream.arrival)
                else:
                    m.itl.labels(name).observe(now - stream.last)
                stream.last = now
            if out.finished:
                m.e2e.labels(name).observe(now - stream.arrival)
                m.success.labels(name, out.finish_reason).inc()
                del self.streams[out.request_id]
                if out.error and stream.user:  # the engine has logged the failure
                    log.error("request %d of user %r failed: %s", out.request_id, stream.user, out.error)
            if out.new_token_ids or out.finished:
                sends.append((stream, out))
        self._send(sends)

    def _publish(self) -> None:
        m, name = self.metrics, self.metrics.model_name
        self.num_waiting = self.engine.num_waiting
        m.running.labels(name).set(self.engine.num_running)
        m.waiting.labels(name).set(self.num_waiting)
        m.kv_usage.labels(name).set(self.engine.blocks.usage)

    def _abort_all(self) -> None:
        """Abort every request, freeing its blocks, and refuse those added later: each gets a
        finished output with reason "abort" (its client a 503: the server is stopping)."""
        self.closing = True
        for stream in self.streams.values():
            if self.engine.abort(stream.request_id):
                self.metrics.success.labels(self.metrics.model_name, "abort").inc()
        self._publish()
        self._send([(stream, aborted(stream)) for stream in self.streams.values()])
        self.streams.clear()

    def _unread_adds(self) -> list[Stream]:
        """Empty the inbox (the loop has ended); the streams it was to add."""
        streams = []
        while True:
            try:
                command, stream = self.inbox.get_nowait()
            except queue.Empty:
                return streams
            if command == "add":
                streams += stream

    def _send(self, items: list[tuple[Stream, Any]]) -> None:
        """Hand outputs to the loop: one wakeup for the whole step."""
        if items and self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody left to tell
                self.loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Stream, Any]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait((stream.index, item))


def aborted(stream: Stream) -> RequestOutput:
    return RequestOutput(-1 if stream.request_id is None else stream.request_id, [], True, "abort", 0)


# --- request parsing ---------------------------------------------------------------------------

def _field(body: dict, name: str, kinds: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise APIError(400, f"'{name}' must be a number, not {value!r}", param=name)
    if not isinstance(value, kinds):
        raise APIError(400, f"'{name}' has the wrong type ({type(value).__name__}: {value!r:.80})", param=name)
    return value


def check_fields(body: dict, endpoint: str) -> None:
    """Refuse every field this endpoint does not honour, naming it."""
    not_built = NOT_BUILT_BY_ENDPOINT[endpoint]
    for name, value in body.items():
        if name in FIELDS[endpoint]:
            continue
        if name not in not_built:
            raise APIError(400, f"unknown field '{name}' (this endpoint takes: {', '.join(sorted(FIELDS[endpoint]))})",
                           param=name)
        if value is not None and not any(value == d and isinstance(value, bool) == isinstance(d, bool)
                                         for d in not_built[name]):
            allowed = " or ".join(json.dumps(d) for d in not_built[name]) or "null"
            raise APIError(400, f"'{name}' is not supported by this server (only {allowed}); got {value!r:.80}",
                           param=name)
    options = _field(body, "stream_options", dict, None)
    if options is not None:
        if not _field(body, "stream", bool, False):
            raise APIError(400, "'stream_options' is only allowed with \"stream\": true", param="stream_options")
        unknown = set(options) - {"include_usage"}
        if unknown:
            raise APIError(400, f"'stream_options' has unknown keys {sorted(unknown)} (it takes: include_usage)",
                           param="stream_options")
        _field(options, "include_usage", bool, False)


def stop_strings(body: dict) -> list[str]:
    """`stop`: a string or a list of up to MAX_STOP_STRINGS non-empty ones ("" alone: none), each
    at most MAX_STOP_CHARS long (the held-back tail of a stream is matched against each)."""
    stop = body.get("stop")
    stops = [] if stop is None or stop == "" else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops):
        raise APIError(400, f"'stop' must be a non-empty string or a list of them, got {stop!r:.80}", param="stop")
    if len(stops) > MAX_STOP_STRINGS or max(map(len, stops), default=0) > MAX_STOP_CHARS:
        raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters",
                       param="stop")
    return list(dict.fromkeys(stops))


def top_logprobs(body: dict, chat: bool) -> int | None:
    """How many top log-probabilities each token reports, None for no log-probabilities:
    completions' `logprobs` (an int), chat's `top_logprobs` with `logprobs: true`."""
    name = "top_logprobs" if chat else "logprobs"
    if chat:
        wanted, k = _field(body, "logprobs", bool, False), _field(body, "top_logprobs", int, None)
        if k is not None and not wanted:
            raise APIError(400, "'top_logprobs' needs \"logprobs\": true", param="top_logprobs")
        k = (k or 0) if wanted else None
    else:
        k = _field(body, "logprobs", int, None)
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise APIError(400, f"'{name}' must be in [0, {MAX_LOGPROBS}], got {k}", param=name)
    return k


def sampling_params(body: dict, prompt_len: int, seq_len: int, default_max_tokens: int | None,
                    stop_ids: list[int], logprobs: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    """SamplingParams from an OpenAI/vLLM request body; a bad value is a 400 naming its field.
    The completion must fit the context: `max_tokens` beyond it is refused (vLLM's rule); unset,
    it is `default_max_tokens` capped to the room left (None: all of it)."""
    room = seq_len - prompt_len
    if room < 1:
        raise APIError(400, f"prompt: {prompt_len} tokens fill the model's context of {seq_len}: no room for a "
                            f"completion", param="prompt")
    given = {name: _field(body, name, int, None) for name in ("max_tokens", "max_completion_tokens")}
    if None not in given.values() and len(set(given.values())) > 1:
        raise APIError(400, f"'max_tokens' and 'max_completion_tokens' differ ({given}); send one",
                       param="max_completion_tokens")
    name = "max_completion_tokens" if given["max_completion_tokens"] is not None else "max_tokens"
    max_tokens = given[name]
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    elif max_tokens > room:
        raise APIError(400, f"'{name}' is too large: {max_tokens}. This model's maximum context length is {seq_len} "
                            f"tokens and the prompt has {prompt_len} ({max_tokens} > {seq_len} - {prompt_len})",
                       param=name)
    stop_token_ids = _field(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids):
        raise APIError(400, f"'stop_token_ids' must be a list of token ids, got {stop_token_ids!r:.80}",
                       param="stop_token_ids")
    try:
        return SamplingParams(
            temperature=_field(body, "temperature", (int, float), 1.0),
            top_p=_field(body, "top_p", (int, float), 1.0),
            top_k=_field(body, "top_k", int, 0),
            min_p=_field(body, "min_p", (int, float), 0.0),
            repetition_penalty=_field(body, "repetition_penalty", (int, float), 1.0),
            presence_penalty=_field(body, "presence_penalty", (int, float), 0.0),
            frequency_penalty=_field(body, "frequency_penalty", (int, float), 0.0),
            max_tokens=max_tokens,
            ignore_eos=_field(body, "ignore_eos", bool, False),
            seed=_field(body, "seed", int, None),
            stop_token_ids=[*stop_ids, *stop_token_ids],
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except InvalidParam as e:
        raise APIError(400, str(e), param=name if e.param == "max_tokens" else e.param) from None


def chat_messages(messages: Any) -> Any:
    """OpenAI's message shapes as our template takes them ({"role", "content": str}): content as a
    list of text parts (joined by newlines, as vLLM joins them), the `developer` role (o1's name
    for `system`), null content on an assistant turn (""), and `name` (our template has no place
    for it, as Llama 3's and Qwen2's have none: accepted, not rendered). Anything else a message
    may carry (images, audio, tool calls) is a 400 naming it. What is not a list of dicts goes on
    as it is, for the template to refuse."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)
            continue
        for key in m.keys() - MESSAGE_FIELDS:
            raise APIError(400, f"messages[{i}].{key}: not supported (a message takes role, content and name)",
                           param="messages")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise APIError(400, f"messages[{i}].name must be a string", param="messages")
        role, content = m.get("role"), m.get("content")
        if content is None and role == "assistant":
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                    raise APIError(400, f"messages[{i}].content[{j}]: only {{\"type\": \"text\", \"text\": str}} parts "
                                        f"are supported (this model reads text), got {part!r:.80}", param="messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


class ReplyText:
    """One choice's reply text as its tokens arrive, cut at the first stop string (which is not
    part of it, as in vLLM). `add` returns the text that may go out now: while the reply goes on,
    a tail that could still begin a stop string is held back, so a stream never sends what a
    later token would withdraw."""

    def __init__(self, tokenizer: BPETokenizer, specials: set[int], stop: list[str]):
        self.tokenizer, self.specials, self.stop = tokenizer, specials, stop
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
        self.text, self.sent = "", 0
        self.stopped = False  # a stop string ended it

    def add(self, out: RequestOutput) -> str:
        # a stop token's text is not part of the reply (vLLM); it counts in usage
        ids = out.new_token_ids[:-1] if out.finish_reason == "stop" else out.new_token_ids
        seen = len(self.text)
        self.text += self.decoder.decode(self.tokenizer.decode_bytes([i for i in ids if i not in self.specials]),
                                         final=out.finished)
        for stop in self.stop:
            at = self.text.find(stop, max(0, seen - len(stop) + 1))
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        end = len(self.text)
        if not (out.finished or self.stopped):  # hold back the longest unsent tail that begins a stop string
            unsent = len(self.text) - self.sent
            end -= max((next((k for k in range(min(len(stop) - 1, unsent), 0, -1) if self.text.endswith(stop[:k])), 0)
                        for stop in self.stop), default=0)
        new, self.sent = self.text[self.sent:end], end
        return new


class Logprobs:
    """Log-probabilities in OpenAI's shapes: completions' legacy one (tokens, token_logprobs,
    top_logprobs, text_offset; the prompt's first token null, as vLLM), and chat's content list
    (token, logprob, bytes, top_logprobs). A token's string is its UTF-8 decoded alone (U+FFFD
    for a partial character; its bytes are exact)."""

    def __init__(self, tokenizer: BPETokenizer):
        self.token_bytes = functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode_bytes([i]))

    def token(self, i: int) -> str:
        return self.token_bytes(i).decode("utf-8", errors="replace")

    @staticmethod
    def value(logprob: float) -> float:
        return max(logprob, -9999.0)  # vLLM's floor: JSON has no -Infinity

    def completion(self, ids: list[int], logprobs: list[TokenLogprobs | None], offset: int) -> dict:
        tokens = [self.token(i) for i in ids]
        offsets = [offset + sum(map(len, tokens[:j])) for j in range(len(tokens))]
        tops: list[dict | None] = []
        for t, lp in zip(tokens, logprobs):
            top = None if lp is None else {}
            for i, v in lp.top if lp is not None else ():
                top.setdefault(self.token(i), self.value(v))  # two ids of one string: the likelier
            if top is not None:
                top.setdefault(t, self.value(lp.logprob))  # the token itself, as vLLM lists it
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": [None if lp is None else self.value(lp.logprob) for lp in logprobs],
                "top_logprobs": tops, "text_offset": offsets}

    def chat(self, ids: list[int], logprobs: list[TokenLogprobs]) -> dict:
        def entry(i: int, v: float) -> dict:
            return {"token": self.token(i), "logprob": self.value(v), "bytes": list(self.token_bytes(i))}
        return {"content": [{**entry(i, lp.logprob), "top_logprobs": [entry(*t) for t in lp.top]}
                            for i, lp in zip(ids, logprobs)]}


def merge_logprobs(parts: list[dict], chat: bool) -> dict:
    """One choice's log-probabilities from those of its outputs, in order."""
    keys = ["content"] if chat else ["tokens", "token_logprobs", "top_logprobs", "text_offset"]
    return {key: [x for part in parts for x in part[key]] for key in keys}


# --- the app -----------------------------------------------------------------------------------

def create_app(engine: Engine, tokenizer: BPETokenizer, model_name: str, *, max_waiting: int = 256,
               max_body_bytes: int = 1 << 20, max_prompt_tokens: int | None = None, api_key: str | None = None,
               protect_health_metrics: bool = False) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`. `engine.stop_token_ids` end every
    request (EOS, unless ignore_eos); chat replies also end at <|assistant_end|>. Bodies over
    `max_body_bytes` get 413; prompts over `max_prompt_tokens` (default and at most: the
    context) get 400, text prompts checked before tokenizing. With `api_key`, requests need it as
    a Bearer token (/health and /metrics too only with `protect_health_metrics`)."""
    if max_body_bytes < 1 or (max_prompt_tokens is not None and max_prompt_tokens < 1):
        raise ValueError(f"max_body_bytes={max_body_bytes}, max_prompt_tokens={max_prompt_tokens}: must be >= 1")
    metrics = Metrics(model_name)
    core = AsyncEngine(engine, metrics, max_waiting)
    max_prompt_tokens = engine.seq_len if max_prompt_tokens is None else min(max_prompt_tokens, engine.seq_len)
    # a token is at most `longest` bytes and a character at least one, so a text of more than
    # max_prompt_tokens x longest characters cannot fit: known without tokenizing it
    max_prompt_chars = max_prompt_tokens * max(len(t) for t in tokenizer.vocab)
    max_choices = max(1, max_waiting)  # more could never be queued: 400, not 429

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        core.start(asyncio.get_running_loop())
        yield
        await asyncio.to_thread(core.stop, 5.0)

    app = FastAPI(title="wetstone", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.core = core
    created = int(time.time())
    specials = set(tokenizer.special_tokens.values())  # never part of a reply's text
    logprobs = Logprobs(tokenizer)
    chat_stop_ids = [tokenizer.special_tokens[ASSISTANT_END]] if ASSISTANT_END in tokenizer.special_tokens else []

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)  # Starlette's own: an unknown path, a wrong method
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return APIError(e.status_code, str(e.detail), kind=kind).response()

    @app.exception_handler(Exception)  # a bug outside the handlers: still OpenAI's body (uvicorn logs it)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        return server_error(f"internal error: {e!r}").response()

    def answering_bugs(handler):
        """A bug in a handler answers a 500 with OpenAI's body from the handler itself: raised
        further, uvicorn would close the connection and its client's next request would fail."""
        @functools.wraps(handler)
        async def wrapped(request: Request):
            try:
                return await handler(request)
            except APIError:
                raise
            except Exception as e:
                log.exception("a request failed")
                return server_error(f"internal error: {e!r}").response()
        return wrapped

    async def read_body(request: Request) -> dict:
        """The JSON object of the body, read up to `max_body_bytes`."""
        declared = request.headers.get("content-length", "")
        too_large = APIError(413, f"the request body is larger than {max_body_bytes} bytes (--max-body-bytes)",
                             code="request_too_large")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise too_large
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise too_large
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, an integer of > 4300 digits, deep nesting
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        name = _field(body, "model", str, None)
        if name is not None and name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server has '{model_name}'", param="model",
                           code="model_not_found")
        return body

    def check_length(param: str, n: int, unit: str) -> None:
        """A prompt within max_prompt_tokens: its characters before tokenizing, its tokens after."""
        if n > (max_prompt_tokens if unit == "tokens" else max_prompt_chars):
            could = "" if unit == "tokens" else " could hold"
            raise APIError(400, f"{param}: {n} {unit}, more than the {max_prompt_tokens} tokens allowed{could} (the "
                                f"model's context is {engine.seq_len})", param=param)

    def is_ids(prompt: Any) -> bool:
        return isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)

    async def completion_prompts(prompt: Any, echo: bool) -> tuple[list[list[int]], list[str] | None]:
        """The prompts (one, or a batch: a list of texts or of token-id lists) as token ids; with
        `echo`, their texts too (token ids decoded)."""
        single = isinstance(prompt, str) or is_ids(prompt)
        prompts = [prompt] if single else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) or is_ids(p) for p in prompts):
            raise APIError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either",
                           param="prompt")
        if len(prompts) > max_choices:
            raise APIError(400, f"'prompt' is a batch of {len(prompts)}; at most {max_choices} (--max-waiting)",
                           param="prompt")
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                check_length("prompt" if single else f"prompt[{i}]", len(p), "characters")

        def encode() -> tuple[list[list[int]], list[str] | None]:
            ids = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
            try:
                return ids, [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts] if echo else None
            except ValueError as e:  # an id the tokenizer does not have
                raise APIError(400, f"prompt: {e}", param="prompt") from None
        ids, texts = await asyncio.to_thread(encode)
        for i, p in enumerate(ids):
            check_length("prompt" if single else f"prompt[{i}]", len(p), "tokens")
        return ids, texts

    async def chat_prompt(messages: Any) -> list[int]:
        messages = chat_messages(messages)
        if isinstance(messages, list):
            check_length("messages", sum(len(m["content"]) for m in messages
                                         if isinstance(m, dict) and isinstance(m.get("content"), str)), "characters")
        try:
            return await asyncio.to_thread(chat_prompt_ids, tokenizer, messages)
        except ValueError as e:  # names the bad message: "message 1: role 'user' out of place ..."
            raise APIError(400, str(e), param="messages") from None

    def choices_per_prompt(body: dict, num_prompts: int) -> int:
        n = _field(body, "n", int, 1)
        if n < 1:
            raise APIError(400, f"'n' must be >= 1, got {n}", param="n")
        if n * num_prompts > max_choices:
            raise APIError(400, f"'n' x prompts = {n * num_prompts} choices; at most {max_choices} (--max-waiting)",
                           param="n")
        return n

    async def abort_on_disconnect(request: Request, streams: list[Stream]) -> None:
        """Wait for the client to go (or the response to end), then abort: the engine ignores
        the abort of a finished request. Started at submission, so no path can miss it."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for stream in streams:
            core.abort(stream)
        streams[0].queue.put_nowait((None, CLIENT_GONE))

    async def outputs(streams: list[Stream], pending: set[int],
                      watcher: asyncio.Task) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as the engine makes them, until no choice is `pending` (the
        caller takes out one that a stop string ended) or the client goes; a consumer that stops
        early (its task cancelled) aborts the rest too."""
        try:
            while pending:
                index, item = await streams[0].queue.get()
                if item is CLIENT_GONE:
                    return
                if isinstance(item, BaseException):  # the engine loop died, or could not take the request
                    raise server_error(f"the engine failed: {item!r}")
                if index not in pending:  # a stop string ended it; outputs were on their way
                    continue
                if item.finished:
                    pending.discard(index)
                if item.finish_reason == "error":
                    raise server_error(f"the engine failed on this request: {item.error}")
                if item.finish_reason == "abort":  # the server is stopping (a client's own abort sends nothing)
                    raise shutting_down()
                yield index, item
        finally:
            watcher.cancel()
            for index in pending:
                core.abort(streams[index])

    async def respond(request: Request, body: dict, prompts: list[list[int]], params: list[SamplingParams], n: int,
                      chat: bool, echo: list[str] | None = None):
        """Run choice i x n + j (prompt i, sibling j) for every prompt and answer in OpenAI's
        shape, streaming or not; `echo`: the prompts' texts, which start their choices' text."""
        streaming = _field(body, "stream", bool, False)
        include_usage = bool((_field(body, "stream_options", dict, {}) or {}).get("include_usage"))
        stop = stop_strings(body)
        try:
            for prompt, p in zip(prompts, params):
                engine.check_request(prompt, p)
        except InvalidParam as e:
            raise APIError(400, str(e), param=e.param) from None
        if any(p.seed is not None and p.seed + n - 1 > SEED_RANGE[1] for p in params):
            raise APIError(400, f"'seed' + n - 1 must be at most {SEED_RANGE[1]} (siblings take seed + j)", param="seed")
        queue, user = asyncio.Queue(), _field(body, "user", str, None)
        streams = []
        for prompt, p in zip(prompts, params):
            for j in range(n):  # siblings: seed + j, as vLLM seeds them
                sibling = p if j == 0 or p.seed is None else dataclasses.replace(p, seed=p.seed + j)
                streams.append(Stream(prompt, sibling, user=user, queue=queue, index=len(streams)))
        core.submit(streams)
        watcher = asyncio.create_task(abort_on_disconnect(request, streams))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if chat else "text_completion"
        texts = [ReplyText(tokenizer, specials, stop) for _ in streams]
        reasons: list[str | None] = [None] * len(streams)
        counts = [0] * len(streams)
        offsets = [0] * len(streams)  # text_offset of the next token (completions' logprobs)
        pending = set(range(len(streams)))
        reported = params[0].logprobs is not None

        def logprobs_of(i: int, out: RequestOutput) -> dict | None:
            """This output's tokens' log-probabilities (with echo, the prompt's first)."""
            if not reported:
                return None
            ids, lps = out.new_token_ids, out.new_token_logprobs
            if chat:
                return logprobs.chat(ids, lps)
            if echo is not None and out.prompt_logprobs is not None:
                ids, lps = streams[i].prompt + ids, out.prompt_logprobs + lps
            shaped = logprobs.completion(ids, lps, offsets[i])
            offsets[i] += sum(map(len, shaped["tokens"]))
            return shaped

        def advance(i: int, out: RequestOutput) -> str:
            """Take one output of choice i: its new text (echo first), counts and finish."""
            counts[i] += len(out.new_token_ids)
            text = texts[i].add(out)
            if echo is not None and counts[i] == len(out.new_token_ids):  # the choice's first output
                text = echo[i // n] + text
            if texts[i].stopped and i in pending:  # a stop string: done, whatever the engine would add
                pending.discard(i)
                core.finish(streams[i])
            if out.finished or texts[i].stopped:
                reasons[i] = "stop" if texts[i].stopped else out.finish_reason
            return text

        return_token_ids = _field(body, "return_token_ids", bool, False)

        def choice(i: int, text: str, lp: dict | None, delta: bool, ids: list[int]) -> dict:
            if not chat:
                c = {"index": i, "text": text, "logprobs": lp, "finish_reason": reasons[i]}
            else:
                message = {"content": text} if delta else {"role": "assistant", "content": text}
                c = {"index": i, ("delta" if delta else "message"): message, "logprobs": lp,
                     "finish_reason": reasons[i]}
            return {**c, "token_ids": ids} if return_token_ids else c  # vLLM's: the (new) tokens' ids

        def usage() -> dict:
            prompt_tokens, completion = sum(map(len, prompts)), sum(counts)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        if not streaming:
            text, lps, ids = [""] * len(streams), [[] for _ in streams], [[] for _ in streams]
            async for i, out in outputs(streams, pending, watcher):
                text[i] += advance(i, out)
                lps[i].append(logprobs_of(i, out))
                ids[i] += out.new_token_ids
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                    "choices": [choice(i, text[i], merge_logprobs(lps[i], chat) if reported else None, delta=False,
                                       ids=ids[i]) for i in range(len(streams))], "usage": usage()}

        async def events() -> AsyncIterator[str]:
            def chunk(choices: list[dict], extra: dict | None = None) -> str:
                return "data: " + json.dumps({"id": rid, "object": obj + ".chunk" if chat else obj,
                                              "created": int(time.time()), "model": model_name,
                                              "choices": choices, **(extra or {})}) + "\n\n"
            if chat:
                for i in range(len(streams)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
            try:
                async for i, out in outputs(streams, pending, watcher):
                    yield chunk([choice(i, advance(i, out), logprobs_of(i, out), delta=True, ids=out.new_token_ids)])
            except Exception as e:  # the status line has gone: the error is an event, as vLLM sends it
                if not isinstance(e, APIError):  # a bug
                    log.exception("streaming a reply failed")
                    e = server_error(f"internal error: {e!r}")
                yield "data: " + json.dumps(e.body()) + "\n\n"
            else:
                if include_usage:
                    yield chunk([], {"usage": usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    @answering_bugs
    async def completions(request: Request):
        body = await read_body(request)
        check_fields(body, "completions")
        echo, k = _field(body, "echo", bool, False), top_logprobs(body, chat=False)
        prompts, texts = await completion_prompts(body.get("prompt"), echo)
        n = choices_per_prompt(body, len(prompts))
        params = [sampling_params(body, len(p), engine.seq_len, 16, [], logprobs=k,  # OpenAI's and vLLM's default: 16
                                  prompt_logprobs=k if echo else None) for p in prompts]
        return await respond(request, body, prompts, params, n, chat=False, echo=texts)

    @app.post("/v1/chat/completions")
    @answering_bugs
    async def chat_completions(request: Request):
        body = await read_body(request)
        check_fields(body, "chat")
        k = top_logprobs(body, chat=True)
        prompt = await chat_prompt(body.get("messages"))
        check_length("messages", len(prompt), "tokens")
        n = choices_per_prompt(body, 1)
        params = sampling_params(body, len(prompt), engine.seq_len, None, chat_stop_ids, logprobs=k)  # default: the rest of the context
        return await respond(request, body, [prompt], [params], n, chat=True)

    @app.post("/tokenize")
    @answering_bugs
    async def tokenize(request: Request):
        """vLLM's: {"prompt": text} or {"messages": [...]} (with `add_generation_prompt`, which our
        template needs true) -> {"count", "max_model_len", "tokens", "token_strs"}. Our tokenizer
        adds no special tokens to text, so `add_special_tokens` changes nothing."""
        body = await read_body(request)
        chat = "messages" in body
        known = {"model", "add_special_tokens", "return_token_strs"} | (
            {"messages", "add_generation_prompt", "continue_final_message"} if chat else {"prompt"})
        for name in body.keys() - known:
            raise APIError(400, f"unknown field '{name}' (this endpoint takes: {', '.join(sorted(known))})", param=name)
        _field(body, "add_special_tokens", bool, True)
        if chat:
            if not _field(body, "add_generation_prompt", bool, True) or _field(body, "continue_final_message", bool, False):
                name = "continue_final_message" if body.get("continue_final_message") else "add_generation_prompt"
                raise APIError(400, f"'{name}': our chat template renders a conversation ending with a user turn, "
                                    f"then the assistant's start (add_generation_prompt true)", param=name)
            ids = await chat_prompt(body.get("messages"))
        else:
            text = _field(body, "prompt", str, None)
            if text is None:
                raise APIError(400, "'prompt' (a string) or 'messages' is required", param="prompt")
            check_length("prompt", len(text), "characters")
            ids = await asyncio.to_thread(tokenizer.encode, text)
        strs = [token_to_str(tokenizer.decode_bytes([i])) if i not in specials else tokenizer.decode([i]) for i in ids] \
            if _field(body, "return_token_strs", bool, False) else None
        return {"count": len(ids), "max_model_len": engine.seq_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    @answering_bugs
    async def detokenize(request: Request):
        """vLLM's: {"tokens": [ids]} -> {"prompt": text} (special tokens as their text)."""
        body = await read_body(request)
        for name in body.keys() - {"model", "tokens"}:
            raise APIError(400, f"unknown field '{name}' (this endpoint takes: model, tokens)", param=name)
        ids = body.get("tokens")
        if not is_ids(ids):
            raise APIError(400, "'tokens' must be a list of token ids", param="tokens")
        try:
            return {"prompt": await asyncio.to_thread(tokenizer.decode, ids)}
        except ValueError as e:
            raise APIError(400, f"tokens: {e}", param="tokens") from None

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "wetstone", "max_model_len": engine.seq_len}]}

    @app.get("/health")
    async def health():
        if not core.alive():
            return core.dead().response()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if api_key is not None:
        app.add_middleware(RequireAPIKey, key=api_key,
                           open_paths=set() if protect_health_metrics else {"/health", "/metrics"})
    app.add_middleware(CountResponses, counter=metrics.responses, routes={route.path for route in app.routes})
    return app
