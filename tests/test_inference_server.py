"""The OpenAI-compatible server (pipeline/inference/server.py), driven by the real `openai`
client over loopback HTTP against uvicorn."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

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

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {s.name + str(sorted((k, v) for k, v in s.labels.items() if k != "model_name")): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def close(self):
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
        [ids], SamplingParams(temperature=0.0, max_tokens=n))[0]
    return tokenizer.decode([t for t in out if t != tokenizer.eos_id]), out


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
        [ids], SamplingParams(temperature=0.0, max_tokens=30))[0]
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


def test_bad_requests_get_openai_errors(served):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        served.client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens") as e:
        served.client.completions.create(model="nano", prompt="hi", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="context is 64"):
        served.client.completions.create(model="nano", prompt=list(range(65)), max_tokens=2)
    r = httpx.post(served.url + "/v1/completions", content=b'{"prompt": "hi",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(served.url + "/v1/completions", json={"prompt": "hi", "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_full_queue_answers_429(model, tokenizer):
    s = serve(model, tokenizer, max_waiting=0)
    try:
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            s.client.completions.create(model="nano", prompt="hi", max_tokens=2)
    finally:
        s.close()


def test_client_disconnect_frees_its_sequence(tokenizer):
    torch.manual_seed(0)
    long_context = GPT(GPTConfig.from_size("nano", vocab_size=tokenizer.n_vocab, seq_len=1024)).eval()
    s = serve(long_context, tokenizer)
    body = {"model": "nano", "prompt": "Once", "max_tokens": 1000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    try:
        with httpx.stream("POST", s.url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up
        wait_idle(s.engine)
        assert s.metrics()["vllm:request_success_total[('finished_reason', 'abort')]"] == 1
        assert s.engine.stats.generated_tokens < 1000
    finally:
        s.close()


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


@pytest.mark.parametrize("source", ["final.pt", "exported folder"])
def test_serve_command_on_a_saved_model(model, tokenizer, tmp_path, source):
    """`python -m pipeline serve --model final.pt --tokenizer tokenizer.json --port N`, and
    `serve --model <export-hf folder>` alone, as a user runs them: both complete greedily as the
    engine on the model in memory (so as each other), and chat through the same template."""
    import subprocess
    import sys

    from pipeline.export import export_hf

    (tmp_path / "trained").mkdir()
    final = tmp_path / "trained" / "final.pt"
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict(), "step": 0,
                "vocab_size": tokenizer.n_vocab, "eos_id": tokenizer.eos_id}, final)
    tokenizer.save(tmp_path / "tokenizer.json")
    if source == "final.pt":
        (tmp_path / "tiny").mkdir()
        final = final.rename(tmp_path / "tiny" / "final.pt")
        args = ["--model", str(final), "--tokenizer", str(tmp_path / "tokenizer.json")]
    else:
        seal(final), seal(tmp_path / "tokenizer.json")  # as the pretrain and tokenizer stages leave them
        export_hf(final, tmp_path / "tokenizer.json", tmp_path / "tiny")
        args = ["--model", str(tmp_path / "tiny")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]  # named after the model's folder
        text, _ = greedy_text(model, tokenizer, "Once upon a time", 12)
        assert client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12,
                                         temperature=0).choices[0].text == text
        messages = [{"role": "user", "content": "Tell me a story."}]
        ids = render_prompt(tokenizer, messages)
        expected = Engine(model, max_batch_size=1, stop_token_ids=[tokenizer.eos_id]).generate(
            [ids], SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[tokenizer.special_tokens[ASSISTANT_END]]))[0]
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == len(expected)
        specials = set(tokenizer.special_tokens.values())
        assert reply.choices[0].message.content == tokenizer.decode([t for t in expected if t not in specials])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
