"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

    POST /v1/completions        prompt (text or token ids) -> text; "stream": true for server-sent events
    POST /v1/chat/completions   messages, rendered with our chat template -> the assistant's reply
    GET  /v1/models             the one served model
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

Every error has OpenAI's body, {"error": {"message", "type", "param", "code"}}: 4xx for what the
client sent (`param` names the field), 500/503 for server faults (docs/inference.md, "Errors").
Every request field is honoured or refused: a field this server does not build is accepted only
at the default that asks for nothing (`n: 1`, `echo: false`, ...), anything else is a 400.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
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
from pipeline.inference.sampling import InvalidParam, SamplingParams
from pipeline.inference.sequence import RequestOutput
from pipeline.tokenizer.bpe import ASSISTANT_END, BPETokenizer
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
# repetition_penalty, ignore_eos, stop_token_ids, return_token_ids). `user` is OpenAI's end-user id:
# it is logged with the request's failures.
SAMPLING_FIELDS = {"model", "stream", "stream_options", "temperature", "top_p", "top_k", "min_p",
                   "repetition_penalty", "max_tokens", "max_completion_tokens", "seed", "ignore_eos",
                   "stop_token_ids", "return_token_ids", "user"}
FIELDS = {"completions": SAMPLING_FIELDS | {"prompt"}, "chat": SAMPLING_FIELDS | {"messages"}}
# Fields not built (yet), with the values that ask for nothing, which clients send as defaults;
# any other value is refused with a 400 naming the field.
NOT_BUILT: dict[str, tuple] = {
    "n": (1,), "best_of": (1,), "stop": ("", []), "echo": (False,), "logprobs": (False,), "top_logprobs": (),
    "suffix": ("",), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
    "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


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


# --- the hand-off between the event loop and the engine thread ---------------------------------

@dataclass(eq=False)
class Stream:
    """One request on its way to the engine thread, and its outputs on the way back (`queue`,
    read on the event loop)."""
    prompt: list[int]
    params: SamplingParams
    user: str | None = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    request_id: int | None = None  # the engine's id, set on the engine thread
    last: float | None = None  # when its last token was delivered


CLIENT_GONE = object()  # put on a stream's queue when its client disconnects


class AsyncEngine:
    """The engine on its own thread, fed through `inbox`: ("add" | "abort", stream), or
    ("abort_all" | "stop", None). The loop side only puts on the queue, so it never waits."""

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

    def submit(self, stream: Stream) -> None:
        if not self.alive():
            raise self.dead()
        if self.closing:
            raise shutting_down()
        if self.num_waiting + self.inbox.qsize() >= self.max_waiting:
            raise APIError(429, f"the queue is full ({self.max_waiting} requests waiting); retry later",
                           kind="rate_limit_error", code="queue_full")
        self.inbox.put(("add", stream))
        if not self.alive():  # it died as we queued: nothing will answer
            raise self.dead()

    def abort(self, stream: Stream) -> None:
        self.inbox.put(("abort", stream))

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
                self._add(stream)
            elif stream.request_id is not None and self.engine.abort(stream.request_id):
                del self.streams[stream.request_id]
                self.metrics.success.labels(self.metrics.model_name, "abort").inc()
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
                streams.append(stream)

    def _send(self, items: list[tuple[Stream, Any]]) -> None:
        """Hand outputs to the loop: one wakeup for the whole step."""
        if items and self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody left to tell
                self.loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[Stream, Any]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


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
    for name, value in body.items():
        if name in FIELDS[endpoint]:
            continue
        if name not in NOT_BUILT:
            raise APIError(400, f"unknown field '{name}' (this endpoint takes: {', '.join(sorted(FIELDS[endpoint]))})",
                           param=name)
        if value is not None and not any(value == d and isinstance(value, bool) == isinstance(d, bool)
                                         for d in NOT_BUILT[name]):
            allowed = " or ".join(json.dumps(d) for d in NOT_BUILT[name]) or "null"
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


def sampling_params(body: dict, prompt_len: int, seq_len: int, default_max_tokens: int | None,
                    stop_ids: list[int]) -> SamplingParams:
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
            max_tokens=max_tokens,
            ignore_eos=_field(body, "ignore_eos", bool, False),
            seed=_field(body, "seed", int, None),
            stop_token_ids=[*stop_ids, *stop_token_ids],
        )
    except InvalidParam as e:
        raise APIError(400, str(e), param=name if e.param == "max_tokens" else e.param) from None


# --- the app -----------------------------------------------------------------------------------

