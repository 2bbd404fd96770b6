"""pipeline/eval: bits per byte, harness-style multiple-choice scoring, MMLU prompts, pass@k and the
base/SFT/GRPO table, on hand-computable cases and real small models."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import save_final, tiny_gpt

from conftest import RESOURCES, seal
from pipeline.artifacts import verify, write_manifest
from pipeline.config import section_config
from pipeline.eval.loss import bits_per_byte, token_logprobs, val_document_scores, val_loss_bpb
from pipeline.eval.mmlu import format_question, prompt, questions, summarize
from pipeline.eval.mmlu_data import read_split
from pipeline.eval.multiple_choice import Question, encode_pair, evaluate, loglikelihoods, pick, score
from pipeline.eval.stage import run_eval
from pipeline.eval.tasks import pass_at_k, task_accuracy
from pipeline.stats import fmt, proportion
from pipeline.tasks import Example, Task, get_task, qa_example
from pipeline.token_shards import write_shard
from pipeline.tokenizer.bpe import ASSISTANT_END, CHAT_SPECIAL_TOKENS, BPETokenizer

MMLU = RESOURCES / "mmlu"


@pytest.fixture(scope="module")
def tokenizer(stories) -> BPETokenizer:
    return BPETokenizer.train(stories, 400, special_tokens=CHAT_SPECIAL_TOKENS)


def zero_gpt(vocab_size: int, seq_len: int = 32):
    """Every weight zero: the logits are all 0, so every real id has probability 1 / vocab_size."""
    model = tiny_gpt(vocab_size, seq_len=seq_len)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def write_tokens(folder: Path, tokenizer: BPETokenizer, docs: list[str], more: dict[str, list[str]] | None = None) -> Path:
    """A tokens folder as the tokenize stage writes it: val/ shards (s.bin holding `docs`, and one
    per name of `more`) + manifest.json metrics."""
    shards = {"s": docs, **(more or {})}
    for name, texts in shards.items():
        write_shard(folder / "val" / f"{name}.bin", [tokenizer.encode(d) + [tokenizer.eos_id] for d in texts],
                    tokenizer.n_vocab)
    write_manifest(folder / "manifest.json", stage="tokens", config={}, inputs=[],
                   outputs={folder / "val" / f"{name}.{ext}": None for name in shards for ext in ("bin", "idx")},
                   metrics={"vocab_size": tokenizer.n_vocab, "eos_id": tokenizer.eos_id})
    return folder


# --- loss and bits per byte ------------------------------------------------------------------------

def test_bits_per_byte_formula():
    assert bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)  # 8 bits over 4 bytes


def test_val_bpb_of_a_uniform_model_by_hand(tmp_path, tokenizer, stories):
    tokens = write_tokens(tmp_path / "tokens", tokenizer, stories[:10])
    model = zero_gpt(tokenizer.n_vocab, seq_len=32)
    result = val_loss_bpb(model, tokens, tokenizer, max_tokens=10_000, batch_size=4)
    stream = [t for d in stories[:10] for t in tokenizer.encode(d) + [tokenizer.eos_id]]
    n_windows = (len(stream) - 1) // 32
    targets = [stream[1 + i * 32 + j] for i in range(n_windows) for j in range(32)]
    text_targets = [t for t in targets if t != tokenizer.eos_id]
    n_bytes = len(tokenizer.decode_bytes(text_targets))
    assert result["tokens"] == len(targets) and result["bytes"] == n_bytes and result["documents"] == 10
    assert result["val_loss"]["value"] == pytest.approx(math.log(tokenizer.n_vocab))  # every id 1/V
    # every document has the same loss per token, so resampling documents cannot move it
    assert result["val_loss"]["ci95"] == pytest.approx([math.log(tokenizer.n_vocab)] * 2)
    # the <|endoftext|> targets count in neither the nats nor the bytes of bpb
    bpb = len(text_targets) * math.log(tokenizer.n_vocab) / (math.log(2) * n_bytes)
    assert result["bpb"]["value"] == pytest.approx(bpb)
    assert result["by_source"]["web"]["val_loss"] == result["val_loss"]


def test_val_loss_per_document_and_per_source(tmp_path, tokenizer, stories):
    """Targets are summed into the documents they belong to, windows crossing document ends
    included, and each text corpus is scored apart from the web shards."""
    tokens = write_tokens(tmp_path / "tokens", tokenizer, stories[:2], {"tinystories": stories[2:5]})
    model = tiny_gpt(tokenizer.n_vocab, seq_len=32, seed=4)
    scores = val_document_scores(model, tokens, tokenizer, max_tokens=10_000, text_sources=["tinystories"])
    assert set(scores) == {"web", "tinystories"} and len(scores["tinystories"].nats) == 3
    for name, docs in (("web", stories[:2]), ("tinystories", stories[2:5])):
        stream = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_id]]
        ends = np.cumsum([len(tokenizer.encode(d)) + 1 for d in docs])
        n_windows = (len(stream) - 1) // 32
        want = np.zeros((2, len(docs)))
        for i in range(n_windows):
            window = torch.tensor([stream[i * 32:i * 32 + 33]])
            with torch.no_grad():
                nats = -token_logprobs(model(window[:, :-1]), window[:, 1:], tokenizer.n_vocab)[0]
            for j in range(32):
                doc = int(np.searchsorted(ends, i * 32 + 1 + j, side="right"))
                want[:, doc] += [nats[j].item(), 1]
        assert scores[name].nats == pytest.approx(want[0], rel=1e-5) and list(scores[name].tokens) == list(want[1])
    result = val_loss_bpb(model, tokens, tokenizer, max_tokens=10_000, text_sources=["tinystories"])
    total = sum(s.nats.sum() for s in scores.values()) / sum(s.tokens.sum() for s in scores.values())
    assert result["val_loss"]["value"] == pytest.approx(total) and result["documents"] == 5
    assert result["by_source"]["web"]["documents"] == 2
    # unnamed as a text corpus, every shard is web text
    assert set(val_loss_bpb(model, tokens, tokenizer, max_tokens=10_000)["by_source"]) == {"web"}
    # max_tokens is per source: the first windows of each
    assert val_loss_bpb(model, tokens, tokenizer, max_tokens=64, text_sources=["tinystories"])["tokens"] == 2 * 64


def test_token_logprobs_ignore_padding_rows_and_minus_one():
    logits = torch.tensor([[[0.0, 0.0, 50.0, 50.0]]])  # ids 2, 3 are padding of a vocabulary of 2
    assert token_logprobs(logits, torch.tensor([[1]]), 2).item() == pytest.approx(math.log(0.5))
    assert token_logprobs(logits, torch.tensor([[-1]]), 2).item() == 0.0


# --- multiple choice -------------------------------------------------------------------------------

def test_acc_and_acc_norm_pick_differently_by_hand():
    # sums -3 and -4: acc takes the first; per character -3/2 = -1.5 < -4/8 = -0.5: acc_norm the second
    assert pick([-3.0, -4.0], ["ab", "abcdefgh"]) == (0, 1)


def test_loglikelihoods_of_a_uniform_model_by_hand(tokenizer):
    model = zero_gpt(tokenizer.n_vocab)
    context, choices = "Once upon a time there was a", [" cat", " xqzjv", " very big and friendly dog"]
    sums = loglikelihoods(model, tokenizer, context, choices)
    n_tokens = [len(encode_pair(tokenizer, context, c)[1]) for c in choices]
    assert sums == pytest.approx([-n * math.log(tokenizer.n_vocab) for n in n_tokens])
    acc, norm = pick(sums, choices)
    assert n_tokens[acc] == min(n_tokens)  # the fewest tokens to pay for
    assert choices[norm] == " very big and friendly dog"  # the most characters per token
    assert acc != norm


def test_encode_pair_splits_as_the_harness(tokenizer):
    context_ids, choice_ids = encode_pair(tokenizer, "Answer: ", "cat")
    # the context's trailing space moves to the choice: whole = encode("Answer: cat")
    assert context_ids == tokenizer.encode("Answer:")
    assert context_ids + choice_ids == tokenizer.encode("Answer: cat")
    assert tokenizer.decode(choice_ids) == " cat"
    assert encode_pair(tokenizer, "", "cat") == ([tokenizer.eos_id], tokenizer.encode("cat"))


def test_batched_scores_equal_one_forward_per_pair(tokenizer, stories):
    model = tiny_gpt(tokenizer.n_vocab, seq_len=32, seed=3)
    pairs = [encode_pair(tokenizer, stories[i][:40 * (i + 1)], " and then" * (i + 1)) for i in range(5)]
    batched = score(model, pairs, batch_size=2)
    for (context_ids, choice_ids), got in zip(pairs, batched):
        ids = (context_ids + choice_ids)[-33:]  # longer than the context: the last tokens are kept
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0, :, :tokenizer.n_vocab], -1)
        n = len(choice_ids)
        want = sum(logp[len(ids) - 1 - n + j, ids[len(ids) - n + j]].item() for j in range(n))
        assert got == pytest.approx(want, abs=1e-4)


def test_one_token_choices_after_one_context_share_a_forward(tokenizer):
    """One-token choices after one prompt (as MMLU's " A".." D"): one forward per question, and
    the sums each choice gets alone."""
    model = tiny_gpt(tokenizer.n_vocab, seq_len=32, seed=6)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    qs = [Question(f"Question {i}: is it true?\nAnswer:", [" the", " and", " a", " to"], answer=i, group="x")
          for i in range(2)]
    assert all(len(encode_pair(tokenizer, q.context, c)[1]) == 1 for q in qs for c in q.choices)
    results = evaluate(model, tokenizer, qs, batch_size=1)
    assert len(calls) == 2
    for q, r in zip(qs, results):
        alone = [score(model, [encode_pair(tokenizer, q.context, c)], batch_size=1)[0] for c in q.choices]
        assert r["sums"] == pytest.approx(alone, abs=1e-5)


def test_evaluate_counts_right_answers(tokenizer):
    model = zero_gpt(tokenizer.n_vocab)
    qs = [Question("Q:", [" a", " once upon a time there was a little girl"], answer=0, group="x"),
          Question("Q:", [" a", " once upon a time there was a little girl"], answer=1, group="y")]
    results = evaluate(model, tokenizer, qs)
    assert [r["acc"] for r in results] == [1.0, 0.0] and [r["acc_norm"] for r in results] == [0.0, 1.0]
    summary = summarize(results)
    assert summary["acc"] == proportion(1, 2) and summary["acc_norm"] == proportion(1, 2)
    assert summary["subjects"]["x"]["acc"] == proportion(1, 1) and summary["chance"] == 0.25


# --- MMLU ------------------------------------------------------------------------------------------

def test_mmlu_prompt_is_the_harness_format():
    item = {"question": " What is 2+2? ", "choices": ["3", "4", "5", "6"], "answer": 1}
    assert format_question(item) == "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    assert prompt("high_school_mathematics", item, [item]) == (
        "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")


def test_mmlu_bundled_questions_round_robin_and_shots():
    test = read_split(MMLU, "test")
    qs = questions(MMLU, shots=5, max_questions=8)
    assert len(qs) == 8 and {q.group for q in qs} == set(test)  # every subject before any repeats
    assert all(q.choices == [" A", " B", " C", " D"] for q in qs)
    assert all(q.context.count("\nAnswer:") == 6 for q in qs)  # 5 shots + the question
    first = next(q for q in qs if q.group == "global_facts")
    assert first.answer == test["global_facts"][0]["answer"]


def test_mmlu_tarball_reads_all_14042(tmp_path):
    from conftest import shared_file
    tarball = shared_file("eval/mmlu.tar.gz")
    test = read_split(tarball, "test")
    assert len(test) == 57 and sum(map(len, test.values())) == 14042
    assert read_split(tarball, "dev")["global_facts"] == read_split(MMLU, "dev")["global_facts"]


def test_mmlu_bad_file_is_named(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "x_test.csv").write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,E\n")
    with pytest.raises(ValueError, match="x_test.csv line 2"):
        read_split(tmp_path, "test")


# --- pass@k ----------------------------------------------------------------------------------------

def test_pass_at_k_closed_form_and_enumeration():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0 and pass_at_k(4, 3, 2) == 1.0
    for n, c, k in [(6, 1, 1), (6, 2, 3), (7, 3, 4)]:
        subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)


def always(model, token: int):
    """Make `model` put (nearly) all probability on `token` whatever the input: the final
    LayerNorm outputs its bias e_0, and only `token`'s embedding row reads e_0."""
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.ln_f.bias[0] = 1.0
        model.wte.weight[token, 0] = 100.0
    return model


class Listed(Task):
    """A task of given examples, all of them its held-out items in order (seed-free), scored by the
    real numeric reward of the task package."""

    name = "listed"

    def __init__(self, examples: list[Example], max_new_tokens: int):
        super().__init__({"held_out": {"items": len(examples), "seed": 0, "max_new_tokens": max_new_tokens}})
        self._examples = examples

    def examples(self, split: str) -> list[Example]:
        return self._examples


def test_task_accuracy_by_hand(tokenizer):
    seven = tokenizer.encode("7")
    assert len(seven) == 1
    model = always(tiny_gpt(tokenizer.n_vocab, seq_len=64), seven[0])
    task = Listed([qa_example("What is 3 + 4?", "", "7777"), qa_example("What is 1 + 1?", "", "2")], max_new_tokens=4)
    result, units = task_accuracy(model, tokenizer, task, max_examples=None, sample_items=None, samples=3, k=2,
                                  temperature=1.0, seed=0)
    # every completion is "7777": right for the first example, wrong for the second
    assert result["pass@1"] == proportion(1, 2) and result["pass@k"]["value"] == 0.5 and result["n"] == 2
    assert units == {"correct": [1, 0], "pass@k": [1.0, 0.0]}
    assert result["examples"][0] == {"answer": "7777", "greedy": "7777"}


def test_generation_stops_at_assistant_end(tokenizer):
    model = always(tiny_gpt(tokenizer.n_vocab, seq_len=64), tokenizer.special_tokens[ASSISTANT_END])
    task = Listed([qa_example("What is 3 + 4?", "", "7")], max_new_tokens=8)
    result, _ = task_accuracy(model, tokenizer, task, max_examples=1, sample_items=None, samples=2, k=1,
                              temperature=1.0, seed=0)
    assert result["examples"][0]["greedy"] == "" and result["pass@1"]["value"] == 0.0


def test_task_accuracy_on_real_tasks_is_seeded(tokenizer):
    model = tiny_gpt(tokenizer.n_vocab, seq_len=128, seed=5)
    for name in ("arithmetic", "gsm8k"):
        runs = [task_accuracy(model, tokenizer, get_task(name, {}), max_examples=2, sample_items=1, samples=3, k=2,
                              temperature=1.0, seed=1) for _ in range(2)]
        assert runs[0] == runs[1] and runs[0][0]["n"] == runs[0][0]["pass@1"]["n"] == 2
        assert runs[0][0]["pass@k"]["n"] == 1 and len(runs[0][1]["pass@k"]) == 1  # sampled: the first item only
        assert 0.0 <= runs[0][0]["pass@k"]["value"] <= 1.0


# --- the stage -------------------------------------------------------------------------------------

def test_run_eval_writes_the_table(tmp_path, tokenizer, stories):
    tokens = write_tokens(tmp_path / "tokens", tokenizer, stories[:4])
    tok_path = tmp_path / "tokenizer.json"
    tokenizer.save(tok_path)
    models = {name: save_final(tiny_gpt(tokenizer.n_vocab, seq_len=64, seed=s), tmp_path / f"{name}.pt")
              for s, name in enumerate(["sft", "pretrain"])}
    cfg = section_config("eval", {"val_tokens": 512, "mmlu": {"path": str(MMLU), "max_questions": 8},
                                  "tasks": {"names": ["arithmetic"], "max_examples": 2, "samples": 2, "k": 2}})
    out = tmp_path / "eval"
    seal(*models.values(), tok_path)
    results = run_eval(models, tokens=tokens, tokenizer_path=tok_path, out=out, size="nano", cfg=cfg,
                       tasks_config={})
    assert list(results) == ["pretrain", "sft"]  # training order
    assert results["pretrain"]["val_loss"] != results["sft"]["val_loss"]
    table = (out / "eval.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| base") or line.startswith("| SFT")]
    assert len(rows) == 4 and fmt(results["sft"]["bpb"]) in rows[1]  # the language-model table, then MMLU
    assert "MMLU 5-shot acc" in table and "| base → SFT |" in table
    saved = json.loads((out / "eval.json").read_text())
    assert saved["models"]["sft"]["mmlu"]["0-shot"]["n"] == 8
    assert saved["models"]["sft"]["tasks"]["arithmetic"]["n"] == 2  # max_examples: the first 2 fixed items
    per_model = json.loads((out / "sft" / "manifest.json").read_text())
    assert per_model["metrics"]["bpb"] == results["sft"]["bpb"]
    assert (out / "eval.png").stat().st_size > 0
    assert verify(out)[1] == []


def test_default_dag_evaluates_and_exports_every_size(tmp_path):
    """The default target runs decontaminate, eval and export_hf (a dry run: Snakemake plans, runs nothing)."""
    import subprocess
    import sys

    from conftest import ROOT
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config",
                             f"results={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for rule in ("decontaminate", "eval_size", "export_hf_model"):
        assert f"rule {rule}:" in result.stdout, rule
    assert f"{tmp_path}/sample/eval/tiny/eval.md" in result.stdout
    assert f"{tmp_path}/sample/export_hf/pretrain/tiny/model.safetensors" in result.stdout
