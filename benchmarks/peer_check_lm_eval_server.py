"""Peer check of the server: lm-evaluation-harness's `local-completions` model against `serve`,
scored against our in-process eval on the same items (not CI: lm-eval is not a dependency).

lm-eval lives in its own venv (its pins are not the project's; torch pinned to the CPU build
this machine has, so nothing pulls a CUDA torch):

    python3.11 -m venv /work/peers/lm_eval
    /work/peers/lm_eval/bin/pip install torch==2.13.0 "lm-eval[api]==0.4.13" transformers

Then, offline:

    .venv/bin/python -m benchmarks.peer_check_lm_eval_server --model results/sample/grpo/tiny/final.pt \\
        --tokenizer results/sample/tokenizer/tokenizer.json --shots 0 5 --max-questions 400

1. exports the model with export-hf (into --work/hf) and writes the local MMLU tasks of
   benchmarks/peer_check_lm_eval.py (a task YAML per subject over local jsonl files holding
   exactly the items our eval scores);
2. starts `python -m pipeline serve --model <work/hf>` with an API key (WETSTONE_API_KEY; lm-eval
   sends it as OPENAI_API_KEY);
3. per shot setting, runs `lm_eval --model local-completions` against it: the exported folder's
   tokenizer through transformers (`tokenizer_backend=huggingface`), loglikelihood requests as
   lm-eval sends them (`prompt: [[ids], ...]` in batches of --batch-size, `echo: true`,
   `logprobs: 1`, `max_tokens: 1`), with --log_samples;
4. scores the same items in process (`pipeline.eval.multiple_choice.evaluate` on final.pt) and
   prints both accuracies, how many questions the two picked differently, and the largest
   difference of any choice's summed log-likelihood. The figures go into docs/eval.md by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from benchmarks.common import start_serve
from benchmarks.peer_check_lm_eval import GROUP, arguments, write_tasks
from pipeline.eval.mmlu import questions, summarize
from pipeline.eval.multiple_choice import encode_pair, evaluate
from pipeline.export_hf import export_hf
from pipeline.model.gpt import load_final
from pipeline.tokenizer.bpe import BPETokenizer

API_KEY = "peer-check"


def harness_sums(output: Path) -> dict[tuple[str, int], list[float]]:
    """(subject, doc_id) -> each choice's summed log-likelihood, from lm-eval's logged samples."""
    sums = {}
    for path in output.rglob("samples_*.jsonl"):
        subject = path.name.removeprefix(f"samples_{GROUP}_").rsplit("_", 1)[0]
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            sums[subject, sample["doc_id"]] = [float(ll) for ll, _ in sample["filtered_resps"]]  # logged as text
    return sums


def main() -> None:
    parser = arguments(__doc__, 400, "results/peer_check_server")
    parser.add_argument("--batch-size", type=int, default=8, help="loglikelihood requests lm-eval sends in one request")
    parser.add_argument("--lm-eval-python", type=Path, default=Path("/work/peers/lm_eval/bin/python"))
    args = parser.parse_args()

    hf_dir, name = args.work / "hf", "wetstone"
    args.work.mkdir(parents=True, exist_ok=True)
    export_hf(args.model, args.tokenizer, hf_dir)
    model, _ = load_final(args.model)
    tokenizer = BPETokenizer.load(args.tokenizer)
    write_tasks(args.mmlu, args.max_questions, args.work / "tasks")
    proc, url = start_serve(["--model", str(hf_dir), "--served-model-name", name], args.work / "serve.log",
                            env={**os.environ, "WETSTONE_API_KEY": API_KEY})
    try:
        for shots in args.shots:
            items = questions(args.mmlu, shots, args.max_questions)
            ours_items = evaluate(model, tokenizer, items)
            ours = summarize(ours_items)
            output = args.work / f"lm_eval_{shots}shot"
            command = [str(args.lm_eval_python), "-m", "lm_eval", "--model", "local-completions", "--model_args",
                       f"model={name},base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={hf_dir},"
                       f"max_length={model.config.seq_len},max_retries=1", "--batch_size", str(args.batch_size),
                       "--tasks", GROUP, "--include_path", str(args.work / "tasks"), "--num_fewshot", str(shots),
                       "--output_path", str(output), "--log_samples"]
            env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
            started = time.perf_counter()
            subprocess.run(command, check=True, env=env)
            seconds = time.perf_counter() - started
            found = sorted(output.rglob("results_*.json"))[-1]
            harness = json.loads(found.read_text())["results"][GROUP]["acc,none"]
            theirs = harness_sums(output)
            # lm-eval keeps the last seq_len - 1 tokens (one is left for the token it asks for), our eval
            # the last seq_len + 1: they see the same tokens only where nothing is cut
            fits = [all(sum(map(len, encode_pair(tokenizer, q.context, c))) <= model.config.seq_len - 1
                        for c in q.choices) for q in items]
            at: dict[str, int] = {}
            differ, gap = {True: 0, False: 0}, {True: 0.0, False: 0.0}  # by whether the question fits
            for q, o, fit in zip(items, ours_items, fits):
                j = at[q.group] = at.get(q.group, -1) + 1
                sums = theirs[q.group, j]
                differ[fit] += max(range(4), key=sums.__getitem__) != max(range(4), key=o["sums"].__getitem__)
                gap[fit] = max(gap[fit], *(abs(a - b) for a, b in zip(sums, o["sums"])))
            n_fit = sum(fits)
            print(f"{shots}-shot, {ours['n']} questions: ours (in process) acc {ours['acc']['value']:.4f}; lm-eval "
                  f"local-completions against serve acc {harness:.4f} ({seconds:.0f} s). Questions that fit the "
                  f"context ({n_fit}): picked differently {differ[True]}, largest log-likelihood difference "
                  f"{gap[True]:.2e}; cut to fit ({ours['n'] - n_fit}): picked differently {differ[False]}, largest "
                  f"difference {gap[False]:.2e}\n  command: {' '.join(command)}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