def create_app(engine: Engine, tokenizer: BPETokenizer, model_name: str, *, max_waiting: int = 256,
               max_body_bytes: int = 1 << 20, max_prompt_tokens: int | None = None) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`. `engine.stop_token_ids` end every
    request (EOS, unless ignore_eos); chat replies also end at <|assistant_end|>. Bodies over
    `max_body_bytes` get 413; prompts over `max_prompt_tokens` (default and at most: the
    context) get 400, text prompts checked before tokenizing."""
    if max_body_bytes < 1 or (max_prompt_tokens is not None and max_prompt_tokens < 1):
        raise ValueError(f"max_body_bytes={max_body_bytes}, max_prompt_tokens={max_prompt_tokens}: must be >= 1")
    metrics = Metrics(model_name)
    core = AsyncEngine(engine, metrics, max_waiting)
    max_prompt_tokens = engine.seq_len if max_prompt_tokens is None else min(max_prompt_tokens, engine.seq_len)
    # a token is at most `longest` bytes and a character at least one, so a text of more than
    # max_prompt_tokens x longest characters cannot fit: known without tokenizing it
    max_prompt_chars = max_prompt_tokens * max(len(t) for t in tokenizer.vocab)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        core.start(asyncio.get_running_loop())
        yield
        await asyncio.to_thread(core.stop, 5.0)

    app = FastAPI(title="wetstone", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.core = core
    created = int(time.time())
    specials = set(tokenizer.special_tokens.values())  # never part of a reply's text
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

    async def completion_prompt(prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            check_length("prompt", len(prompt), "characters")
            return await asyncio.to_thread(tokenizer.encode, prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                       param="prompt")

    async def chat_prompt(messages: Any) -> list[int]:
        if isinstance(messages, list):
            check_length("messages", sum(len(m["content"]) for m in messages
                                         if isinstance(m, dict) and isinstance(m.get("content"), str)), "characters")
        try:
            return await asyncio.to_thread(chat_prompt_ids, tokenizer, messages)
        except ValueError as e:  # names the bad message: "message 1: role 'user' out of place ..."
            raise APIError(400, str(e), param="messages") from None

    async def abort_on_disconnect(request: Request, stream: Stream) -> None:
        """Wait for the client to go (or the response to end), then abort: the engine ignores
        the abort of a finished request. Started at submission, so no path can miss it."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        core.abort(stream)
        stream.queue.put_nowait(CLIENT_GONE)

    async def outputs(stream: Stream, watcher: asyncio.Task) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine makes them, until it finishes or its client goes;
        a consumer that stops early (its task cancelled) aborts it too."""
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if item is CLIENT_GONE:
                    return
                if isinstance(item, BaseException):  # the engine loop died, or could not take the request
                    finished = True
                    raise server_error(f"the engine failed: {item!r}")
                finished = item.finished
                if item.finish_reason == "error":
                    raise server_error(f"the engine failed on this request: {item.error}")
                if item.finish_reason == "abort":  # the server is stopping (a client's own abort sends nothing)
                    raise shutting_down()
                yield item
        finally:
            watcher.cancel()
            if not finished:
                core.abort(stream)

    def text_of(out: RequestOutput, decoder: codecs.IncrementalDecoder) -> str:
        # a stop token's text is not part of the reply (vLLM); it counts in usage
        ids = out.new_token_ids[:-1] if out.finish_reason == "stop" else out.new_token_ids
        text = decoder.decode(tokenizer.decode_bytes([i for i in ids if i not in specials]))
        return text + decoder.decode(b"", final=True) if out.finished else text

    async def respond(request: Request, body: dict, prompt: list[int], params: SamplingParams, chat: bool):
        streaming = _field(body, "stream", bool, False)
        include_usage = bool((_field(body, "stream_options", dict, {}) or {}).get("include_usage"))
        try:
            engine.check_request(prompt, params)
        except InvalidParam as e:
            raise APIError(400, str(e), param=e.param) from None
        stream = Stream(prompt, params, user=_field(body, "user", str, None))
        core.submit(stream)
        watcher = asyncio.create_task(abort_on_disconnect(request, stream))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if chat else "text_completion"
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens

        return_token_ids = _field(body, "return_token_ids", bool, False)

        def choice(text: str, reason: str | None, delta: bool, ids: list[int]) -> dict:
            if not chat:
                c = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            else:
                message = {"content": text} if delta else {"role": "assistant", "content": text}
                c = {"index": 0, ("delta" if delta else "message"): message, "finish_reason": reason}
            return {**c, "token_ids": ids} if return_token_ids else c  # vLLM's: the (new) tokens' ids

        def usage(completion: int) -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": completion,
                    "total_tokens": len(prompt) + completion}

        if not streaming:
            text, ids, reason = "", [], None
            async for out in outputs(stream, watcher):
                text += text_of(out, decoder)
                ids += out.new_token_ids
                reason = out.finish_reason
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                    "choices": [choice(text, reason, delta=False, ids=ids)], "usage": usage(len(ids))}

        async def events() -> AsyncIterator[str]:
            def chunk(choices: list[dict], extra: dict | None = None) -> str:
                return "data: " + json.dumps({"id": rid, "object": obj + ".chunk" if chat else obj,
                                              "created": int(time.time()), "model": model_name,
                                              "choices": choices, **(extra or {})}) + "\n\n"
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            n = 0
            try:
                async for out in outputs(stream, watcher):
                    n += len(out.new_token_ids)
                    yield chunk([choice(text_of(out, decoder), out.finish_reason, delta=True, ids=out.new_token_ids)])
            except Exception as e:  # the status line has gone: the error is an event, as vLLM sends it
                if not isinstance(e, APIError):  # a bug
                    log.exception("streaming a reply failed")
                    e = server_error(f"internal error: {e!r}")
                yield "data: " + json.dumps(e.body()) + "\n\n"
            else:
                if include_usage:
                    yield chunk([], {"usage": usage(n)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    @answering_bugs
    async def completions(request: Request):
        body = await read_body(request)
        check_fields(body, "completions")
        prompt = await completion_prompt(body.get("prompt"))
        check_length("prompt", len(prompt), "tokens")
        params = sampling_params(body, len(prompt), engine.seq_len, 16, [])  # OpenAI's and vLLM's default: 16
        return await respond(request, body, prompt, params, chat=False)

    @app.post("/v1/chat/completions")
    @answering_bugs
    async def chat_completions(request: Request):
        body = await read_body(request)
        check_fields(body, "chat")
        prompt = await chat_prompt(body.get("messages"))
        check_length("messages", len(prompt), "tokens")
        params = sampling_params(body, len(prompt), engine.seq_len, None, chat_stop_ids)  # default: the rest of the context
        return await respond(request, body, prompt, params, chat=True)

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

    app.add_middleware(CountResponses, counter=metrics.responses, routes={route.path for route in app.routes})
    return app
