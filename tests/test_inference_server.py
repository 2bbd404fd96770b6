"""The OpenAI-compatible server (pipeline/inference/server.py), driven by the real `openai`
client over loopback HTTP against uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import start_serve
from conftest import seal
from pipeline.inference import Engine, SamplingParams
from pipeline.inference.server import create_app
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.tokenizer.bpe import ASSISTANT_END, CHAT_SPECIAL_TOKENS, BPETokenizer
from pipeline.tokenizer.chat import render_prompt
from test_inference_engine import one_thread  # noqa: F401 (an autouse fixture: one torch thread)


@pytest.fixture(scope="module")
def tokenizer(stories) -> BPETokenizer:
    return BPETokenizer.train(stories[:20], vocab_size=300, special_tokens=CHAT_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_size("nano", vocab_size=tokenizer.n_vocab, seq_len=64)).eval()


@pytest.fixture(scope="module")
def long_model(tokenizer) -> GPT:
    """A nano model with a 1,024-token context: requests that decode for a long while."""
    torch.manual_seed(0)
    return GPT(GPTConfig.from_size("nano", vocab_size=tokenizer.n_vocab, seq_len=1024)).eval()


class Served:
    def __init__(self, app, engine):
        self.app, self.engine = app, engine
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)
        self.http = httpx.Client(base_url=self.url, timeout=30)  # one connection: a new client costs ~20 ms

    def metrics(self) -> dict[str, float]:
        text = self.http.get("/metrics").text
        return {s.name + str(sorted((k, v) for k, v in s.labels.items() if k != "model_name")): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def close(self):
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(model, tokenizer, **options) -> Served:
    engine = Engine(model, max_batch_size=4, block_size=8, stop_token_ids=[tokenizer.eos_id])
    return Served(create_app(engine, tokenizer, "nano", **options), engine)


@pytest.fixture(scope="module")
def served(model, tokenizer):
    s = serve(model, tokenizer)
    yield s
    s.close()


def greedy_text(model, tokenizer, prompt: str, n: int) -> tuple[str, list[int]]:
    ids = tokenizer.encode(prompt)
    out = Engine(model, max_batch_size=1, stop_token_ids=[tokenizer.eos_id]).generate(
        [ids], SamplingParams(temperature=0.0, max_tokens=n))[0].token_ids
    specials = set(tokenizer.special_tokens.values())  # skipped in text, as vLLM's skip_special_tokens
    return tokenizer.decode([t for t in out if t not in specials]), out


def wait_idle(engine: Engine) -> None:
    deadline = time.monotonic() + 10
    while engine.has_work() or engine.blocks.num_free != engine.blocks.num_blocks:
        assert time.monotonic() < deadline, f"{engine.num_running} running, {engine.blocks.num_free} blocks free"
        time.sleep(0.01)


def test_completion_matches_the_engine(served, model, tokenizer):
    prompt = "Once upon a time, there was a"
    text, ids = greedy_text(model, tokenizer, prompt, 20)
    r = served.client.completions.create(model="nano", prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == text
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt)) and r.usage.completion_tokens == len(ids)
    assert r.choices[0].finish_reason == ("stop" if ids[-1] == tokenizer.eos_id else "length")


def test_streaming_gives_the_same_text(served, model, tokenizer):
    prompt = "The little dog"
    text, _ = greedy_text(model, tokenizer, prompt, 24)
    stream = served.client.completions.create(model="nano", prompt=prompt, max_tokens=24, temperature=0, stream=True)
    chunks = [c.choices[0].text for c in stream]
    assert "".join(chunks) == text and len(chunks) > 2


def test_chat_goes_through_our_template_and_stops_at_assistant_end(served, model, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    end = tokenizer.special_tokens[ASSISTANT_END]
    ids = render_prompt(tokenizer, messages)
    expected = Engine(model, max_batch_size=1, stop_token_ids=[tokenizer.eos_id, end]).generate(
        [ids], SamplingParams(temperature=0.0, max_tokens=30))[0].token_ids
    r = served.client.chat.completions.create(model="nano", messages=messages, max_tokens=30, temperature=0)
    assert r.choices[0].message.role == "assistant"
    specials = set(tokenizer.special_tokens.values())  # skipped in text, as vLLM's skip_special_tokens
    assert r.choices[0].message.content == tokenizer.decode([t for t in expected if t not in specials])
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)
    stream = served.client.chat.completions.create(model="nano", messages=messages, max_tokens=30, temperature=0,
                                                   stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="message 1"):
        served.client.chat.completions.create(model="nano", max_tokens=3, messages=[
            {"role": "user", "content": "hi"}, {"role": "user", "content": "again"}])


def test_models_health_metrics(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == ["nano"]
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    names = {k.split("[")[0] for k in served.metrics()}
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total"):
        assert name in names, name


def raw_post(served: Served, content: str | bytes, path: str = "/v1/completions") -> httpx.Response:
    return served.http.post(path, content=content, headers={"content-type": "application/json"})


def assert_openai_error(r: httpx.Response, status: int, param: Any = ..., match: str = "") -> dict:
    """OpenAI's error body with this status (and `param`, unless left out)."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and match in error["message"], error
    assert param is ... or error["param"] == param, error
    assert error["type"] == ("server_error" if status >= 500 else "rate_limit_error" if status == 429
                             else "invalid_request_error")
    return error


