"""SFT data and the greedy task evaluator: targets only on a conversation's assistant tokens
(prompt tokens get zero gradient) and on every token of a replayed window, the seeded mixture of
tasks and replay, global batches independent of the process layout, long conversations dropped and
counted, and batched greedy answers equal to one prompt at a time.

Real parts throughout: a BPE trained on TinyStories with the chat specials, token shards written
with it, the tasks package, the chat template and the `nano` GPT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import save_chat_tokens
from pipeline.config import ConfigError
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.tasks import get_task, qa_example
from pipeline.tasks.evaluate import greedy_accuracy, greedy_complete
from pipeline.tokenizer import BPETokenizer
from pipeline.tokenizer.bpe import ASSISTANT_END, CHAT_SPECIAL_TOKENS
from pipeline.tokenizer.chat import render_conversation, render_prompt
from pipeline.train.engine import token_loss
from pipeline.train.sft_data import (REPLAY, Mixture, ReplayRows, SFTLoader, collate, load_split, micro_batches,
                                     val_batches)

TASKS = {"arithmetic": {"train_problems": 300, "test_problems": 40}}
SEQ_LEN = 96


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on 2 shared cores, two threads per process spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(stories) -> BPETokenizer:
    return BPETokenizer.train(stories, 400, special_tokens=CHAT_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def train_split(tokenizer):
    return load_split(tokenizer, TASKS, ["arithmetic", "instruct"], "train", SEQ_LEN)


@pytest.fixture(scope="module")
def tokens(tokenizer, stories, tmp_path_factory):
    """tokens/ written with `tokenizer`: 40 stories in train/, 10 others in val/."""
    folder = tmp_path_factory.mktemp("tokens")
    tokenizer.save(folder / "tokenizer.json")
    return save_chat_tokens(folder, folder / "tokenizer.json", stories[:40], stories[40:50])


def windows(tokenizer, tokens, split, length) -> set[tuple[int, ...]]:
    """Every window of length + 1 ids of the split, straight from its shard."""
    ids = np.fromfile(tokens / split / "text.bin", dtype=np.uint16).tolist()
    return {tuple(ids[i:i + length + 1]) for i in range(0, len(ids) - length, length)}


def nano(tokenizer, seq_len=SEQ_LEN) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_size("nano", vocab_size=tokenizer.n_vocab, seq_len=seq_len))


def test_targets_are_the_next_assistant_tokens_and_padding_is_ignored(tokenizer):
    long = render_conversation(tokenizer, [{"role": "user", "content": "Tell me about the dog."},
                                           {"role": "assistant", "content": "The dog ran home."},
                                           {"role": "user", "content": "And then?"},
                                           {"role": "assistant", "content": "It slept."}])
    short = render_conversation(tokenizer, qa_example("What is 2 + 3?", "2 + 3 = 5", "5").messages)
    x, y = collate([short, long], pad_id=0)
    assert x.shape == y.shape == (2, len(long[0]) - 1)
    for row, (ids, mask) in enumerate([short, long]):
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1]
        assert y[row, :n].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert (y[row, n:] == -1).all() and (x[row, n:] == 0).all()
    # the trained targets read back as the assistant turns with their end tokens, nothing else
    trained = [t for t in y[1].tolist() if t != -1]
    assert tokenizer.decode(trained) == f"The dog ran home.{ASSISTANT_END}It slept.{ASSISTANT_END}"


def test_prompt_tokens_get_zero_gradient_and_replayed_text_the_full_loss(tokenizer, tokens):
    """In a micro batch of conversations and replayed windows, the logits at every position whose
    next token is a prompt token (or padding) get exactly zero gradient from the SFT loss; every
    assistant position gets some, and so does every position of a replayed window: its targets
    are all its next tokens."""
    rows = [render_conversation(tokenizer, qa_example(f"What is {a} + 7?", f"{a} + 7 = {a + 7}", "").messages)
            for a in (3, 41, 596)]
    replay = ReplayRows(tokens, "train", tokenizer.n_vocab, 20)
    rows += [replay[0], replay[5]]
    x, y = collate(rows, pad_id=0)
    for row, (ids, _) in enumerate(rows[3:], start=3):
        assert y[row, :20].tolist() == ids[1:] and (y[row, 20:] == -1).all()  # every target, then padding
    model = nano(tokenizer)
    logits = {}

    def keep(module, inputs, output):
        output.retain_grad()
        logits["out"] = output

    model.lm_head.register_forward_hook(keep)
    loss, count = token_loss(model, (x, y))  # SFT's loss: the sum over targets that are not -1, and their count
    loss.backward()
    grad = logits["out"].grad.abs().sum(dim=-1)  # (B, T)
    assert count == sum(sum(m[1:]) for _, m in rows)
    assert (grad[y == -1] == 0).all()
    assert (grad[y != -1] > 0).all()


def test_mixture_is_seeded_and_follows_the_weights(train_split):
    tasks, dropped = train_split
    a = Mixture(tasks, {"arithmetic": 3, "instruct": 1}, seed=5)
    b = Mixture(tasks, {"arithmetic": 3, "instruct": 1}, seed=5)
    c = Mixture(tasks, {"arithmetic": 3, "instruct": 1}, seed=6)
    stream = [a[g] for g in range(2 * a.epoch_size + 7)]  # across epochs
    assert stream == [b[g] for g in range(len(stream))]
    assert stream[:50] != [c[g] for g in range(50)]
    assert a.shares() == pytest.approx({"arithmetic": 0.75, "instruct": 0.25}, abs=1e-3)
    first_epoch = [name for name, _ in stream[:a.epoch_size]]
    assert first_epoch.count("instruct") == a.counts[1]
    # the small task repeats (the instruct share exceeds its size), the large one is subsampled
    instruct = [tuple(r[0]) for name, r in stream[:a.epoch_size] if name == "instruct"]
    assert len(set(instruct)) == len(tasks["instruct"]) < len(instruct)
    # reading the stream out of order gives the same items (only the position is state)
    assert [a[g] for g in (a.epoch_size + 3, 4, 2 * a.epoch_size + 1)] == \
        [stream[a.epoch_size + 3], stream[4], stream[2 * a.epoch_size + 1]]
    with pytest.raises(ConfigError, match="sft.mixture"):
        Mixture(tasks, {"arithmetic": 0, "instruct": 0}, seed=5)


def test_replay_is_seeded_follows_its_weight_and_reads_the_train_split_only(tokenizer, tokens, train_split):
    tasks, _ = train_split
    replay = ReplayRows(tokens, "train", tokenizer.n_vocab, 16)
    assert len(replay) == len(windows(tokenizer, tokens, "train", 16)) > 100
    parts = {"arithmetic": tasks["arithmetic"], REPLAY: replay}
    a = Mixture(parts, {"arithmetic": 3, REPLAY: 1}, seed=5)
    stream = [a[g] for g in range(2 * a.epoch_size + 7)]
    assert stream == [Mixture(parts, {"arithmetic": 3, REPLAY: 1}, seed=5)[g] for g in range(len(stream))]
    assert stream[:50] != [Mixture(parts, {"arithmetic": 3, REPLAY: 1}, seed=6)[g] for g in range(50)]
    assert a.shares() == pytest.approx({"arithmetic": 0.75, REPLAY: 0.25}, abs=1e-3)
    assert [name for name, _ in stream[:a.epoch_size]].count(REPLAY) == a.counts[1]
    replayed = [tuple(ids) for name, (ids, mask) in stream if name == REPLAY]
    assert all(mask == [1] * 17 for name, (_, mask) in stream if name == REPLAY)
    train, val = windows(tokenizer, tokens, "train", 16), windows(tokenizer, tokens, "val", 16)
    assert set(replayed) <= train and not set(replayed) & val and len(set(replayed)) > 50


def test_long_conversations_are_dropped_and_counted(tokenizer, train_split):
    tasks, dropped = train_split
    instruct = get_task("instruct", TASKS).examples("train")
    lengths = [len(render_conversation(tokenizer, e.messages)[0]) for e in instruct]
    assert dropped["instruct"] == sum(n > SEQ_LEN + 1 for n in lengths) > 0
    assert len(tasks["instruct"]) == len(instruct) - dropped["instruct"]
    assert dropped["arithmetic"] == 0 and max(len(ids) for ids, _ in tasks["instruct"]) <= SEQ_LEN + 1
    with pytest.raises(ConfigError, match="sft.mixture.instruct"):
        load_split(tokenizer, TASKS, ["instruct"], "test", 4)


@pytest.mark.parametrize("micro_batch, world_size", [(8, 1), (2, 1), (2, 2), (1, 4)])
def test_a_global_batch_is_the_same_whatever_the_layout(train_split, micro_batch, world_size):
    """The same conversations (as trained targets) in a step's global batch over every rank and
    micro batch, for any accumulation and process count; positions advance identically."""
    tasks, _ = train_split
    mixture = Mixture(tasks, {"arithmetic": 3, "instruct": 1}, seed=1)
    reference = SFTLoader(mixture, 8, 8, 0, 1, pad_id=0)
    loaders = [SFTLoader(mixture, 8, micro_batch, rank, world_size, pad_id=0) for rank in range(world_size)]
    for _ in range(3):
        [(x, y)] = reference.next_batches(torch.device("cpu"))
        want = sorted(tuple(row[row != -1].tolist()) for row in y)
        got = []
        for loader in loaders:
            batches = loader.next_batches(torch.device("cpu"))
            assert len(batches) == 8 // (micro_batch * world_size)
            got += [tuple(row[row != -1].tolist()) for _, yb in batches for row in yb]
        assert sorted(got) == want
    assert all(loader.position == reference.position == 24 for loader in loaders)
    with pytest.raises(ConfigError, match="sft.global_batch"):
        SFTLoader(mixture, 8, 3, 0, 1, pad_id=0)


def test_micro_batches_group_rows_of_like_length(train_split):
    tasks, _ = train_split
    rows = tasks["instruct"][:6] + tasks["arithmetic"][:6]
    batches = micro_batches(rows, 6, 0, 1, pad_id=0)
    assert [x.size(1) for x, _ in batches][0] == max(len(ids) for ids, _ in tasks["arithmetic"][:6]) - 1


def test_val_batches_give_every_rank_the_same_count(train_split):
    tasks, _ = train_split
    rows = tasks["arithmetic"][:11]
    assert [len(val_batches(rows, 2, r, 2, pad_id=0)) for r in (0, 1)] == [2, 2]  # 11 -> 8 rows
    with pytest.raises(ConfigError, match="sft.eval_examples"):
        val_batches(rows[:3], 2, 0, 2, pad_id=0)


def test_batched_greedy_answers_equal_one_prompt_at_a_time(tokenizer):
    task = get_task("arithmetic", TASKS)
    examples = task.examples("test")[:12]
    model = nano(tokenizer).eval()
    prompts = [render_prompt(tokenizer, e.prompt) for e in examples]
    assert len({len(p) for p in prompts}) > 1  # several lengths, decoded together
    stop = tokenizer.special_tokens[ASSISTANT_END]
    batched = greedy_complete(model, prompts, max_new_tokens=10, stop_id=stop, batch_size=4)
    for prompt, got in zip(prompts, batched):
        [alone] = greedy_complete(model, [prompt], max_new_tokens=10, stop_id=stop)
        assert got == alone and stop not in got

    result = greedy_accuracy(model, tokenizer, task, examples, max_new_tokens=10, batch_size=4)
    rewards = [task.reward(tokenizer.decode(ids), e.answer) for ids, e in zip(batched, examples)]
    assert result["n"] == 12 and result["correct"] == sum(rewards)
    assert result["accuracy"] == sum(rewards) / 12
    assert [a["completion"] for a in result["answers"]] == [tokenizer.decode(ids) for ids in batched]
    assert not model.training


def test_greedy_accuracy_counts_right_answers(tokenizer):
    """The evaluator scores answers with the task's reward: a model trained (briefly, for real) to
    answer one problem gets it right, and a wrong reference makes the same answer wrong."""
    task = get_task("arithmetic", TASKS)
    example = qa_example("What is 12 + 30?", "12 + 30 = 42", "42")
    model = nano(tokenizer, seq_len=32)
    x, y = collate([render_conversation(tokenizer, example.messages)], pad_id=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    right = greedy_accuracy(model, tokenizer, task, [example], max_new_tokens=12)
    assert right["answers"][0]["completion"] == "12 + 30 = 42" and right["accuracy"] == 1.0
    wrong = greedy_accuracy(model, tokenizer, task, [qa_example("What is 12 + 30?", "", "41")], max_new_tokens=12)
    assert wrong["accuracy"] == 0.0 and wrong["correct"] == 0
