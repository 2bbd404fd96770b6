"""One evaluation protocol: the fixed held-out items, and SFT, GRPO and eval reporting the same
accuracy for the same model on them; eval.json with an interval on every accuracy and loss.

The models are rigged to answer "0" to everything (all weights zero but the one embedding and
bias that pick the "0" token), on single-digit products: right exactly on the items whose product
is 0, so every stage's accuracy is strictly between 0 and 1 and depends on which items it scores.
SFT and GRPO run a few steps at a tiny learning rate, which leaves the answers as they were."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_eval import always, write_tokens

from conftest import RESOURCES, save_chat_model
from pipeline.artifacts import write_manifest
from pipeline.config import ConfigError, section_config
from pipeline.eval.stage import run_eval
from pipeline.model.gpt import load_final
from pipeline.report_card import Reader, eval_table
from pipeline.stats import MIN_BOOTSTRAP_UNITS
from pipeline.tasks import get_task, held_out_items, held_out_record
from pipeline.tasks.evaluate import greedy_accuracy, held_out_accuracy
from pipeline.tokenizer import BPETokenizer
from pipeline.train import grpo, sft

SEQ_LEN = 64
TASKS_CONFIG = section_config("tasks", {"arithmetic": {
    "digits": [1, 1], "operators": ["*"], "train_problems": 30, "test_problems": 40, "test_fraction": 0.5,
    "held_out": {"items": 15, "seed": 3, "max_new_tokens": 3}}})


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_held_out_items_are_a_fixed_seeded_draw_of_the_test_split():
    task = get_task("arithmetic", TASKS_CONFIG)
    items = held_out_items(task)
    test = task.examples("test")
    assert len(items) == 15 and len({e.prompt[-1]["content"] for e in items}) == 15
    assert all(e in test for e in items) and items != test[:15]  # a shuffle, not the split's head
    assert held_out_items(task) == items and held_out_items(task, 10) == items[:10]
    other = get_task("arithmetic", {**TASKS_CONFIG, "arithmetic": {**TASKS_CONFIG["arithmetic"],
                                                                     "held_out": {"items": 15, "seed": 4}}})
    assert held_out_items(other) != items
    record = held_out_record(task)
    assert record["items"] == 15 and record["seed"] == 3 and record["max_new_tokens"] == 3
    assert record["sha256"] != held_out_record(other)["sha256"] != held_out_record(task, 10)["sha256"]
    with pytest.raises(ValueError, match="tasks.arithmetic.held_out.items"):
        held_out_items(get_task("arithmetic", {"arithmetic": {"test_problems": 20, "held_out": {"items": 25}}}))
    with pytest.raises(ValueError, match="instruct has no verifier"):
        held_out_items(get_task("instruct", {}))
    assert len(held_out_items(get_task("gsm8k", {}))) == section_config("tasks", {})["gsm8k"]["held_out"]["items"]


def rigged_base(folder: Path, stories: list[str]) -> tuple[Path, Path]:
    """(final.pt, tokenizer.json) of a model that answers "0" whatever it is asked."""
    model_path, tokenizer_path = save_chat_model(folder, stories, SEQ_LEN, stage="pretrain")
    zero = BPETokenizer.load(tokenizer_path).encode("0")
    assert len(zero) == 1
    model, meta = load_final(model_path)
    torch.save({**meta, "model": always(model, zero[0]).state_dict()}, model_path)
    write_manifest(folder / "manifest.json", stage="pretrain", config={}, inputs=[],
                   outputs={model_path: None, tokenizer_path: None})
    return model_path, tokenizer_path


def intervals_everywhere(node, path: str = "") -> list[str]:
    """The paths of every accuracy, pass@k, val loss or bpb in eval.json that is not a metric with
    a 95% interval around its value (or, over too few units for a bootstrap, a note saying so)."""
    bad = []
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}"
            if key in ("acc", "acc_norm", "pass@1", "pass@k", "val_loss", "bpb") and path.split(".")[-1] != "forgetting":
                ok = (isinstance(value, dict) and {"value", "ci95", "n", "method"} <= set(value)
                      and (value["ci95"][0] - 1e-12 <= value["value"] <= value["ci95"][1] + 1e-12
                           if value["ci95"] is not None else  # too few units for a bootstrap, and said so
                           value["n"] < MIN_BOOTSTRAP_UNITS and "too few" in value["note"]))
                if not ok and not (isinstance(value, dict) and "diff" in value):
                    bad.append(where)
            bad += intervals_everywhere(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            bad += intervals_everywhere(value, f"{path}[{i}]")
    return bad


def test_sft_grpo_and_eval_report_the_same_accuracy_for_the_same_model(tmp_path, stories):
    base, tokenizer_path = rigged_base(tmp_path / "base", stories)
    tokenizer = BPETokenizer.load(tokenizer_path)
    task = get_task("arithmetic", TASKS_CONFIG)
    expected = held_out_accuracy(load_final(base)[0], tokenizer, task)["accuracy"]
    assert 0 < expected["value"] < 1  # right on the products that are 0 only
    # other items give another number: a stage scoring its own draw would disagree
    head = greedy_accuracy(load_final(base)[0], tokenizer, task, task.examples("test")[:15], max_new_tokens=3)
    assert head["accuracy"] != expected["value"]

    sft_cfg = section_config("sft", dict(mixture={"arithmetic": 1, "replay": 0}, global_batch=4, micro_batch=4, max_steps=2,
                                         lr=1e-6, warmup_steps=1, eval_every=2, eval_examples=4, checkpoint_every=2,
                                         samples=0, peak_flops=1e12, wandb_mode="disabled"))
    sft.train(sft_cfg, model_path=base, tokenizer_path=tokenizer_path, out=tmp_path / "sft", tasks_config=TASKS_CONFIG)
    grpo_cfg = section_config("grpo", dict(prompts_per_step=2, group_size=2, max_completion_tokens=3, max_steps=2,
                                           lr=1e-6, warmup_steps=1, micro_batch=4, eval_every=2, eval_examples=4,
                                           checkpoint_every=2, samples=0, peak_flops=1e12, wandb_mode="disabled"))
    grpo.train(grpo_cfg, model_path=tmp_path / "sft" / "final.pt", tokenizer_path=tokenizer_path,
                     out=tmp_path / "grpo", tasks_config=TASKS_CONFIG)
    sft_m = json.loads((tmp_path / "sft" / "manifest.json").read_text())["metrics"]
    grpo_m = json.loads((tmp_path / "grpo" / "manifest.json").read_text())["metrics"]

    tokens = write_tokens(tmp_path / "tokens", tokenizer, stories[:12])
    cfg = section_config("eval", {"val_tokens": 100_000, "mmlu": {"path": str(RESOURCES / "mmlu"), "max_questions": 8,
                                                                "shots": [0]},
                                  "tasks": {"names": ["arithmetic"], "samples": 2, "k": 2}})
    models = {"pretrain": base, "sft": tmp_path / "sft" / "final.pt", "grpo": tmp_path / "grpo" / "final.pt"}
    run_eval(models, tokens=tokens, tokenizer_path=tokenizer_path, out=tmp_path / "eval", size="nano", cfg=cfg,
             tasks_config=TASKS_CONFIG)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    pass1 = {name: saved["models"][name]["tasks"]["arithmetic"]["pass@1"] for name in models}

    # one number per model, whichever stage reports it
    assert sft_m["arithmetic_accuracy_input"] == pass1["pretrain"] == expected
    assert sft_m["arithmetic_accuracy"] == grpo_m["arithmetic_accuracy_input"] == pass1["sft"]
    assert grpo_m["arithmetic_accuracy"] == pass1["grpo"]
    assert pass1["sft"]["n"] == 15 and pass1["sft"]["method"] == "wilson"
    # on the same items, recorded alike by all three
    record = held_out_record(task)
    eval_manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert sft_m["arithmetic_held_out"] == grpo_m["arithmetic_held_out"] == saved["held_out_items"]["arithmetic"]
    assert eval_manifest["counts"]["held_out_items"]["arithmetic"] == record
    # the stages' comparisons are paired (exact McNemar) and say which way
    assert sft_m["arithmetic_comparison"]["test"] == "mcnemar_exact"
    assert (sft_m["arithmetic_comparison"]["a"], sft_m["arithmetic_comparison"]["b"]) == ("input", "sft")

    # every accuracy, pass@k, val loss and bpb in eval.json has an interval
    assert intervals_everywhere(saved) == []
    first = saved["models"]["sft"]
    assert first["mmlu"]["0-shot"]["acc"]["method"] == "wilson"
    assert first["tasks"]["arithmetic"]["pass@k"]["method"] == "bootstrap"
    assert first["val_loss"]["method"] == "bootstrap" and first["val_loss"]["n"] == 12  # documents
    assert set(first["by_source"]) == {"web"}
    # forgetting: the change of val loss vs base, paired over documents
    forgetting = first["forgetting"]["val_loss"]
    assert forgetting["a"] == "pretrain" and forgetting["b"] == "sft" and forgetting["test"] == "paired_bootstrap"
    assert forgetting["diff"] == pytest.approx(first["val_loss"]["value"] - saved["models"]["pretrain"]["val_loss"]["value"])
    # every pair of models, every metric, paired
    pairs = {(c["a"], c["b"]) for c in saved["comparisons"]}
    assert pairs == {("pretrain", "sft"), ("pretrain", "grpo"), ("sft", "grpo")}
    tests = {c["metric"]: c["test"] for c in saved["comparisons"]}
    assert tests["arithmetic pass@1"] == "mcnemar_exact" and tests["arithmetic pass@2"] == "paired_bootstrap"
    assert tests["MMLU 0-shot acc"] == "mcnemar_exact" and tests["val loss"] == "paired_bootstrap"
    assert saved["tasks"]["arithmetic"]["measured"] is True
    table = (tmp_path / "eval" / "eval.md").read_text()
    assert "Paired comparisons" in table and f"{pass1['sft']['value']:.3f} [" in table

    # the report card's eval table prints these numbers with their intervals, and the forgetting
    page = re.sub(r"<[^>]+>", " ", eval_table(Reader(tmp_path), tmp_path / "eval" / "manifest.json"))
    page = re.sub(r"\s+", " ", page)
    shown = lambda m, f=".3f": f"{m['value']:{f}} [{m['ci95'][0]:{f}}, {m['ci95'][1]:{f}}]"  # noqa: E731
    assert f"arithmetic pass@1 (greedy, n=15) {' '.join(shown(pass1[n]) for n in models)}" in page, page
    assert f"val loss (nats/token) {' '.join(shown(saved['models'][n]['val_loss']) for n in models)}" in page
    lo, hi = forgetting["ci95"]
    assert f"{forgetting['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] p {forgetting['p_value']:.2g}" in page


def test_a_task_at_zero_for_every_model_is_not_measured(tmp_path, stories):
    """Answers of "0" to sums of 1-9 + 1-9 (never 0) are always wrong: the task is flagged and the
    table says so instead of printing zeros."""
    base, tokenizer_path = rigged_base(tmp_path / "base", stories)
    tokenizer = BPETokenizer.load(tokenizer_path)
    tasks = section_config("tasks", {"arithmetic": {"digits": [1, 1], "operators": ["+"], "test_problems": 20,
                                                    "test_fraction": 0.5,
                                                    "held_out": {"items": 20, "max_new_tokens": 2}}})
    assert all(e.answer != "0" for e in held_out_items(get_task("arithmetic", tasks))) or pytest.skip("0 + 0 drawn")
    cfg = section_config("eval", {"val_tokens": 512, "mmlu": {"path": str(RESOURCES / "mmlu"), "max_questions": 4,
                                                               "shots": [0]},
                                  "tasks": {"names": ["arithmetic"], "samples": 2, "k": 2}})
    run_eval({"pretrain": base}, tokens=write_tokens(tmp_path / "tokens", tokenizer, stories[:3]),
             tokenizer_path=tokenizer_path, out=tmp_path / "eval", size="nano", cfg=cfg, tasks_config=tasks)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["tasks"]["arithmetic"] == {"measured": False, "note": "not measured at this scale"}
    assert saved["models"]["pretrain"]["tasks"]["arithmetic"]["measured"] is False
    table = (tmp_path / "eval" / "eval.md").read_text()
    assert "arithmetic: not measured at this scale" in table and "arithmetic pass@1 |" not in table


def test_the_held_out_config_is_checked():
    with pytest.raises(ConfigError, match="tasks.arithmetic.held_out.items"):
        section_config("tasks", {"arithmetic": {"held_out": {"items": 0}}})