def test_bad_requests_get_openai_errors(served):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        served.client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens") as e:
        served.client.completions.create(model="nano", prompt="hi", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="context is 64"):
        served.client.completions.create(model="nano", prompt=list(range(65)), max_tokens=2)
    assert_openai_error(httpx.post(served.url + "/v1/completions", json={"prompt": "hi", "temperature": "hot"}),
                        400, "temperature")
    assert_openai_error(httpx.get(served.url + "/v1/nowhere"), 404, None)
    assert_openai_error(httpx.get(served.url + "/v1/completions"), 405, None)


def test_a_server_bug_is_still_an_openai_error(served, tokenizer, monkeypatch):
    """An unexpected exception in a handler: 500 with OpenAI's body, or an error event when
    streaming; the server goes on."""
    def broken(ids):
        raise RuntimeError("injected decoding bug")
    monkeypatch.setattr(tokenizer, "decode_bytes", broken)
    body = {"prompt": "hi", "max_tokens": 3}
    assert_openai_error(served.http.post("/v1/completions", json=body), 500, None, "injected decoding bug")
    events = served.http.post("/v1/completions", json={**body, "stream": True}).text.split("\n\n")
    assert "injected decoding bug" in json.loads(events[0].removeprefix("data: "))["error"]["message"]
    assert events[1] == "data: [DONE]"
    monkeypatch.undo()
    assert served.client.completions.create(model="nano", prompt="hi", max_tokens=3).choices[0].text is not None


