"""Peer check of our MMLU scoring against lm-evaluation-harness (not CI: lm-eval is not a dependency).

    .venv/bin/python -m benchmarks.peer_check_lm_eval --model results/sample/pretrain/tiny/final.pt \\
        --tokenizer results/sample/tokenizer/tokenizer.json --shots 0 5 --max-questions 120

1. exports the model with export-hf (into --work/hf);
2. writes a local lm-eval task per MMLU subject (into --work/tasks), holding exactly the test
   questions our eval scores (the same round-robin subset) and the subject's dev split for the
   shots, in the harness's `mmlu` format: the subject's description line, "<question>\\nA. ..\\nD. ..\\nAnswer:",
   choices " A".." D", first-n fewshot sampler;
3. scores them three ways: ours (`pipeline.eval.multiple_choice.evaluate` on final.pt), the
   exported model's logits through transformers with our request split (with the largest
   difference of any choice's summed log-likelihood), and, when `lm_eval` is importable,
   lm-evaluation-harness itself (`python -m lm_eval --model hf ... --include_path <tasks>`); otherwise it
   prints that command, to run where lm-eval is installed.
Prints one line per shot setting with the accuracies; the figures go into docs/eval.md by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from pipeline.eval.mmlu import LETTERS, questions, select, summarize
from pipeline.eval.mmlu_data import read_split
from pipeline.eval.multiple_choice import evaluate
from pipeline.export_hf import export_hf
from pipeline.model.gpt import load_final
from pipeline.tokenizer.bpe import BPETokenizer

GROUP = "wetstone_mmlu"


def write_tasks(mmlu: Path, max_questions: int | None, folder: Path) -> list[str]:
    """One lm-eval task YAML + jsonl per subject with our chosen test items; returns task names."""
    test, dev = read_split(mmlu, "test"), read_split(mmlu, "dev")
    chosen: dict[str, list[dict]] = defaultdict(list)
    for subject, i in select(test, max_questions):
        chosen[subject].append(test[subject][i])
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for subject, rows in sorted(chosen.items()):
        for split, data in (("test", rows), ("dev", dev[subject])):
            (folder / f"{subject}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        name = f"{GROUP}_{subject}"
        task = {
            "task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(folder / f"{subject}_test.jsonl"),
                                              "dev": str(folder / f"{subject}_dev.jsonl")}},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "description": f"The following are multiple choice questions (with answers) about "
                           f"{subject.replace('_', ' ')}.\n\n",
            "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                           "D. {{choices[3]}}\nAnswer:",
            "doc_to_choice": list(LETTERS), "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
        names.append(name)
    (folder / f"{GROUP}.yaml").write_text(yaml.safe_dump(
        {"group": GROUP, "task": names, "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}))
    return names


class HFScorer(torch.nn.Module):
    """A transformers causal LM behind our scoring interface (`config.seq_len`, `config.vocab_size`, logits)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.config = argparse.Namespace(seq_len=hf.config.n_positions, vocab_size=hf.config.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(x).logits


def arguments(doc: str, max_questions: int, work: str) -> argparse.ArgumentParser:
    """The options of both peer checks: the model, its tokenizer, and the MMLU items to score."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--mmlu", type=Path, default=Path("resources/mmlu"))
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 5])
    parser.add_argument("--max-questions", type=int, default=max_questions)
    parser.add_argument("--work", type=Path, default=Path(work))
    return parser


def main() -> None:
    args = arguments(__doc__, 120, "results/peer_check").parse_args()

    from transformers import AutoModelForCausalLM

    hf_dir = args.work / "hf"
    export_hf(args.model, args.tokenizer, hf_dir)
    model, _ = load_final(args.model)
    tokenizer = BPETokenizer.load(args.tokenizer)
    scorer = HFScorer(AutoModelForCausalLM.from_pretrained(hf_dir).eval())
    write_tasks(args.mmlu, args.max_questions, args.work / "tasks")
    for shots in args.shots:
        items = questions(args.mmlu, shots, args.max_questions)
        ours_items, theirs_items = evaluate(model, tokenizer, items), evaluate(scorer, tokenizer, items)
        ours, theirs = summarize(ours_items), summarize(theirs_items)
        gap = max(abs(a - b) for o, t in zip(ours_items, theirs_items) for a, b in zip(o["sums"], t["sums"]))
        command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32",
                   "--tasks", GROUP, "--include_path", str(args.work / "tasks"), "--num_fewshot", str(shots),
                   "--batch_size", "16", "--device", "cpu", "--output_path", str(args.work / f"lm_eval_{shots}shot")]
        line = (f"{shots}-shot: ours acc {ours['acc']['value']:.4f} ({ours['n']} questions); transformers logits acc "
                f"{theirs['acc']['value']:.4f} (largest log-likelihood difference {gap:.2e})")
        if importlib.util.find_spec("lm_eval"):  # this interpreter's lm-eval, not one on PATH
            subprocess.run(command, check=True)
            found = sorted((args.work / f"lm_eval_{shots}shot").rglob("results_*.json"))[-1]
            harness = json.loads(found.read_text())["results"][GROUP]["acc,none"]
            line += f"; lm-evaluation-harness acc {harness:.4f}"
        else:
            line += f"; lm-eval not installed, run: {' '.join(command)}"
        print(line, file=sys.stdout)


if __name__ == "__main__":
    main()
