"""The SFT stage on the training engine: accumulation invariance of a real SFT global batch, a run's
outputs and manifest, bit-identical resume after a stop, and its input checks.

The "pretrained" model is a freshly initialised `nano` GPT saved as pretrain saves final.pt, with a
BPE trained on TinyStories with the chat specials: the stage cannot tell, and it trains in
seconds. Runs are in-process (parallel none)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import save_chat_model
from pipeline.artifacts import ChangedInput, verify, write_manifest
from pipeline.cli import ConfigError
from pipeline.config import SCHEMA_DIR, section_config
from pipeline.model.gpt import GPT, load_final
from pipeline.tasks import TASKS
from pipeline.tokenizer import BPETokenizer
from pipeline.tokenizer.bpe import CHAT_SPECIAL_TOKENS
from pipeline.train.engine import setup_run, train_step
from pipeline.train.sft import token_loss, train
from pipeline.train.sft_data import Mixture, SFTLoader, load_split

TASKS_CONFIG = section_config("tasks", {"arithmetic": {"train_problems": 300, "test_problems": 40}})
TEST_CONFIG = dict(mixture={"arithmetic": 3, "gsm8k": 0, "instruct": 1}, global_batch=8, micro_batch=4, max_steps=6,
                   lr=0.01, warmup_steps=2, eval_every=3, eval_examples=8, checkpoint_every=2, keep=2, samples=1,
                   sample_tokens=8, accuracy_examples=10, peak_flops=1e12, wandb_mode="disabled")
SEQ_LEN = 96


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def base(stories, tmp_path_factory) -> tuple[Path, Path]:
    """(final.pt, tokenizer.json): a nano GPT saved the way pretrain exports it, and its tokenizer."""
    return save_chat_model(tmp_path_factory.mktemp("base"), stories, SEQ_LEN, stage="pretrain")


def run(base, out: Path, stop_at: int | None = None, **overrides) -> dict:
    cfg = section_config("sft", {**TEST_CONFIG, **overrides})
    return train(cfg, model_path=base[0], tokenizer_path=base[1], out=out, tasks_config=TASKS_CONFIG, stop_at=stop_at)


def step_losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("loss") is not None and "event" not in r]


def test_accumulation_gives_the_gradient_of_the_whole_global_batch(base, tmp_path):
    """One SFT global batch of 8 conversations (arithmetic and instructions, very different numbers
    of assistant tokens) as one micro batch, and as 4 accumulated micro batches of 2: the same
    gradient within 1e-6 through the engine's train_step and SFT's loss."""
    tokenizer = BPETokenizer.load(base[1])
    tasks, _ = load_split(tokenizer, TASKS_CONFIG, ["arithmetic", "instruct"], "train", SEQ_LEN)
    mixture = Mixture(tasks, {"arithmetic": 1, "instruct": 1}, seed=3)
    cfg = section_config("sft", {"grad_clip": 0, "wandb_mode": "disabled"})
    deltas, weights = [], []
    for micro_batch in (8, 2):
        batches = SFTLoader(mixture, 8, micro_batch, 0, 1, tokenizer.eos_id).next_batches(torch.device("cpu"))
        assert len(batches) == 8 // micro_batch
        model = load_final(base[0])[0].train()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the gradient
        with setup_run("sft", cfg, out=tmp_path / str(micro_batch), identity={}, wandb_config={}) as r:
            result = train_step(r, model, optimizer, batches, token_loss, lr=1.0)
        deltas.append([b - p.detach() for b, p in zip(before, model.parameters())])
        weights.append(result.weight)
    assert weights[0] == weights[1] > 0
    for a, b in zip(*deltas):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert max(a.abs().max().item() for a in deltas[0]) > 1e-3  # a real gradient, not zeros


def test_a_run_writes_its_outputs_and_resumes_bit_identically(base, tmp_path):
    whole = run(base, tmp_path / "whole")
    assert whole["finished"] and whole["step"] == 6
    out = tmp_path / "whole"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "sft" and verify(out)[1] == []
    counts, metrics = manifest["counts"], manifest["metrics"]
    assert counts["conversations"] == 6 * 8 and counts["trained_tokens"] > 0
    assert counts["dropped_too_long"]["instruct"] > 0 and counts["dropped_too_long"]["arithmetic"] == 0
    assert set(counts["train_conversations"]) == {"arithmetic", "instruct"}  # gsm8k has weight 0
    assert metrics["arithmetic_accuracy"]["n"] == 10 and 0 <= metrics["arithmetic_accuracy"]["value"] <= 1
    assert metrics["arithmetic_accuracy_input"]["n"] == 10 and metrics["arithmetic_held_out"]["items"] == 10
    assert metrics["mixture_shares"] == pytest.approx({"arithmetic": 0.75, "instruct": 0.25}, abs=1e-3)
    model, meta = load_final(out / "final.pt")  # weights_only=True
    assert meta["step"] == 6 and meta["vocab_size"] == 400
    samples = (out / "samples.md").read_text()
    assert samples.count("## Prompt") == 2 and "What is" in samples and "arithmetic accuracy" in samples
    assert (out / "loss.png").stat().st_size > 0

    stopped = run(base, tmp_path / "resumed", stop_at=3)
    assert not stopped["finished"] and stopped["step"] == 3
    assert not (tmp_path / "resumed" / "final.pt").exists()
    resumed = run(base, tmp_path / "resumed")
    assert resumed["finished"]
    assert step_losses(tmp_path / "resumed") == step_losses(out)
    a = torch.load(out / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert again["counts"]["trained_tokens"] == counts["trained_tokens"]
    assert again["metrics"]["arithmetic_accuracy"] == metrics["arithmetic_accuracy"]


def test_inputs_are_checked_before_training(base, stories, tmp_path):
    """A tokenizer that is not the model's, an input its manifest does not vouch for, and a batch
    that does not split are refused, each naming the file or key."""
    other = BPETokenizer.train(stories, 380, special_tokens=CHAT_SPECIAL_TOKENS)
    other.save(tmp_path / "other.json")
    write_manifest(tmp_path / "manifest.json", stage="tokenizer", config={}, inputs=[],
                   outputs={tmp_path / "other.json": None})
    cfg = section_config("sft", TEST_CONFIG)
    with pytest.raises(ValueError, match=r"other\.json: vocab 380 .* pretrained with vocab 400"):
        train(cfg, model_path=base[0], tokenizer_path=tmp_path / "other.json", out=tmp_path / "out",
              tasks_config=TASKS_CONFIG)
    with pytest.raises(ConfigError, match="sft.global_batch"):
        run(base, tmp_path / "batch", global_batch=6)
    (tmp_path / "other.json").write_text(base[1].read_text())  # changed since its manifest was written
    with pytest.raises(ChangedInput, match=r"other\.json: sha256 differs"):
        train(section_config("sft", TEST_CONFIG), model_path=base[0], tokenizer_path=tmp_path / "other.json",
              out=tmp_path / "out", tasks_config=TASKS_CONFIG)


def test_the_mixture_keys_are_the_tasks():
    schema = yaml.safe_load((SCHEMA_DIR / "sft.schema.yaml").read_text())
    assert set(schema["properties"]["mixture"]["properties"]) == set(TASKS)
    with pytest.raises(ConfigError, match="sft.mixture.arithmetc"):
        section_config("sft", {"mixture": {"arithmetc": 1}})