PATHOLOGICAL = [  # raw body, status, param, a word of the message
    ('{"prompt": "hi",', 400, None, "not valid JSON"),
    (b'{"prompt": "\xff"}', 400, None, "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, 400, None, "not valid JSON"),  # nesting deeper than the parser goes
    ('{"prompt": "hi", "seed": ' + "7" * 5000 + "}", 400, None, "not valid JSON"),  # > 4300 digits
    ('["hi"]', 400, None, "JSON object"),
    ('{"prompt": "hi", "stop_token_ids": [[1]]}', 400, "stop_token_ids", "list of token ids"),
    ('{"prompt": "hi", "stop_token_ids": [100000]}', 400, "stop_token_ids", "outside the vocabulary"),
    ('{"prompt": "hi", "stop_token_ids": [true]}', 400, "stop_token_ids", "list of token ids"),
    ('{"prompt": [1, 2, 100000]}', 400, "prompt", "outside the vocabulary"),
    ('{"prompt": [1, true]}', 400, "prompt", "list of token ids"),
    ('{"prompt": [[1, 2], "x", 3]}', 400, "prompt", "non-empty list of either"),
    ('{"prompt": []}', 400, "prompt", "empty"),
    ('{"prompt": [[1, 2], []]}', 400, "prompt", "empty"),
    ('{"prompt": "hi", "n": 0}', 400, "n", ">= 1"),
    ('{"prompt": "hi", "n": 1000}', 400, "n", "at most 256"),
    ('{"prompt": "hi", "stop": ["a", ""]}', 400, "stop", "non-empty string"),
    ('{"prompt": "hi", "stop": 5}', 400, "stop", "non-empty string"),
    ('{"prompt": "hi", "stop": ["x"] * 17}'.replace('["x"] * 17', json.dumps(["x"] * 17)), 400, "stop", "at most 16"),
    ('{"prompt": "hi", "stop": "%s"}' % ("x" * 257), 400, "stop", "at most 256 characters"),
    ('{"prompt": "hi", "logprobs": 21}', 400, "logprobs", "[0, 20]"),
    ('{"prompt": "hi", "logprobs": true}', 400, "logprobs", "must be a number"),
    ('{"prompt": "hi", "echo": 1}', 400, "echo", "wrong type"),
    ('{"prompt": "hi", "presence_penalty": 2.5}', 400, "presence_penalty", "[-2, 2]"),
    ('{"prompt": "hi", "frequency_penalty": -3}', 400, "frequency_penalty", "[-2, 2]"),
    ('{"prompt": "hi", "top_logprobs": 2}', 400, "top_logprobs", "not supported"),
    ('{"prompt": "hi", "seed": 9223372036854775807, "n": 2}', 400, "seed", "siblings"),
    ('{"prompt": ""}', 400, "prompt", "empty"),
    ('{"prompt": "hi", "temperature": Infinity}', 400, "temperature", "[0, 2]"),
    ('{"prompt": "hi", "temperature": NaN}', 400, "temperature", "[0, 2]"),
    ('{"prompt": "hi", "temperature": 1e300}', 400, "temperature", "[0, 2]"),
    ('{"prompt": "hi", "temperature": 1' + "0" * 400 + "}", 400, "temperature", "[0, 2]"),
    ('{"prompt": "hi", "top_p": 1e-300, "temperature": 1}', 400, "top_p", "float32"),
    ('{"prompt": "hi", "repetition_penalty": 1e-300}', 400, "repetition_penalty", "float32"),
    ('{"prompt": "hi", "seed": 18446744073709551616}', 400, "seed", "must be in"),
    ('{"prompt": "hi", "seed": -9223372036854775809}', 400, "seed", "must be in"),
    ('{"prompt": "hi", "max_tokens": 100}', 400, "max_tokens", "too large"),
    ('{"prompt": "hi", "max_completion_tokens": 64}', 400, "max_completion_tokens", "too large"),
    ('{"prompt": "hi", "max_tokens": 0}', 400, "max_tokens", ">= 1"),
    ('{"prompt": "hi", "max_tokens": 3, "max_completion_tokens": 4}', 400, "max_completion_tokens", "differ"),
    ('{"prompt": "hi", "top_k": 1.5}', 400, "top_k", "wrong type"),
    ('{"prompt": "hi", "ignore_eos": 1}', 400, "ignore_eos", "wrong type"),
    ('{"prompt": "hi", "model": 5}', 400, "model", "wrong type"),
    ('{"prompt": "hi", "stream_options": {"include_usage": true}}', 400, "stream_options", "stream"),
    ('{"prompt": "hi", "stream": true, "stream_options": {"x": 1}}', 400, "stream_options", "unknown keys"),
    ('{"prompt": "hi", "frobnicate": 1}', 400, "frobnicate", "unknown field"),
]


@pytest.mark.parametrize("body, status, param, match", PATHOLOGICAL, ids=lambda v: str(v)[:40])
def test_pathological_requests_get_4xx_with_openai_bodies(served, body, status, param, match):
    assert_openai_error(raw_post(served, body), status, param, match)


BOTH = ("/v1/completions", "/v1/chat/completions")


@pytest.mark.parametrize("field, default, value, paths", [
    ("best_of", 1, 3, BOTH), ("suffix", "", "end", BOTH), ("logit_bias", {}, {"5": 10}, BOTH),
    ("response_format", {"type": "text"}, {"type": "json_object"}, BOTH),
    ("tools", [], [{"type": "function", "function": {"name": "f"}}], BOTH), ("tool_choice", "none", "auto", BOTH),
    ("echo", False, True, BOTH[1:]), ("top_logprobs", None, 2, BOTH[:1]),
])
def test_every_field_is_honoured_or_refused(served, field, default, value, paths):
    """A field the server does not build is refused with a 400 naming it, unless it carries the
    default that asks for nothing (which clients send), which is answered as without it."""
    bodies = {"/v1/completions": {"prompt": "hi"}, "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]}}
    for path in paths:
        body = {**bodies[path], "max_tokens": 3, "temperature": 0}
        assert_openai_error(httpx.post(served.url + path, json={**body, field: value}), 400, field, "not supported")
        r = httpx.post(served.url + path, json={**body, field: default})
        assert r.status_code == 200, r.text
        assert r.json()["choices"] == httpx.post(served.url + path, json=body).json()["choices"]


NUMERIC_FIELDS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "max_completion_tokens",
                  "seed", "n", "best_of", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty"]
EXTREMES = [0, -0.0, 1, -1, 0.5, 2, 2.0000001, 16, 1e-300, -1e-300, 1.4e-45, 1e-38, 3.4e38, 3.5e38, 1e300, -1e300,
            float("inf"), -float("inf"), float("nan"), 2**31, 2**63 - 1, 2**63, 2**64, -2**63 - 1, 10**400, True, False]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chat=st.booleans(), stream=st.booleans(),
       fields=st.dictionaries(st.sampled_from(NUMERIC_FIELDS), st.sampled_from(EXTREMES), max_size=5),
       stop_id=st.none() | st.sampled_from(EXTREMES), prompt_id=st.none() | st.sampled_from(EXTREMES))
def test_no_numeric_extreme_stops_the_engine(served, chat, stream, fields, stop_id, prompt_id):
    """Every numeric field (and a stop or prompt token id) at its extremes, on a padded vocabulary
    (300 ids in 320 rows): each request is answered 200 or refused with a 400 naming a field it
    sent; never a 500, and the engine stays up, idle and with every block free afterwards."""
    body: dict = {"model": "nano", "stream": stream, **fields}
    if chat:
        body["messages"] = [{"role": "user", "content": "Tell me a story."}]
    else:
        body["prompt"] = [1, 2, 3] if prompt_id is None else [1, prompt_id]
    if stop_id is not None:
        body["stop_token_ids"] = [stop_id]
    r = raw_post(served, json.dumps(body), "/v1/chat/completions" if chat else "/v1/completions")
    if r.status_code == 200:
        if stream:
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1]), r.text
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        error = assert_openai_error(r, 400)
        assert error["param"] in body, (body, error)
    wait_idle(served.engine)
    assert served.http.get("/health").status_code == 200
    assert "error" not in str(served.metrics())


