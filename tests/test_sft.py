"""The SFT stage on the training engine: accumulation invariance of a real SFT global batch of
conversations and replayed text, a run's outputs and manifest, bit-identical resume after a stop,
replayed text reaching the loss, and its input checks.

The "pretrained" model is a freshly initialised `nano` GPT saved as pretrain saves final.pt, with a
BPE trained on TinyStories with the chat specials and token shards of TinyStories written with it:
the stage cannot tell, and it trains in seconds. Runs are in-process (parallel none)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import save_chat_model, save_chat_tokens
from pipeline.artifacts import ChangedInput, verify, write_manifest
from pipeline.config import SCHEMA_DIR, ConfigError, section_config
from pipeline.model.gpt import GPT, load_final
from pipeline.tasks import TASKS
from pipeline.tokenizer import BPETokenizer
from pipeline.tokenizer.bpe import CHAT_SPECIAL_TOKENS
from pipeline.train.engine import setup_run, token_loss, train_step
from pipeline.train.sft import train
from pipeline.train.sft_data import REPLAY, Mixture, ReplayRows, SFTLoader, load_split

TASKS_CONFIG = section_config("tasks", {"arithmetic": {"train_problems": 300, "test_problems": 40}})
TEST_CONFIG = dict(mixture={"arithmetic": 2, "gsm8k": 0, "instruct": 1, "replay": 1}, replay_tokens=32,
                   global_batch=8, micro_batch=4, max_steps=6,
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


@pytest.fixture(scope="module")
def tokens(base, stories, tmp_path_factory) -> Path:
    """tokens/ written with the base's tokenizer: what it was "pretrained" on, replayed by SFT."""
    return save_chat_tokens(tmp_path_factory.mktemp("tokens"), base[1], stories[:40], stories[40:50])


def run(base, tokens, out: Path, stop_at: int | None = None, **overrides) -> dict:
    cfg = section_config("sft", {**TEST_CONFIG, **overrides})
    return train(cfg, model_path=base[0], tokenizer_path=base[1], out=out, tasks_config=TASKS_CONFIG, tokens=tokens,
                 stop_at=stop_at)


def step_losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("loss") is not None and "event" not in r]


def test_accumulation_gives_the_gradient_of_the_whole_global_batch(base, tokens, tmp_path):
    """One SFT global batch of 8 rows (arithmetic, instructions and replayed text, very different
    numbers of trained tokens) as one micro batch, and as 4 accumulated micro batches of 2: the
    same gradient within 1e-6 through the engine's train_step and SFT's loss."""
    tokenizer = BPETokenizer.load(base[1])
    tasks, _ = load_split(tokenizer, TASKS_CONFIG, ["arithmetic", "instruct"], "train", SEQ_LEN)
    tasks[REPLAY] = ReplayRows(tokens, "train", tokenizer.n_vocab, 48)
    mixture = Mixture(tasks, {"arithmetic": 1, "instruct": 1, REPLAY: 1}, seed=3)
    cfg = section_config("sft", {"grad_clip": 0, "wandb_mode": "disabled"})
    deltas, weights = [], []
    assert {mixture[g][0] for g in range(8)} == {"arithmetic", "instruct", REPLAY}  # every kind of row
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


