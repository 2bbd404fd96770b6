"""The serving benchmark (pipeline/inference/bench/): workload, metrics, and every system on a
small model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import seal
from pipeline.__main__ import main
from pipeline.artifacts import read_manifest, verify
from pipeline.config import section_config
from pipeline.inference.bench import bench
from pipeline.inference.bench.metrics import Record, summarize
from pipeline.inference.bench.report import markdown, plot
from pipeline.inference.bench.systems import kv_cache_stream, naive_stream, run_hf
from pipeline.inference.bench.workload import make_workload
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.tokenizer.bpe import CHAT_SPECIAL_TOKENS, BPETokenizer
from test_inference_engine import alone, one_thread  # noqa: F401 (one_thread: an autouse fixture)



def small_config(**workload) -> dict:
    return section_config("inference", {
        "max_batch_size": 4, "block_size": 8, "num_speculative_tokens": 2, "rates": [50, "inf"],
        "workload": {"num_requests": 5, "prompts": "random", "shared_prefix_len": 8, "prompt_len": {"min": 2, "max": 10},
                     "output_len": {"min": 3, "max": 9}, **workload}})


def test_workload_is_seeded_poisson_with_the_configured_lengths():
    cfg = small_config(num_requests=2000)["workload"]
    source = np.arange(10_000) % 300
    a, b = make_workload(cfg, 20.0, source, 300), make_workload(cfg, 20.0, source, 300)
    assert [(r.arrival, r.prompt, r.output_len) for r in a] == [(r.arrival, r.prompt, r.output_len) for r in b]
    gaps = np.diff([r.arrival for r in a])
    assert abs(gaps.mean() - 1 / 20) < 0.005 and abs(gaps.std() - 1 / 20) < 0.005  # exponential: mean = std
    assert all(3 <= r.output_len <= 9 and 8 + 2 <= len(r.prompt) <= 8 + 10 for r in a)
    assert len({tuple(r.prompt[:8]) for r in a}) == 1  # the shared prefix
    burst = make_workload(cfg, math.inf, source, 300)
    assert all(r.arrival == 0 for r in burst) and [r.prompt for r in burst] == [r.prompt for r in a]


def test_summary_figures_by_hand():
    records = [Record(0.0, 3, times=[0.5, 0.6, 0.8], tokens=3), Record(1.0, 2, times=[1.1, 2.1], tokens=2)]
    s = summarize(records, {"ttft_s": 0.2, "tpot_s": 0.5})
    assert s["ttft_ms"]["mean"] == pytest.approx(300.0) and s["ttft_ms"]["median"] == pytest.approx(300.0)
    assert s["tpot_ms"]["mean"] == pytest.approx((150.0 + 1000.0) / 2)  # (0.8 - 0.5) / 2 and (2.1 - 1.1) / 1
    assert s["itl_ms"]["mean"] == pytest.approx((100.0 + 200.0 + 1000.0) / 3)
    assert s["e2e_ms"]["p99"] == pytest.approx(800.0 + 0.99 * 300.0)
    assert s["duration_s"] == pytest.approx(2.1) and s["output_tokens_per_s"] == pytest.approx(5 / 2.1)
    assert s["slo_met"] == 0  # request 1: TTFT 0.5 s > 0.2; request 2: TPOT 1.0 s > 0.5
    assert summarize(records, {"ttft_s": 0.6, "tpot_s": 1.0})["slo_met"] == 2


def test_every_system_serves_the_whole_workload(stories, tmp_path):
    tokenizer = BPETokenizer.train(stories[:10], vocab_size=300, special_tokens=CHAT_SPECIAL_TOKENS)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size("nano", vocab_size=tokenizer.n_vocab, seq_len=64)).eval()
    torch.manual_seed(1)
    draft = GPT(GPTConfig.from_size("nano", vocab_size=tokenizer.n_vocab, seq_len=64)).eval()
    cfg = small_config()
    cfg["systems"] = [s for s in cfg["systems"] if s != "hf_generate"] + ["hf_generate"]
    result = bench(model, cfg, draft=draft, tokenizer=tokenizer, stop_ids=[tokenizer.eos_id])
    assert result["skipped"] == {"hf_generate": "no exported HF model"}
    results = result["results"]
    assert set(results) == {"naive", "kv_cache", "static", "continuous", "paged_prefix", "speculative", "http"}
    expected = sum(r.output_len for r in make_workload(cfg["workload"], math.inf, np.zeros(0, np.int64), model.config.vocab_size))
    for system, per_rate in results.items():
        for rate, m in per_rate.items():
            assert m["output_tokens"] == expected, (system, rate)
            assert m["ttft_ms"]["median"] <= m["e2e_ms"]["median"]
    assert results["speculative"]["inf"]["engine"]["acceptance_rate"] is not None
    assert results["paged_prefix"]["inf"]["engine"]["prefix_cache_hit_rate"] > 0  # the shared prefix
    report = {"model": "nano", "device": "cpu", "threads": 1, "config": cfg, **result}
    text = markdown(report)
    assert "| continuous |" in text and "naive output tokens/s" in text
    plot(report, tmp_path)
    assert (tmp_path / "throughput.png").stat().st_size > 0 and (tmp_path / "latency.png").stat().st_size > 0


def test_workload_longer_than_the_context_names_the_keys():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size("nano", vocab_size=300, seq_len=16)).eval()
    with pytest.raises(ValueError, match="inference.workload: shared_prefix_len"):
        bench(model, small_config())


def test_one_at_a_time_streams_are_greedy_decoding():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size("nano", vocab_size=300, seq_len=64)).eval()
    prompt = [5, 17, 42, 7]
    [expected] = alone(model, [prompt], 10)
    assert list(naive_stream(model)(prompt, 10)) == expected
    assert list(kv_cache_stream(model)(prompt, 10)) == expected


def test_command_writes_the_stage_outputs(stories, tmp_path):
    """`python -m pipeline inference-bench` end to end on a saved final.pt: outputs, manifest, verify."""
    tokenizer = BPETokenizer.train(stories[:10], vocab_size=300, special_tokens=CHAT_SPECIAL_TOKENS)
    tokenizer.save(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size("nano", vocab_size=tokenizer.n_vocab, seq_len=64))
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict(), "step": 0,
                "vocab_size": tokenizer.n_vocab, "eos_id": tokenizer.eos_id}, tmp_path / "final.pt")
    seal(tmp_path / "final.pt", tmp_path / "tokenizer.json")
    config = {"systems": ["naive", "continuous", "http"], "rates": ["inf"], "max_batch_size": 4,
              "workload": {"num_requests": 3, "prompts": "random", "shared_prefix_len": 4,
                           "prompt_len": {"min": 2, "max": 6}, "output_len": {"min": 2, "max": 5}}}
    out = tmp_path / "inference" / "nano"
    log = tmp_path / "logs" / "nano.log"
    assert main(["inference-bench", "--model", str(tmp_path / "final.pt"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                 "--out", str(out), "--config", json.dumps(config), "--log", str(log)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert set(report["results"]) == {"naive", "continuous", "http"}
    assert "## all at once" in (out / "bench.md").read_text()
    manifest = read_manifest(out / "manifest.json")
    assert {o["path"] for o in manifest["outputs"]} == {"bench.json", "bench.md", "throughput.png", "latency.png"}
    assert verify(tmp_path)[1] == []
    # the job's log keeps every line, those after the http system's server too (uvicorn leaves it open)
    lines = log.read_text().splitlines()
    assert any(" http " in line for line in lines) and "inference-bench: exit 0" in lines[-1], lines


def test_hf_generate_peer_delivers_each_requested_length():
    """HF `generate` in static batches (a real transformers GPT-2): every request gets its own
    number of tokens, stamped step by step, however long the batch runs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    workload = make_workload(small_config()["workload"], math.inf, np.zeros(0, np.int64), 300)
    records = run_hf(hf, workload, batch_size=2, pad_id=0)
    assert [r.tokens for r in records] == [r.output_len for r in workload]
    assert all(len(r.times) == r.tokens and r.times == sorted(r.times) for r in records)