def test_vllm_semantics_stop_token_text_ignore_eos_chat_length(served, model, tokenizer):
    """A stop token ends the reply but its text is not in it (it counts in usage); ignore_eos
    ignores EOS only, not stop_token_ids; chat's max_tokens defaults to the rest of the context."""
    prompt = "Once upon a time, there was a"
    _, ids = greedy_text(model, tokenizer, prompt, 12)
    stop = next(t for t in ids[2:] if t not in tokenizer.special_tokens.values())
    kept = ids[:ids.index(stop)]
    for ignore_eos in (False, True):
        r = served.client.completions.create(model="nano", prompt=prompt, max_tokens=12, temperature=0,
                                             extra_body={"stop_token_ids": [stop], "ignore_eos": ignore_eos})
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(kept) + 1
        assert r.choices[0].text == tokenizer.decode(kept)
    stream = served.client.completions.create(model="nano", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                              extra_body={"stop_token_ids": [stop]})
    assert "".join(c.choices[0].text for c in stream) == tokenizer.decode(kept)

    messages = [{"role": "user", "content": "Tell me a story."}]
    r = served.client.chat.completions.create(model="nano", messages=messages, temperature=0,
                                              extra_body={"ignore_eos": True})
    room = 64 - len(render_prompt(tokenizer, messages))
    assert r.usage.completion_tokens == room and r.choices[0].finish_reason == "length"  # 16 for completions


