"""The comparison with vLLM (pipeline/inference/bench/peers.py), without vLLM: the client's
reading of streamed events, the greedy-match accounting, the rounds' order, the ratios and the
table, closed-loop engine runs, our `serve` process driven as vLLM is, and the random Llama
folder. The timed comparison itself is a benchmark (benchmarks/bench_inference.py --vllm)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import torch

from conftest import save_chat_model
from pipeline.config import section_config
from pipeline.inference.bench.http_client import read_event
from pipeline.inference.bench.metrics import Record
from pipeline.inference.bench.peers import (compare, cpu_seconds, free_port, greedy_matches, markdown, order,
                                            random_llama, ratios, serve_command, server)
from pipeline.inference.bench.systems import drive, kv_cache_stream, run_engine
from pipeline.inference.bench.workload import make_workload
from pipeline.inference.engine import Engine
from pipeline.inference.serve import load_model
from test_inference_engine import one_thread  # noqa: F401 (an autouse fixture: one torch thread)


@pytest.fixture(scope="module")
def export(tmp_path_factory, stories):
    from pipeline.export_hf import export_hf

    root = tmp_path_factory.mktemp("peers")
    (root / "tiny").mkdir()
    final, tokenizer = save_chat_model(root / "tiny", stories[:20], seq_len=64, stage="pretrain")
    export_hf(final, tokenizer, root / "export")
    return root / "export"


def workload(n: int = 6, output: int = 5, vocab: int = 400) -> list:
    cfg = section_config("inference", {"workload": {
        "num_requests": n, "prompts": "random", "shared_prefix_len": 4, "prompt_len": {"min": 2, "max": 8},
        "output_len": {"min": output, "max": output}}})["workload"]
    return make_workload(cfg, math.inf, np.zeros(0, np.int64), vocab)


def test_client_reads_vllm_stream_events():
    out = {"tokens": 0, "token_ids": []}
    chunk = {"id": "cmpl-1", "object": "text_completion", "model": "bench",
             "choices": [{"index": 0, "text": " a", "token_ids": [5, 6], "finish_reason": None}]}
    assert read_event("data: " + json.dumps(chunk), out)
    chunk["choices"][0]["token_ids"] = [7]
    assert read_event("data: " + json.dumps(chunk), out)
    usage = {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}}
    assert not read_event("data: " + json.dumps(usage), out)
    assert not read_event("data: [DONE]", out) and not read_event("", out) and not read_event(": ping", out)
    assert out == {"tokens": 3, "token_ids": [5, 6, 7]}
    chunk["choices"][0].pop("token_ids")  # a server not asked for ids: a delivery all the same
    assert read_event("data: " + json.dumps(chunk), out) and out["token_ids"] == [5, 6, 7]
    with pytest.raises(RuntimeError, match="queue is full"):
        read_event('data: {"error": {"message": "the queue is full", "type": "rate_limit_error"}}', out)


def test_greedy_match_accounting():
    def runs(*ids):
        return [Record(0.0, len(t), times=[0.1] * len(t), tokens=len(t), token_ids=list(t)) for t in ids]

    a = runs([1, 2, 3], [4, 5, 6], [7, 8, 9])
    assert greedy_matches(a, runs([1, 2, 3], [4, 5, 6], [7, 8, 9])) == 3
    assert greedy_matches(a, runs([1, 2, 3], [4, 5, 0], [7, 8, 9])) == 2  # one token differs: that request differs
    assert greedy_matches(a, runs([2, 1, 3], [4, 5, 6], [9, 8, 7])) == 1
    with pytest.raises(ValueError, match="not the same workload"):
        greedy_matches(a, a[:2])
    no_ids = [Record(0.0, 3, times=[0.1], tokens=3) for _ in range(3)]  # a server that sent no ids
    with pytest.raises(ValueError, match="did not return its token ids"):
        greedy_matches(a, no_ids)


def test_rounds_alternate_the_systems_order():
    systems = ["serve", "vllm", "engine"]
    assert [order(systems, r) for r in range(3)] == [systems, systems[::-1], systems]


def summary(tps: float, ttft: float, e2e: float) -> dict:
    return {"output_tokens_per_s": tps, "ttft_ms": {"mean": ttft, "p90": 2 * ttft},
            "e2e_ms": {"mean": e2e, "p90": 2 * e2e}, "load_1min": 2.0, "cpu_ms_per_token": 1000 / tps}


def test_ratios_are_paired_by_round_and_tabled():
    result = {"systems": ["serve", "vllm"], "concurrency": [32], "rounds": 3, "requests": 4,
              "runs": {"serve": {"32": [summary(100, 10, 100), summary(60, 30, 300), summary(90, 20, 200)]},
                       "vllm": {"32": [summary(200, 20, 100), summary(50, 10, 100), summary(100, 10, 100)]}},
              "greedy_matches": {"serve/vllm": {"32": [4, 3, 4]}}}
    assert ratios(result, "serve", "vllm", 32, "tok/s") == pytest.approx([0.5, 1.2, 0.9])
    assert ratios(result, "serve", "vllm", 32, "TTFT p90") == pytest.approx([0.5, 3.0, 2.0])
    table = markdown(result, "tiny")
    # medians over the rounds, and the ratios' median with their range
    assert "| 32 | serve | 90 | 20 / 40 | 200 / 400 | 11.11 | 2.0 |" in table
    assert "| 32 | vllm | 100 | 10 / 20 | 100 / 200 | 10.00 | 2.0 |" in table
    assert "| 32 | serve / vllm | 0.90 (0.50-1.20) | 2.00 (0.50-3.00) | 2.00 (0.50-3.00) | 2.00 (1.00-3.00) | " \
           "2.00 (1.00-3.00) | 1.11 (0.83-2.00) | 11 / 12 |" in table


@pytest.mark.parametrize("concurrency", [1, 2, None])
def test_engine_runs_keep_at_most_concurrency_requests_in_flight(concurrency):
    torch.manual_seed(0)
    from pipeline.model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig.from_size("nano", vocab_size=400, seq_len=64)).eval()
    requests = workload()
    records = run_engine(Engine(model, max_batch_size=4, block_size=8), requests, max_concurrency=concurrency)
    spans = [(r.arrival, r.times[-1]) for r in records]
    most = max(sum(a <= start < end for a, end in spans) for start, _ in spans)
    assert most == (concurrency or len(requests))  # None: all arrive at once, and queue for the batch of 4
    if concurrency is None:
        assert all(r.arrival == 0.0 for r in records)  # latencies count from the arrival, queueing included
    stream = kv_cache_stream(model)
    assert [r.token_ids for r in records] == [list(stream(q.prompt, q.output_len)) for q in requests]


def test_serve_process_driven_as_vllm_is(export):
    """The `serve` system: `python -m pipeline serve` on the exported folder, driven by the
    benchmark's client with vLLM's `return_token_ids`: every token comes back with its id, the
    same as the engine's greedy tokens on the folder's model."""
    model, _ = load_model(export, "cpu")
    requests = workload(vocab=model.config.vocab_size)
    expected = run_engine(Engine(model, max_batch_size=4, block_size=8), requests)
    port = free_port()
    with server(serve_command(export, port, max_batch_size=4), port, export.parent / "serve.log") as (url, _):
        records = drive(url, "bench", requests, max_concurrency=2, token_ids=True)
        assert [r.tokens for r in records] == [q.output_len for q in requests]
        assert greedy_matches(records, expected) == len(requests)
        with pytest.raises(ValueError, match="did not return its token ids"):
            greedy_matches(drive(url, "bench", requests[:2]), expected[:2])  # not asked for
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        plain = client.completions.create(model="bench", prompt=requests[0].prompt, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert "token_ids" not in plain.choices[0].model_extra
        asked = client.completions.create(model="bench", prompt=requests[0].prompt, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
        assert asked.choices[0].model_extra["token_ids"] == expected[0].token_ids
        with pytest.raises(openai.BadRequestError, match="return_token_ids"):
            client.completions.create(model="bench", prompt="x", max_tokens=2, extra_body={"return_token_ids": "yes"})


def test_compare_without_vllm_runs_each_round_and_system(export, tmp_path):
    model, _ = load_model(export, "cpu")
    requests = workload(n=4, vocab=model.config.vocab_size)
    result = compare(export, requests, vllm_python=None, concurrency=[1, 4], rounds=2, log_dir=tmp_path,
                     engine=Engine(model, max_batch_size=4, block_size=8))
    assert result["systems"] == ["serve", "engine"] and result["greedy_matches"] == {}
    for system in ("serve", "engine"):
        for c in ("1", "4"):
            runs = result["runs"][system][c]
            assert len(runs) == 2 and all(r["output_tokens"] == 4 * 5 and r["cpu_ms_per_token"] > 0 for r in runs)
    assert (tmp_path / "serve.log").exists()
    assert "| 4 | engine |" in markdown(result, "nano") and "Ratios" not in markdown(result, "nano")


def test_cpu_seconds_count_a_process_and_its_children():
    """A parent that sleeps while its child spins: the tree's CPU time grows past what the
    parent alone spent."""
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "c = subprocess.Popen([sys.executable, '-c', 'while True: pass']); time.sleep(60)"])
    try:
        time.sleep(0.5)
        own = cpu_seconds(parent.pid) - sum(cpu_seconds(int(p)) for p in child_pids(parent.pid))
        start = time.monotonic()
        while cpu_seconds(parent.pid) < own + 1.0 and time.monotonic() - start < 30:
            time.sleep(0.1)
        assert cpu_seconds(parent.pid) >= own + 1.0
    finally:
        for pid in child_pids(parent.pid):
            os.kill(int(pid), signal.SIGKILL)
        parent.kill()
        parent.wait()


def child_pids(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def test_a_server_that_dies_names_its_log(tmp_path):
    command = [sys.executable, "-c", "print('no such model'); raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match="(?s)exited with 3 .*dead.log.*no such model"):
        with server(command, free_port(), tmp_path / "dead.log"):
            pass


def test_random_llama_is_a_transformers_llama_with_the_exports_tokenizer(export, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = random_llama(tmp_path / "llama", export, n_layer=2, n_embd=64, n_head=4, n_kv_head=2)
    config = json.loads((folder / "config.json").read_text())
    source = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    assert config["vocab_size"] == source["vocab_size"] and not config["tie_word_embeddings"]
    assert (folder / "tokenizer.json").read_bytes() == (export / "tokenizer.json").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 16  # 2 KV heads of 64 / 4
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, source["vocab_size"])
