"""The canary (pipeline/eval/canary.py): the baseline it reads from eval.json (the pass@1 metric
and the record of the items the eval scored), its verdicts against a served model (uvicorn on loopback, a nano GPT), the prober's metrics, and
a one-line error, never a traceback, for an endpoint that is down, a model it does not serve and
a malformed baseline. The live run against Prometheus is in test_monitoring.py."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest
from test_inference_server import serve

from conftest import ROOT
from pipeline.__main__ import main
from pipeline.eval.canary import CanaryError, ProbeMetrics, canary_items, read_baseline
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.stats import proportion, wilson_interval
from pipeline.tasks import get_task, held_out_items, held_out_record
from pipeline.tokenizer.bpe import CHAT_SPECIAL_TOKENS, BPETokenizer

ITEMS = 10


def eval_json(path: Path, rows: dict[str, tuple[int, int]], items: dict | None = None) -> Path:
    """An eval.json as the eval stage writes it: size, the record of the arithmetic items it scored
    (default config's, `n` of them), and per model (correct, n) as its pass@1 metric."""
    n = max([n for _, n in rows.values()], default=ITEMS)
    record = held_out_record(get_task("arithmetic", {}), n) if items is None else items
    path.write_text(json.dumps({"size": "nano", "held_out_items": {"arithmetic": record}, "models": {
        name: {"val_loss": 3.0, "bpb": 1.5, "mmlu": {},
               "tasks": {"arithmetic": {"pass@1": proportion(c, n), "n": n, "k": 1, "samples": 1}}}
        for name, (c, n) in rows.items()}}))
    return path


def test_the_baseline_is_the_lower_end_of_the_pass_at_1_interval(tmp_path):
    path = eval_json(tmp_path / "eval.json", {"pretrain": (0, 30), "sft": (15, 30)})
    sft = read_baseline(path, "sft", "arithmetic")
    assert (sft.accuracy, sft.n, sft.lower) == (0.5, 30, wilson_interval(15, 30)[0])
    assert sft.lower == pytest.approx(0.3315, abs=1e-4)
    assert sft.items == held_out_record(get_task("arithmetic", {}), 30)
    assert read_baseline(path, "pretrain", "arithmetic").lower == 0.0


def metric_row(metric) -> dict:
    return {"sft": {"tasks": {"arithmetic": {"pass@1": metric}}}}


@pytest.mark.parametrize("content, row, match", [
    (None, "sft", "no such file"),
    ("{not json", "sft", "not a readable JSON file"),
    ({"size": "nano"}, "sft", "no 'models' rows"),
    ({"models": {"pretrain": {}}}, "sft", "no model row 'sft' .*its rows: pretrain"),
    ({"models": metric_row(0.5)}, "sft", "pass@1 must be a metric .*it is 0.5"),
    ({"models": metric_row({"value": 0.5, "ci95": [0.4, 0.6], "n": 0})}, "sft", "pass@1 must be a metric"),
    ({"models": metric_row({"value": "half", "ci95": [0.4, 0.6], "n": 10})}, "sft", "pass@1 must be a metric"),
    ({"models": metric_row({"value": 0.5, "ci95": [0.6, 0.7], "n": 10})}, "sft", "ci95: \\[low, high\\] around"),
    ({"models": metric_row({"value": 0.5, "n": 10})}, "sft", "pass@1 must be a metric"),
    ({"models": metric_row(proportion(5, 10))}, "sft", "no held_out_items.arithmetic"),
    ({"models": metric_row(proportion(5, 10)), "held_out_items": {"arithmetic": {"items": 10}}}, "sft",
     "no held_out_items.arithmetic"),
])
def test_a_malformed_baseline_is_named(tmp_path, content, row, match):
    path = tmp_path / "eval.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(CanaryError, match=f"--baseline {path}: .*{match}"):
        read_baseline(path, row, "arithmetic")


def test_a_task_the_eval_did_not_score_is_named(tmp_path):
    path = eval_json(tmp_path / "eval.json", {"sft": (5, 10)})
    with pytest.raises(CanaryError, match="no models.sft.tasks.gsm8k; the eval scored sft on arithmetic"):
        read_baseline(path, "sft", "gsm8k")


def test_the_items_are_the_eval_s_or_refused(tmp_path):
    """The first n of the fixed items, checked against eval.json's record: another seed, or a list
    shorter than the eval's, is refused."""
    task = get_task("arithmetic", {})
    baseline = read_baseline(eval_json(tmp_path / "eval.json", {"sft": (20, 40)}), "sft", "arithmetic")
    assert canary_items(task, baseline, 10) == held_out_items(task, 10) == held_out_items(task)[:10]
    with pytest.raises(CanaryError, match="--items 41: the eval scored 40 arithmetic held-out items"):
        canary_items(task, baseline, 41)
    reseeded = get_task("arithmetic", {"arithmetic": {"held_out": {"seed": 1}}})
    assert held_out_items(reseeded, 10) != held_out_items(task, 10)
    with pytest.raises(CanaryError, match="--tasks-config: its arithmetic held-out items are not the ones the eval "
                                          "scored"):
        canary_items(reseeded, baseline, 10)
    short = get_task("arithmetic", {"arithmetic": {"held_out": {"items": 20}}})
    with pytest.raises(CanaryError, match="--tasks-config: task arithmetic: 40 held-out items asked, the list has 20"):
        canary_items(short, baseline, 10)


def test_the_prober_exports_only_the_latest_model_s_series():
    metrics = ProbeMetrics(every=60)
    result = {"model": "a", "task": "arithmetic", "accuracy": 0.6, "items": 100, "seconds": 2.0, "passed": True,
              "baseline": {"lower": 0.45}}
    metrics.record(result)
    metrics.record({**result, "model": "b", "accuracy": 0.2, "passed": False})
    text = generate_latest(metrics.registry).decode()
    assert 'wetstone_canary_accuracy{model="b",task="arithmetic"} 0.2' in text and 'model="a"' not in text
    assert 'wetstone_canary_baseline_lower_bound{model="b",task="arithmetic"} 0.45' in text
    assert 'wetstone_canary_runs_total{result="passed"} 1.0' in text
    assert 'wetstone_canary_runs_total{result="below_baseline"} 1.0' in text
    assert 'wetstone_canary_runs_total{result="error"} 0.0' in text
    assert "wetstone_canary_interval_seconds 60.0" in text


# --- against a served model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(stories):
    """A nano GPT behind the server (it answers no sum right), named "nano"."""
    tokenizer = BPETokenizer.train(stories[:20], vocab_size=300, special_tokens=CHAT_SPECIAL_TOKENS)
    torch.manual_seed(0)
    s = serve(GPT(GPTConfig.from_size("nano", vocab_size=tokenizer.n_vocab, seq_len=64)).eval(), tokenizer)
    yield s
    s.close()


def canary(url: str, baseline: Path, out: Path, *extra: str) -> int:
    return main(["canary", "--endpoint", f"{url}/v1", "--baseline", str(baseline), "--items", str(ITEMS),
                 "--max-tokens", "8", "--out", str(out), *extra])


def test_the_canary_scores_the_eval_items_and_passes_at_the_bar(served, tmp_path):
    """Answers up to the items' token budget as eval.json records it (no --max-tokens here)."""
    record = {**held_out_record(get_task("arithmetic", {}), 20), "max_new_tokens": 6}
    baseline = eval_json(tmp_path / "eval.json", {"sft": (0, 20)}, items=record)
    assert main(["canary", "--endpoint", f"{served.url}/v1", "--baseline", str(baseline), "--items", str(ITEMS),
                 "--out", str(tmp_path / "canary.json")]) == 0
    result = json.loads((tmp_path / "canary.json").read_text())
    assert result["max_tokens"] == 6
    task = get_task("arithmetic", {})
    items = held_out_items(task, ITEMS)
    assert [a["question"] for a in result["answers"]] == [e.prompt[-1]["content"] for e in items]
    assert [a["answer"] for a in result["answers"]] == [e.answer for e in items]
    assert [a["correct"] for a in result["answers"]] == [task.reward(a["completion"], a["answer"]) > 0
                                                         for a in result["answers"]]
    assert result["correct"] == sum(a["correct"] for a in result["answers"]) and result["items"] == ITEMS
    assert result["passed"] and result["model"] == "nano" and result["baseline"]["lower"] == 0.0
    assert served.metrics()["http_requests_total[('handler', '/v1/chat/completions'), ('method', 'POST'), "
                            "('status', '200')]"] >= ITEMS


def test_the_canary_fails_below_the_baseline_s_lower_bound(served, tmp_path, capsys):
    baseline = eval_json(tmp_path / "eval.json", {"sft": (50, 100)})
    assert canary(served.url, baseline, tmp_path / "canary.json") == 1
    result = json.loads((tmp_path / "canary.json").read_text())
    assert not result["passed"] and result["accuracy"] < result["baseline"]["lower"] == wilson_interval(50, 100)[0]
    assert "BELOW the baseline" in capsys.readouterr().err


@pytest.mark.parametrize("flags, match", [
    (["--model", "tiny"], "serves 'nano': it does not serve --model 'tiny'"),
    (["--baseline-model", "grpo"], "no model row 'grpo' \\(--baseline-model\\); its rows: sft"),
    (["--items", "600"], "--items 600: the eval scored 100 arithmetic held-out items"),
    (["--tasks-config", '{"arithmetic": {"digits": 12}}'], "--tasks-config: .*tasks.arithmetic.digits"),
    (["--task", "chess"], "unknown task 'chess'"),
    (["--every", "0"], "--every must be positive"),
])
def test_bad_input_is_one_clear_line(served, tmp_path, capsys, flags, match):
    baseline = eval_json(tmp_path / "eval.json", {"sft": (50, 100)})
    assert canary(served.url, baseline, tmp_path / "canary.json", *flags) == 2
    err = capsys.readouterr().err
    assert err.count("ERROR") == 1 and "Traceback" not in err and re.search(match, err, flags=re.S), err
    assert not (tmp_path / "canary.json").exists()


def test_an_endpoint_without_v1_gets_a_hint(served, tmp_path, capsys):
    baseline = eval_json(tmp_path / "eval.json", {"sft": (50, 100)})
    assert main(["canary", "--endpoint", served.url, "--baseline", str(baseline), "--out",
                 str(tmp_path / "canary.json")]) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "ending in /v1?" in err, err


def test_an_endpoint_that_is_down_is_one_line_without_a_traceback(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens on it once closed
    baseline = eval_json(tmp_path / "eval.json", {"sft": (50, 100)})
    done = subprocess.run([sys.executable, "-m", "pipeline", "canary", "--endpoint", f"http://127.0.0.1:{port}/v1",
                           "--baseline", str(baseline), "--out", str(tmp_path / "canary.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.count("ERROR") == 1, done.stderr
    assert f"--endpoint http://127.0.0.1:{port}/v1: cannot reach it" in done.stderr