def test_size_limits_refuse_before_tokenizing(model, tokenizer, monkeypatch):
    """Bodies over max_body_bytes get 413 (declared or streamed without a length); prompts longer
    than max_prompt_tokens get 400, a text whose length alone rules it out without being
    tokenized (the tokenizer is never called for it)."""
    s = serve(model, tokenizer, max_body_bytes=4000, max_prompt_tokens=10)
    try:
        body = json.dumps({"prompt": "x" * 5000})
        assert_openai_error(raw_post(s, body), 413, None, "4000 bytes")
        chunked = s.http.post("/v1/completions", content=iter([body[:3000].encode(), body[3000:].encode()]))
        assert_openai_error(chunked, 413, None, "4000 bytes")
        encoded: list[int] = []
        real_encode = tokenizer.encode
        monkeypatch.setattr(tokenizer, "encode", lambda text, *a: encoded.append(len(text)) or real_encode(text, *a))
        longest = max(len(t) for t in tokenizer.vocab)
        assert_openai_error(s.http.post("/v1/completions", json={"prompt": "x" * (10 * longest + 1)}), 400, "prompt",
                            "characters, more than the 10 tokens allowed could hold")
        assert_openai_error(s.http.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "x" * (10 * longest + 1)}]}), 400, "messages", "characters")
        assert encoded == []  # refused before tokenizing
        assert_openai_error(s.http.post("/v1/completions", json={"prompt": list(range(11))}), 400, "prompt",
                            "11 tokens, more than the 10 tokens allowed")
        assert_openai_error(s.http.post("/v1/completions", json={"prompt": "Once upon a time, there was a little"}),
                            400, "prompt", "more than the 10 tokens allowed")
        assert encoded  # within the character bound: tokenized, then counted
        assert s.http.post("/v1/completions", json={"prompt": list(range(10)), "max_tokens": 2}).status_code == 200
    finally:
        s.close()


def test_full_queue_answers_429(model, tokenizer):
    s = serve(model, tokenizer, max_waiting=0)
    try:
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            s.client.completions.create(model="nano", prompt="hi", max_tokens=2)
    finally:
        s.close()


def test_a_failing_request_fails_alone_and_the_engine_goes_on(model, tokenizer, monkeypatch):
    """Sampling raises for one request while others decode: it gets a 500 with OpenAI's body
    (an error event when streaming), the others finish with the engine's own tokens, /health
    stays 200 and the next request is served."""
    import pipeline.inference.engine as engine_module
    real_sample = engine_module.sample

    def sample(logits, params, *args):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("injected sampling failure")
        return real_sample(logits, params, *args)

    monkeypatch.setattr(engine_module, "sample", sample)
    s = serve(model, tokenizer)
    prompts = ["Once upon a time", "The little dog", "A big red ball", "She was happy"]
    expected = [greedy_text(model, tokenizer, p, 30)[0] for p in prompts]
    try:
        async def main():
            client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
            good = [client.completions.create(model="nano", prompt=p, max_tokens=30, temperature=0) for p in prompts]
            bad = client.completions.create(model="nano", prompt="Hi", max_tokens=30, temperature=0, seed=666)

            async def bad_stream():
                stream = await client.completions.create(model="nano", prompt="Hi", max_tokens=30, seed=666, stream=True)
                return [c async for c in stream]
            return await asyncio.gather(*good, bad, bad_stream(), return_exceptions=True)

        *good, bad, bad_stream = asyncio.run(main())
        assert [r.choices[0].text for r in good] == expected
        assert isinstance(bad, openai.InternalServerError) and "injected sampling failure" in str(bad)
        assert bad.body["type"] == "server_error"
        assert isinstance(bad_stream, openai.APIError) and "injected sampling failure" in str(bad_stream)
        assert s.http.get("/health").status_code == 200
        assert s.client.completions.create(model="nano", prompt=prompts[0], max_tokens=30,
                                           temperature=0).choices[0].text == expected[0]
        wait_idle(s.engine)
        assert s.metrics()["vllm:request_success_total[('finished_reason', 'error')]"] == 2
    finally:
        s.close()


