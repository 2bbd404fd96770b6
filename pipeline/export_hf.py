"""export_hf: one of our final.pt models as a Hugging Face folder that `transformers` loads.

    python -m pipeline export-hf --model results/sample/pretrain/tiny/final.pt \\
        --tokenizer results/sample/tokenizer/tokenizer.json --out results/sample/export_hf/pretrain/tiny

writes into <out>: model.safetensors and config.json (`GPT2LMHeadModel` for the GPT-2 shape,
`LlamaForCausalLM` for a model pretrained with `architecture: llama`), generation_config.json
(`generate` stops at <|assistant_end|>, the end of a chat reply, and at <|endoftext|>), tokenizer.json,
tokenizer_config.json (the chat template when the tokenizer has the chat tokens; model_max_length
the context length, so `truncation=True` cuts to what the model can read) and
special_tokens_map.json, and manifest.json. `AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` load it, and so do lm-evaluation-harness (`--model hf
--model_args pretrained=<out>`) and vLLM. The model and tokenizer are checked against their
stages' manifests first. The conversion, both ways, is `pipeline/hf.py`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from pipeline.artifacts import check_inputs, write_manifest
from pipeline.hf import hf_architecture, hf_model, hf_tokenizer
from pipeline.model.gpt import load_final
from pipeline.tokenizer.bpe import ASSISTANT_END, ENDOFTEXT, BPETokenizer

log = logging.getLogger(__name__)


def export_hf(model_path: str | os.PathLike, tokenizer_path: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the HF folder at `out` (built beside it, then renamed into place) with a manifest."""
    out = Path(out)
    check_inputs(model_path, tokenizer_path)  # against the manifests of the stages that wrote them
    model, checkpoint = load_final(model_path)
    tokenizer = BPETokenizer.load(tokenizer_path)
    vocab_size = model.config.vocab_size
    if tokenizer.n_vocab != vocab_size:
        raise ValueError(f"{tokenizer_path}: {tokenizer.n_vocab} ids, but {model_path} was trained on a "
                         f"vocabulary of {vocab_size}; export the model with the tokenizer it was trained with")
    stop_ids = [tokenizer.special_tokens[t] for t in (ASSISTANT_END, ENDOFTEXT) if t in tokenizer.special_tokens]
    hf = hf_model(model, vocab_size, tokenizer.special_tokens.get(ENDOFTEXT), stop_ids)
    hf_tok = hf_tokenizer(tokenizer, model_max_length=model.config.seq_len)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != "manifest.json")
    architecture = hf_architecture(model.config)
    metrics = {"architecture": architecture, "vocab_size": vocab_size,
               "padded_rows_dropped": model.config.padded_vocab_size - vocab_size,
               "params": sum(p.numel() for p in hf.parameters()), "step": checkpoint.get("step"),
               "chat_template": hf_tok.chat_template is not None}
    write_manifest(out / "manifest.json", stage="export_hf", config={"model_config": model.config.to_dict()},
                   inputs=[model_path, tokenizer_path], outputs={p: None for p in files}, metrics=metrics)
    log.info("exported %s as %s (%d params, vocab %d) to %s", model_path, architecture, metrics["params"],
             vocab_size, out)
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="a final.pt (pretrain, sft or grpo)")
    parser.add_argument("--tokenizer", required=True, type=Path, help="the tokenizer.json it was trained with")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write (replaced whole)")


def run(args: argparse.Namespace) -> int:
    export_hf(args.model, args.tokenizer, args.out)
    return 0
