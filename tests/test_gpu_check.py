"""benchmarks/gpu_check.py: the CPU smoke run (nano sizes, every part) and the time boxes.

The smoke run is the GPU check's own code on the CPU, so it cannot rot between GPU runs: every
part must pass, report figures, and import nothing the GPU machine's image lacks beyond the
carried wheels (docs/gpu.md).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu_check import (CARRIED, GPU, INFERENCE_SYSTEMS, NOT_ON_GPU_IMAGE, PARTS, PRETRAIN_VARIANTS, SMOKE,
                                  Context, check, grpo_config, inference_config, prepare, pretrain_config,
                                  resume_config, sft_config)
from conftest import ROOT
from pipeline.token_shards import TokenWindows, read_tokens_manifest, split_shards
from pipeline.train.data import val_rounds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu-smoke", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1200)
    return result, json.loads((out / "gpu_check.json").read_text()), out


def test_every_part_passes_and_imports_only_what_the_gpu_machine_has(smoke):
    result, report, _ = smoke
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(report["parts"]) == list(PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"))
        assert not set(part["modules"]) & set(NOT_ON_GPU_IMAGE), name
    assert "jsonschema" in report["parts"]["pretrain"]["modules"]  # carried, so it must stay in the list
    assert set(CARRIED) <= set(report["parts"]["pretrain"]["modules"])
    # printed as it went: each part's own lines before the next part starts
    assert result.stdout.index("[gpu_check pretrain] eager:") < result.stdout.index("[gpu_check fsdp] start")


def test_the_report_holds_each_parts_figures(smoke):
    _, report, out = smoke
    parts = report["parts"]
    assert parts["micro_batch"]["micro_batch"] == max(SMOKE.micro_batches)  # nothing runs out of memory here
    for name in PRETRAIN_VARIANTS:
        run = parts["pretrain"][name]
        if "skipped" in run:  # no C++ compiler for torch.compile on this CPU
            assert "compile" in name and "C++ compiler" in run["skipped"]
            continue
        assert run["micro_batch"] == 4 and run["steps"] == SMOKE.steps and run["tokens_per_s"] > 0, name
    assert parts["fsdp"]["fsdp"]["parallel"] == "fsdp" and parts["fsdp"]["fsdp"]["tokens_per_s"] > 0
    assert parts["pretrain"]["profile"]["sdpa"] == "flash_attention_for_cpu"
    resume = parts["resume"]
    assert resume["resumed_from"] == f"step_{SMOKE.resume['checkpoint_every']:06d}"
    assert resume["steps"] == SMOKE.resume["max_steps"]
    # on a CPU a resumed run is bit-identical to an uninterrupted one
    assert resume["final_loss"]["difference"] == 0 and resume["max_abs_loss_difference_after_resume"] == 0
    assert parts["sft"]["sft"]["steps"] == SMOKE.sft["max_steps"] and parts["sft"]["sft"]["tokens_per_s"] > 0
    grpo = parts["grpo"]["grpo"]
    assert grpo["steps"] == SMOKE.grpo["max_steps"] and grpo["rollout_tokens_per_s"] > 0
    results = parts["inference"]["results"]
    assert sorted(results) == sorted(INFERENCE_SYSTEMS)
    for system in INFERENCE_SYSTEMS:
        assert [results[system][str(n)]["output_tokens_per_s"] > 0 for n in SMOKE.concurrency] == [True] * 3, system
    md = (out / "gpu_check.md").read_text()
    assert "| compile_ac |" in md and "| paged_prefix |" in md and "Resume: SIGKILL after checkpoint" in md
    trace = json.loads(gzip.decompress((out / "pretrain_trace.json.gz").read_bytes()))
    assert any(e.get("name", "").startswith("ProfilerStep#") for e in trace["traceEvents"])


def test_a_part_past_its_time_box_is_stopped_and_the_next_parts_still_run(tmp_path):
    settings = dataclasses.replace(SMOKE, boxes={**SMOKE.boxes, "pretrain": 3})
    report = check(settings, tmp_path / "out", tmp_path / "work", smoke=True, parts=["device", "pretrain", "grpo"])
    statuses = {name: part["status"] for name, part in report.parts.items()}
    assert statuses == {"device": "ok", "pretrain": "stopped at its time box of 3 s", "grpo": "ok"}
    assert report.parts["pretrain"]["wall_s"] < 10
    written = json.loads((tmp_path / "out" / "gpu_check.json").read_text())  # rewritten after every part
    assert {name: part["status"] for name, part in written["parts"].items()} == statuses
    assert "stopped at its time box" in (tmp_path / "out" / "gpu_check.md").read_text()
    work = str(tmp_path / "work")
    for proc in Path("/proc").iterdir():  # the stopped part's whole process group is gone
        try:
            assert work not in (proc / "cmdline").read_bytes().decode(errors="replace"), proc
        except OSError:
            continue


def test_unknown_parts_are_named(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--cpu-smoke", "--out", str(tmp_path),
                             "--parts", "device,warmup"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "--parts: unknown warmup" in result.stderr


def test_the_gpu_settings_make_valid_configs_on_the_prepared_data(tmp_path):
    """The GPU settings run only on a GPU, so their configs are checked here: each validates, and
    every micro batch up to 256 finds its eval round in the val split at GPT-2's context."""
    ctx = Context(SMOKE, tmp_path, tmp_path, time.time() + 60, smoke=True)
    prepare(ctx)
    windows = TokenWindows(split_shards(ctx.tokens, "val"), read_tokens_manifest(ctx.tokens)["vocab_size"], GPU.seq_len)
    tried = [b for b in GPU.micro_batches if b <= len(windows)]
    assert max(tried) == 256
    for micro_batch in tried:
        cfg = pretrain_config(GPU, micro_batch, compile=True, activation_checkpointing=True)
        assert val_rounds(windows, cfg["eval_tokens"], micro_batch, 1) == 1
    resume = resume_config(GPU)
    assert resume["global_batch_tokens"] == 2 * resume["micro_batch"] * resume["seq_len"]
    assert resume["checkpoint_every"] < resume["max_steps"] == resume["eval_every"]
    assert sft_config(GPU)["mixture"]["gsm8k"] == 1 and grpo_config(GPU)["task"] == "gsm8k"
    for system in INFERENCE_SYSTEMS:
        assert inference_config(GPU, system, max(GPU.concurrency), GPU.output_len)["systems"] == [system]