def test_a_run_writes_its_outputs_and_resumes_bit_identically(base, tokens, tmp_path):
    whole = run(base, tokens, tmp_path / "whole")
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
    assert counts[REPLAY]["train_windows"] == len(ReplayRows(tokens, "train", 400, 32))
    assert counts[REPLAY]["held_out_windows"] == 8  # eval_examples, from the val split
    assert metrics["mixture_shares"] == pytest.approx({"arithmetic": 0.5, "instruct": 0.25, REPLAY: 0.25}, abs=1e-3)
    assert set(metrics["final_val_loss_by_part"]) == {"tasks", REPLAY}
    # the replayed shards are inputs, named with their sha256 like the model and the tokenizer
    inputs = {Path(entry["path"]).name for entry in manifest["inputs"]}
    assert {"text.bin", "text.idx", "manifest.json", "final.pt", "tokenizer.json"} <= inputs
    model, meta = load_final(out / "final.pt")  # weights_only=True
    assert meta["step"] == 6 and meta["vocab_size"] == 400
    samples = (out / "samples.md").read_text()
    assert samples.count("## Prompt") == 2 and "What is" in samples and "arithmetic accuracy" in samples
    assert (out / "loss.png").stat().st_size > 0

    stopped = run(base, tokens, tmp_path / "resumed", stop_at=3)
    assert not stopped["finished"] and stopped["step"] == 3
    assert not (tmp_path / "resumed" / "final.pt").exists()
    resumed = run(base, tokens, tmp_path / "resumed")
    assert resumed["finished"]
    assert step_losses(tmp_path / "resumed") == step_losses(out)
    a = torch.load(out / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    assert again["counts"]["trained_tokens"] == counts["trained_tokens"]
    assert again["metrics"]["arithmetic_accuracy"] == metrics["arithmetic_accuracy"]
    assert again["metrics"]["final_val_loss_by_part"] == metrics["final_val_loss_by_part"]


def val_text_loss(final: Path, tokens: Path, tokenizer: BPETokenizer) -> float:
    """Loss per token of a model on every whole-context window of the tokens' val split."""
    windows = ReplayRows(tokens, "val", tokenizer.n_vocab, SEQ_LEN).windows
    batch = torch.stack([torch.as_tensor(windows[i], dtype=torch.long) for i in range(len(windows))])
    with torch.no_grad():
        total, count = token_loss(load_final(final)[0].eval(), (batch[:, :-1], batch[:, 1:]))
    return (total / count).item()


def test_replay_trains_the_language_model(base, tokens, tmp_path):
    """The replayed windows reach the loss: the same arithmetic run with replay in the mixture ends
    with a lower loss on the tokens' held-out val text than without it and than the base, while
    both learn the task. Were replay dropped from the stream or masked out of the loss, the replay
    run would not learn the text either."""
    tokenizer = BPETokenizer.load(base[1])
    steps = dict(max_steps=12, eval_every=12, checkpoint_every=12, accuracy_examples=0, samples=0)
    val_loss = {"base": val_text_loss(base[0], tokens, tokenizer)}
    for name, replay in (("tasks", 0), ("replay", 1)):
        summary = run(base, tokens, tmp_path / name, mixture={"arithmetic": 1, "instruct": 0, "replay": replay},
                      **steps)
        assert summary["metrics"]["final_val_loss_by_part"]["tasks"] < 4.0  # both learn the task
        val_loss[name] = val_text_loss(tmp_path / name / "final.pt", tokens, tokenizer)
    assert val_loss["replay"] < min(val_loss["tasks"], val_loss["base"]) - 0.5, val_loss


def test_inputs_are_checked_before_training(base, tokens, stories, tmp_path):
    """A tokenizer that is not the model's, an input its manifest does not vouch for, a batch
    that does not split, and replay without this tokenizer's shards, or with windows past the
    context, are refused, each naming the file or key."""
    other = BPETokenizer.train(stories, 380, special_tokens=CHAT_SPECIAL_TOKENS)
    other.save(tmp_path / "other.json")
    write_manifest(tmp_path / "manifest.json", stage="tokenizer", config={}, inputs=[],
                   outputs={tmp_path / "other.json": None})
    cfg = section_config("sft", TEST_CONFIG)
    with pytest.raises(ValueError, match=r"other\.json: vocab 380 .* pretrained with vocab 400"):
        train(cfg, model_path=base[0], tokenizer_path=tmp_path / "other.json", out=tmp_path / "out",
              tasks_config=TASKS_CONFIG)
    with pytest.raises(ConfigError, match="sft.global_batch"):
        run(base, tokens, tmp_path / "batch", global_batch=6)
    with pytest.raises(ConfigError, match=r"sft.mixture.replay.*--tokens"):
        run(base, None, tmp_path / "no-tokens")
    with pytest.raises(ConfigError, match="sft.replay_tokens"):
        run(base, tokens, tmp_path / "long", replay_tokens=SEQ_LEN + 1)
    others = save_chat_tokens(tmp_path / "others", tmp_path / "other.json", stories[:5], stories[5:7])
    with pytest.raises(ValueError, match=r"others/manifest\.json: the shards were written by the tokenizer"):
        run(base, others, tmp_path / "other-tokens")
    changed = save_chat_tokens(tmp_path / "changed", base[1], stories[:5], stories[5:7])
    shard = changed / "train" / "text.bin"
    data = bytearray(shard.read_bytes())
    data[-4] ^= 1  # one token id changed since the manifest was written
    shard.write_bytes(bytes(data))
    with pytest.raises(ChangedInput, match=r"text\.bin: sha256 differs"):
        run(base, changed, tmp_path / "changed-tokens")
    assert not (tmp_path / "changed-tokens").exists()  # refused before the run folder is made
    (tmp_path / "other.json").write_text(base[1].read_text())  # changed since its manifest was written
    with pytest.raises(ChangedInput, match=r"other\.json: sha256 differs"):
        train(section_config("sft", TEST_CONFIG), model_path=base[0], tokenizer_path=tmp_path / "other.json",
              out=tmp_path / "out", tasks_config=TASKS_CONFIG)


def test_the_mixture_keys_are_the_tasks_and_replay():
    schema = yaml.safe_load((SCHEMA_DIR / "sft.schema.yaml").read_text())
    assert set(schema["properties"]["mixture"]["properties"]) == {*TASKS, REPLAY}
    with pytest.raises(ConfigError, match="sft.mixture.arithmetc"):
        section_config("sft", {"mixture": {"arithmetc": 1}})