def test_a_dead_engine_loop_refuses_at_once_and_says_why(long_model, tokenizer):
    """A fault outside any one request kills the engine loop: requests in flight fail (500),
    new ones get 503 at once, /health says 503 and why, and the server still shuts down."""
    s = serve(long_model, tokenizer)
    try:
        stream = s.client.completions.create(model="nano", prompt="Once", max_tokens=1000, stream=True,
                                             extra_body={"ignore_eos": True})
        next(iter(stream))

        def broken_schedule():
            raise RuntimeError("injected scheduler fault")
        s.engine.scheduler.schedule = broken_schedule
        with pytest.raises(openai.APIError, match="injected scheduler fault"):
            list(stream)
        start = time.monotonic()
        with pytest.raises(openai.InternalServerError, match="engine loop has stopped") as e:
            s.client.completions.create(model="nano", prompt="Once", max_tokens=2)
        assert e.value.status_code == 503 and time.monotonic() - start < 2
        assert_openai_error(s.http.get("/health"), 503, None, "injected scheduler fault")
        assert s.metrics()["wetstone:requests_rejected_total[('reason', 'engine_stopped')]"] == 1
    finally:
        start = time.monotonic()
        s.close()
        assert not s.thread.is_alive() and time.monotonic() - start < 5


def test_a_burst_of_clients_that_leave_is_aborted(long_model, tokenizer):
    """32 clients leave after a few tokens, 16 streaming (they hang up after 3 chunks) and 16
    not (they hang up once every request is in the engine): all 32 requests are aborted, counted
    as such, and every KV block comes back."""
    engine = Engine(long_model, max_batch_size=32, block_size=16, stop_token_ids=[tokenizer.eos_id])
    s = Served(create_app(engine, tokenizer, "nano"), engine)
    prompt = "Once upon a time"
    body = dict(model="nano", prompt=prompt, max_tokens=900, temperature=0.0, extra_body={"ignore_eos": True})
    admitted = 32 * len(tokenizer.encode(prompt))  # prompt tokens counted once all 32 are in the engine
    try:
        async def main():
            client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)

            async def streaming():
                stream = await client.completions.create(**body, stream=True)
                async for i, _ in aenumerate(stream):
                    if i == 2:
                        break
                await stream.close()

            # a client that leaves before its answer: by the clock it could leave before its
            # request even arrived on a loaded machine, so it leaves once all 32 are admitted
            waiting = [asyncio.create_task(client.completions.create(**body)) for _ in range(16)]
            streams = asyncio.gather(*[streaming() for _ in range(16)])
            deadline = time.monotonic() + 60
            while (await asyncio.to_thread(s.metrics)).get("vllm:prompt_tokens_total[]", 0) < admitted:
                assert time.monotonic() < deadline, "the 32 requests did not all reach the engine"
                await asyncio.sleep(0.05)
            for task in waiting:
                task.cancel()
            await streams
            results = await asyncio.gather(*waiting, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results), results

        asyncio.run(main())
        wait_idle(s.engine)
        # the engine thread publishes its gauges just after applying the last abort: wait for them
        deadline = time.monotonic() + 10
        while (m := s.metrics())["vllm:kv_cache_usage_perc[]"] != 0 or m["vllm:num_requests_running[]"] != 0:
            assert time.monotonic() < deadline, m
            time.sleep(0.01)
        assert m["vllm:request_success_total[('finished_reason', 'abort')]"] == 32
        assert sum(v for k, v in m.items() if k.startswith("vllm:request_success_total")) == 32
    finally:
        s.close()


