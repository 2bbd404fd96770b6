"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn).

    POST /v1/completions        prompt (text or token ids) -> text; "stream": true for server-sent events
    POST /v1/chat/completions   messages, rendered with our chat template -> the assistant's reply
    GET  /v1/models             the one served model
    GET  /health                200 while the engine loop is alive
    GET  /metrics               Prometheus text, vLLM's metric names (vllm:...)

`python -m pipeline serve --model <final.pt> --tokenizer <tokenizer.json>`, or `--model <folder>`
alone for a folder written by export-hf (its safetensors weights and tokenizer.json read back by
pipeline/export.py's `load_hf` and `tokenizer_from_hf`).

One thread runs the engine: it steps while there is work and hands each request's new tokens to
that request's asyncio queue; HTTP handlers only queue requests and read their queues. A full
waiting queue answers 429; a stream whose client goes away aborts its request, which frees its
KV blocks at once. Errors use OpenAI's body: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipeline.artifacts import check_inputs
from pipeline.export import load_hf, tokenizer_from_hf
from pipeline.inference.engine import Engine, RequestOutput
from pipeline.inference.sampling import SamplingParams
from pipeline.model.gpt import GPT, load_final
from pipeline.tokenizer.bpe import ASSISTANT_END, BPETokenizer
from pipeline.tokenizer.chat import render_prompt

log = logging.getLogger(__name__)

# vLLM's buckets (vllm/v1/metrics/loggers.py), seconds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


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
        self.success = Counter("vllm:request_success", "Finished requests (abort: the client went away)",
                               ["model_name", "finished_reason"],
                               registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Preempted requests (recomputed)", **labels)
        self.model_name = model_name


@dataclass
class Stream:
    """A request's channel from the engine thread to its HTTP handler."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    prompt_tokens: int
    arrival: float = field(default_factory=time.perf_counter)
    last: float | None = None


class AsyncEngine:
    """Runs `engine.step()` in a thread; requests come and go from the event loop."""

    def __init__(self, engine: Engine, metrics: Metrics, max_waiting: int):
        self.engine, self.metrics, self.max_waiting = engine, metrics, max_waiting
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.streams: dict[int, Stream] = {}
        self.stopped = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], params: SamplingParams) -> tuple[int, Stream]:
        with self.lock:
            if self.engine.num_waiting >= self.max_waiting:
                raise APIError(429, f"the queue is full ({self.max_waiting} requests waiting); retry later",
                               kind="rate_limit_error", code="queue_full")
            request_id = self.engine.add_request(prompt, params)  # ValueError names the field
            stream = Stream(asyncio.get_running_loop(), asyncio.Queue(), len(prompt))
            self.streams[request_id] = stream
            self.metrics.prompt_tokens.labels(self.metrics.model_name).inc(len(prompt))
        self.wakeup.set()
        return request_id, stream

    def abort(self, request_id: int) -> None:
        with self.lock:
            if self.engine.abort(request_id):
                self.streams.pop(request_id, None)
                self.metrics.success.labels(self.metrics.model_name, "abort").inc()
                log.info("request %d aborted (client gone)", request_id)

    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def stop(self) -> None:
        self.stopped = True
        self.wakeup.set()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        m, name = self.metrics, self.metrics.model_name
        try:
            while not self.stopped:
                with self.lock:
                    busy = self.engine.has_work()
                    if busy:
                        preempted = self.engine.stats.preemptions
                        outputs = self.engine.step()
                        m.preemptions.labels(name).inc(self.engine.stats.preemptions - preempted)
                        now = time.perf_counter()
                        for out in outputs:
                            self._deliver(out, now)
                    m.running.labels(name).set(self.engine.num_running)
                    m.waiting.labels(name).set(self.engine.num_waiting)
                    m.kv_usage.labels(name).set(self.engine.blocks.usage)
                if not busy:
                    self.wakeup.wait(0.05)
                    self.wakeup.clear()
        except BaseException as e:  # a dead engine must fail every waiting request, not hang them
            self.error = e
            log.exception("engine loop died")
            with self.lock:
                for stream in self.streams.values():
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, e)

    def _deliver(self, out: RequestOutput, now: float) -> None:
        m, name = self.metrics, self.metrics.model_name
        stream = self.streams.get(out.request_id)
        if stream is None:
            return
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
        if out.new_token_ids or out.finished:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)


# --- request parsing ---------------------------------------------------------------------------

def _field(body: dict, name: str, kinds: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise APIError(400, f"'{name}' must be a number, not {value!r}", param=name)
    if not isinstance(value, kinds):
        raise APIError(400, f"'{name}' has the wrong type ({type(value).__name__}: {value!r})", param=name)
    return value


def sampling_params(body: dict, stop_ids: list[int]) -> SamplingParams:
    """SamplingParams from an OpenAI/vLLM request body; a bad value is a 400 naming its field."""
    if _field(body, "n", int, 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if body.get("stop"):
        raise APIError(400, "stop strings are not supported; use stop_token_ids", param="stop")
    max_tokens = _field(body, "max_tokens", int, None)
    max_tokens = _field(body, "max_completion_tokens", int, 16) if max_tokens is None else max_tokens
    try:
        return SamplingParams(
            temperature=float(_field(body, "temperature", (int, float), 1.0)),
            top_p=float(_field(body, "top_p", (int, float), 1.0)),
            top_k=_field(body, "top_k", int, 0),
            min_p=float(_field(body, "min_p", (int, float), 0.0)),
            repetition_penalty=float(_field(body, "repetition_penalty", (int, float), 1.0)),
            max_tokens=max_tokens,
            ignore_eos=_field(body, "ignore_eos", bool, False),
            seed=_field(body, "seed", int, None),
            stop_token_ids=[*stop_ids, *_field(body, "stop_token_ids", list, [])],
        )
    except ValueError as e:  # "SamplingParams.max_tokens=-1: must be >= 1"
        param = str(e).split("=", 1)[0].removeprefix("SamplingParams.")
        raise APIError(400, str(e), param=param) from None


# --- the app -----------------------------------------------------------------------------------

def create_app(engine: Engine, tokenizer: BPETokenizer, model_name: str, *, max_waiting: int = 256) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`. `engine.stop_token_ids` end every
    request (EOS); chat replies also end at <|assistant_end|>."""
    metrics = Metrics(model_name)
    core = AsyncEngine(engine, metrics, max_waiting)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        core.stop()

    app = FastAPI(title="wetstone", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.core = core
    created = int(time.time())
    specials = set(tokenizer.special_tokens.values())  # never part of a reply's text
    chat_stop_ids = [tokenizer.special_tokens[ASSISTANT_END]] if ASSISTANT_END in tokenizer.special_tokens else []

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        name = body.get("model")
        if name is not None and name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server has '{model_name}'", param="model",
                           code="model_not_found")
        return body

    async def submit(prompt: list[int], params: SamplingParams) -> tuple[int, Stream]:
        try:
            return core.submit(prompt, params)
        except ValueError as e:  # from the engine: "prompt: 300 tokens, the model's context is 256"
            raise APIError(400, str(e), param="prompt" if str(e).startswith("prompt") else None) from None

    async def tokens(request_id: int, stream: Stream) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come; abort it if the consumer stops early (a client
        that went away cancels the response's generator)."""
        finished = False
        try:
            while not finished:
                out = await stream.queue.get()
                if isinstance(out, BaseException):
                    raise APIError(500, f"the engine failed: {out!r}", kind="internal_error")
                finished = out.finished
                yield out
        finally:
            if not finished:
                core.abort(request_id)

    def text_of(ids: list[int], decoder) -> str:
        return decoder.decode(tokenizer.decode_bytes([i for i in ids if i not in specials]))

    async def respond(body: dict, prompt: list[int], params: SamplingParams, chat: bool):
        request_id, stream = await submit(prompt, params)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        obj = "chat.completion" if chat else "text_completion"
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens

        def choice(text: str, reason: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            message = {"content": text} if delta else {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): message, "finish_reason": reason}

        def usage(completion: int) -> dict:
            return {"prompt_tokens": len(prompt), "completion_tokens": completion,
                    "total_tokens": len(prompt) + completion}

        if not _field(body, "stream", bool, False):
            ids, reason = [], None
            async for out in tokens(request_id, stream):
                ids += out.new_token_ids
                reason = out.finish_reason
            text = text_of(ids, decoder) + decoder.decode(b"", final=True)
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                    "choices": [choice(text, reason, delta=False)], "usage": usage(len(ids))}

        include_usage = bool((_field(body, "stream_options", dict, {}) or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            def chunk(choices: list[dict], extra: dict | None = None) -> str:
                return "data: " + json.dumps({"id": rid, "object": obj + ".chunk" if chat else obj,
                                              "created": int(time.time()), "model": model_name,
                                              "choices": choices, **(extra or {})}) + "\n\n"
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            n = 0
            try:
                async for out in tokens(request_id, stream):
                    n += len(out.new_token_ids)
                    text = text_of(out.new_token_ids, decoder)
                    if out.finished:
                        text += decoder.decode(b"", final=True)
                    yield chunk([choice(text, out.finish_reason, delta=True)])
            except APIError as e:
                yield "data: " + json.dumps({"error": {"message": e.message, "type": e.kind}}) + "\n\n"
                return
            if include_usage:
                yield chunk([], {"usage": usage(n)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        else:
            raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt per request)",
                           param="prompt")
        return await respond(body, ids, sampling_params(body, []), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        try:
            ids = render_prompt(tokenizer, body.get("messages"))
        except ValueError as e:  # names the bad message: "message 1: role 'user' out of place ..."
            raise APIError(400, str(e), param="messages") from None
        return await respond(body, ids, sampling_params(body, chat_stop_ids), chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "wetstone", "max_model_len": engine.seq_len}]}

    @app.get("/health")
    async def health():
        if not core.alive():
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# --- command line: python -m pipeline serve ----------------------------------------------------

def load_model(path: str | Path, device: str) -> tuple[GPT, dict]:
    """A final.pt (`load_final`) or an export-hf folder (`load_hf`): the GPT and its metadata."""
    return load_hf(path, device) if Path(path).is_dir() else load_final(path, device)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="final.pt (pretrain, sft or grpo), or a folder written by export-hf (weights and tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer.json (the tokenizer stage's); needed with a final.pt, "
                                            "default with an exported folder: the folder's own")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the model's name in the API (default: the final.pt's folder "
                                                    "name, or the exported folder's)")
    parser.add_argument("--draft-model", help="final.pt or exported folder of a smaller model for speculative decoding")
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together at most")
    parser.add_argument("--block-size", type=int, default=16, help="token slots per KV-cache block")
    parser.add_argument("--num-blocks", type=int, help="KV-cache blocks (default: max-batch-size full contexts)")
    parser.add_argument("--chunked-prefill", action="store_true", help="cut long prompts to the step's token budget")
    parser.add_argument("--max-waiting", type=int, default=256, help="queued requests at most; more get 429")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


def run(args) -> int:
    import torch
    import uvicorn

    torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    exported = Path(args.model).is_dir()
    if not exported and args.tokenizer is None:
        raise SystemExit(f"--model {args.model} is not an export-hf folder: a final.pt needs --tokenizer (tokenizer.json)")
    # a file in a results folder is checked against its stage's manifest; one made by hand is served as is
    for path in check_inputs(args.model, args.tokenizer, args.draft_model, required=False):
        log.info("%s: sha256 matches its manifest", path)
    model, meta = load_model(args.model, device)
    draft = load_model(args.draft_model, device)[0] if args.draft_model else None
    if args.tokenizer is not None:
        tokenizer = BPETokenizer.load(args.tokenizer)
    else:
        tokenizer = tokenizer_from_hf(Path(args.model) / "tokenizer.json")
    if tokenizer.n_vocab != model.config.vocab_size:
        raise ValueError(f"{args.tokenizer or args.model}: {tokenizer.n_vocab} ids, but {args.model} was trained on "
                         f"{model.config.vocab_size}: not this model's tokenizer")
    stop = [] if meta["eos_id"] is None else [int(meta["eos_id"])]  # an export without eos_token_id stops at max_tokens
    engine = Engine(model, max_batch_size=args.max_batch_size, block_size=args.block_size, num_blocks=args.num_blocks,
                    draft_model=draft, num_speculative_tokens=args.num_speculative_tokens,
                    chunked_prefill=args.chunked_prefill, stop_token_ids=stop)
    path = Path(args.model).resolve()
    name = args.served_model_name or (path.name if exported else path.parent.name)
    app = create_app(engine, tokenizer, name, max_waiting=args.max_waiting)
    log.info("serving %s (%s, context %d) on http://%s:%d/v1", name, args.model, model.config.seq_len, args.host,
             args.port)
    # log_config=None: uvicorn's own logging config would close the --log file's handler
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", log_config=None)
    return 0