async def aenumerate(iterable):
    i = 0
    async for item in iterable:
        yield i, item
        i += 1


def test_concurrent_load_all_answered_nothing_leaked_metrics_add_up(model, tokenizer):
    s = serve(model, tokenizer)
    n = 16
    try:
        async def main():
            client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
            jobs = [client.completions.create(model="nano", prompt=f"Story {i}: once", max_tokens=5 + i,
                                              temperature=1.0, seed=i, stream=False) for i in range(n)]
            return await asyncio.gather(*jobs)

        results = asyncio.run(main())
        wait_idle(s.engine)
        m = s.metrics()
        assert len(results) == n
        assert m["vllm:generation_tokens_total[]"] == sum(r.usage.completion_tokens for r in results)
        assert m["vllm:prompt_tokens_total[]"] == sum(r.usage.prompt_tokens for r in results)
        assert sum(v for k, v in m.items() if k.startswith("vllm:request_success_total")) == n
        assert m["vllm:e2e_request_latency_seconds_count[]"] == n
        assert m["vllm:time_to_first_token_seconds_count[]"] == n
        assert m["vllm:num_requests_running[]"] == 0 and m["vllm:num_requests_waiting[]"] == 0
    finally:
        s.close()


def save_final(model: GPT, tokenizer: BPETokenizer, folder: Path) -> list[str]:
    """A final.pt and tokenizer.json in `folder`, as pretrain and the tokenizer stage write them;
    returns serve's --model/--tokenizer arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict(), "step": 0,
                "vocab_size": tokenizer.n_vocab, "eos_id": tokenizer.eos_id}, folder / "final.pt")
    tokenizer.save(folder / "tokenizer.json")
    return ["--model", str(folder / "final.pt"), "--tokenizer", str(folder / "tokenizer.json")]


@contextlib.contextmanager
def serve_process(args: list[str], log: Path, env: dict[str, str] | None = None):
    """`python -m pipeline serve <args>` as a user runs it (`benchmarks.common.start_serve`);
    yields (process, url) once /health answers 200, and kills it at the end if it still runs."""
    proc, url = start_serve(args, log, env)
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.mark.parametrize("source", ["final.pt", "exported folder"])
def test_serve_command_on_a_saved_model(model, tokenizer, tmp_path, source):
    """`python -m pipeline serve --model final.pt --tokenizer tokenizer.json --port N`, and
    `serve --model <export-hf folder>` alone, as a user runs them: both complete greedily as the
    engine on the model in memory (so as each other), and chat through the same template. The
    API key comes from $WETSTONE_API_KEY, or from --api-key."""
    from pipeline.export_hf import export_hf

    args = save_final(model, tokenizer, tmp_path / "tiny")
    env = {**os.environ, "WETSTONE_API_KEY": "sekrit"}
    if source == "exported folder":
        seal(tmp_path / "tiny" / "final.pt", tmp_path / "tiny" / "tokenizer.json")  # as the training stages leave them
        export_hf(tmp_path / "tiny" / "final.pt", tmp_path / "tiny" / "tokenizer.json", tmp_path / "export" / "tiny")
        args, env = ["--model", str(tmp_path / "export" / "tiny"), "--api-key", "sekrit"], None
    with serve_process(args, tmp_path / "serve.log", env) as (proc, url):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]  # named after the model's folder
        text, _ = greedy_text(model, tokenizer, "Once upon a time", 12)
        assert client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12,
                                         temperature=0).choices[0].text == text
        messages = [{"role": "user", "content": "Tell me a story."}]
        ids = render_prompt(tokenizer, messages)
        expected = Engine(model, max_batch_size=1, stop_token_ids=[tokenizer.eos_id]).generate(
            [ids], SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[tokenizer.special_tokens[ASSISTANT_END]]))[0].token_ids
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(expected)
        specials = set(tokenizer.special_tokens.values())
        assert reply.choices[0].message.content == tokenizer.decode([t for t in expected if t not in specials])


def test_the_event_loop_answers_while_the_engine_is_stuck_in_a_step(long_model, tokenizer):
    """The engine thread held inside one step (a slow forward, as a long prefill is): a request
    submitted meanwhile does not block the event loop, so /health, /v1/models and /metrics answer
    at once, and once the step returns both requests finish. Handlers never wait on the engine
    thread. How fast /health is under real load is a benchmark's figure
    (`benchmarks/bench_health.py`), not this test's."""
    s = serve(long_model, tokenizer)
    inside, release = threading.Event(), threading.Event()
    real_step = s.engine.step

    def stuck_step():
        if not release.is_set():
            inside.set()
            release.wait(60)
        return real_step()
    try:
        stream = s.client.completions.create(model="nano", prompt="Once", max_tokens=40, stream=True,
                                             temperature=0, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        first = next(chunks)
        s.engine.step = stuck_step
        assert inside.wait(30), "the engine did not step again"
        submitted: list = []
        submitter = threading.Thread(target=lambda: submitted.append(
            s.client.completions.create(model="nano", prompt="The dog", max_tokens=3, temperature=0)))
        submitter.start()
        time.sleep(0.3)  # the new request is in its handler, or queued, while the step is stuck
        with httpx.Client(base_url=s.url, timeout=5) as http:  # a loop waiting on the engine would time out
            assert http.get("/health").status_code == 200
            assert http.get("/v1/models").json()["data"][0]["id"] == "nano"
            assert "vllm:num_requests_running" in http.get("/metrics").text
        assert not submitted and submitter.is_alive()  # still waiting for the stuck engine
        release.set()
        submitter.join(timeout=60)
        assert len(submitted) == 1 and submitted[0].usage.completion_tokens == 3
        assert first.choices[0].text is not None and [c for c in chunks][-1].choices[0].finish_reason == "length"
    finally:
        release.set()
        s.close()


def test_sigterm_stops_a_busy_server_within_its_grace_period(long_model, tokenizer, tmp_path):
    """SIGTERM with 8 requests decoding and 40 queued (6 batches of 1,000 tokens: seconds of
    work): the server stops taking requests, lets those in flight run for
    --timeout-graceful-shutdown (1 s), aborts the rest and has exited 4 s later at most."""
    import signal

    args = save_final(long_model, tokenizer, tmp_path / "long")
    with serve_process([*args, "--max-batch-size", "8", "--timeout-graceful-shutdown", "1"],
                       tmp_path / "serve.log") as (proc, url):
        async def load():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            body = dict(model="long", prompt="Once upon a time", max_tokens=1000, temperature=0.0,
                        extra_body={"ignore_eos": True})

            async def streaming():
                async for _ in await client.completions.create(**body, stream=True):
                    pass
            return await asyncio.gather(*[streaming() for _ in range(24)],
                                        *[client.completions.create(**body) for _ in range(24)],
                                        return_exceptions=True)

        results = []
        loader = threading.Thread(target=lambda: results.extend(asyncio.run(load())))
        loader.start()
        with httpx.Client(base_url=url) as http:
            deadline = time.monotonic() + 30
            while "vllm:num_requests_waiting{model_name=\"long\"} 40.0" not in http.get("/metrics").text:
                assert time.monotonic() < deadline, "the requests did not start"
                time.sleep(0.05)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        stopped = time.monotonic() - start
        loader.join(timeout=30)
        log = (tmp_path / "serve.log").read_text()
        assert stopped < 1 + 4, f"{stopped:.1f} s after SIGTERM"
        aborted = [r for r in results if isinstance(r, openai.APIError)]
        assert len(results) == 48 and len(aborted) >= 32  # at most two batches could finish in the grace
        assert all("shutting down" in str(r) for r in aborted)  # OpenAI's 503 body (or event), not a cut line
        # a clean shutdown (no handler cancelled), then uvicorn re-raises the signal it caught, as
        # a terminated process should
        assert proc.returncode == -signal.SIGTERM and "Finished server process" in log
        assert "Traceback" not in log
