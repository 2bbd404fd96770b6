"""tokenizer: train our byte-level BPE on a deterministic sample of clean documents and
`inputs.text` corpora, and measure its compression against GPT-2's on held-out text.

Validation documents (a hash of the document id under `val_fraction`) are never trained on; the
report encodes them with our tokenizer and with GPT-2's (the bundled OpenAI files, loaded into
our own class) and gives bytes per token per source, like nanochat's tok_eval. Outputs:
tokenizer.json (merges, vocab, pattern and the `special_tokens` of the config at the last ids, in
list order, in a readable form), compression.json and
compression.md, and the folder's manifest.json.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_write_json, atomic_write_text, sha256_file, write_manifest
from pipeline.cli import json_arg
from pipeline.config import section_config
from pipeline.records import unit_hash
from pipeline.tokenizer.bpe import BPETokenizer
from pipeline.tokenizer.sources import Source, copies, is_val, read_documents, smallest_until, web_source

log = logging.getLogger(__name__)


def keyed_train_documents(sources: list[Source], config: dict[str, Any], heldout: dict[str, list[str]],
                          counts: dict[str, Counter]) -> Iterator[tuple[float, str]]:
    """Stream (sample key, text) for every weighted copy of every train document, for
    `smallest_until`. On the way, each source's held-out (val) texts, capped at `report_bytes` by a
    seeded hash, go to `heldout[name]`, and its document counts to `counts[name]`."""
    seed, val_fraction = config["seed"], config["val_fraction"]
    for source in sources:
        n = counts[source.name] = Counter()
        val_items = []
        for doc_id, text in read_documents(source, n):
            if is_val(doc_id, val_fraction):
                n["val_documents"] += 1
                val_items.append((unit_hash(f"{seed}#report#{doc_id}"), text))
                continue
            n["train_documents"] += 1
            for k in range(copies(doc_id, source.weight)):
                n["train_copies"] += 1
                yield unit_hash(f"{seed}#{doc_id}#{k}"), text
        heldout[source.name] = smallest_until(val_items, config["report_bytes"])


def bytes_per_token(encoders: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """UTF-8 bytes, and tokens and bytes per token for each encoder, over `texts`."""
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    row: dict[str, Any] = {"documents": len(texts), "bytes": nbytes}
    for name, encoder in encoders.items():
        tokens = sum(len(ids) for ids in encoder.encode_ordinary_batch(texts, num_threads=1))
        row[f"tokens_{name}"] = tokens
        row[f"bytes_per_token_{name}"] = round(nbytes / tokens, 4) if tokens else None
    return row


def compression_report(ours: BPETokenizer, gpt2: BPETokenizer, heldout: dict[str, list[str]]) -> dict[str, Any]:
    # the tiktoken exports: the same ids as our encode (tested), much faster
    encoders = {"ours": ours.to_tiktoken(), "gpt2": gpt2.to_tiktoken("gpt2")}
    by_source = {name: bytes_per_token(encoders, texts) for name, texts in heldout.items()}
    total = bytes_per_token(encoders, [t for texts in heldout.values() for t in texts])
    return {"vocab_size": {"ours": ours.n_vocab, "gpt2": gpt2.n_vocab},
            "text": "val documents (never trained on), at most report_bytes per source",
            "by_source": by_source, "total": total}


def report_markdown(report: dict[str, Any]) -> str:
    v = report["vocab_size"]
    lines = ["# Tokenizer compression on held-out text", "",
             f"Bytes per token (higher is better) of our tokenizer ({v['ours']:,} ids) and GPT-2's "
             f"({v['gpt2']:,} ids) on {report['text']}.", "",
             "| source | documents | bytes | tokens (ours) | tokens (GPT-2) | bytes/token (ours) | bytes/token (GPT-2) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = [*report["by_source"].items(), ("**total**", report["total"])]
    for name, r in rows:
        lines.append(f"| {name} | {r['documents']:,} | {r['bytes']:,} | {r['tokens_ours']:,} | {r['tokens_gpt2']:,} "
                     f"| {r['bytes_per_token_ours']} | {r['bytes_per_token_gpt2']} |")
    return "\n".join(lines) + "\n"


def train_tokenizer(sources: list[Source], gpt2_files: tuple[str, str], *, tokenizer_out: str,
                    compression_out: str, report_out: str, manifest_out: str,
                    config: dict[str, Any]) -> dict[str, Any]:
    heldout: dict[str, list[str]] = {}
    counts: dict[str, Counter] = {}
    sample = smallest_until(keyed_train_documents(sources, config, heldout, counts), config["max_sample_bytes"])
    sample_bytes = sum(len(t.encode("utf-8")) for t in sample)
    log.info("training on %d documents (%d bytes) from %d sources", len(sample), sample_bytes, len(sources))
    start = time.perf_counter()
    tokenizer = BPETokenizer.train(sample, config["vocab_size"], pattern=config["pattern"],
                                   special_tokens=config["special_tokens"])
    log.info("trained %d merges in %.1f s", len(tokenizer.merges), time.perf_counter() - start)
    tokenizer.save(tokenizer_out)

    report = compression_report(tokenizer, BPETokenizer.from_gpt2_files(*gpt2_files), heldout)
    atomic_write_json(compression_out, report)
    atomic_write_text(report_out, report_markdown(report))
    total = report["total"]
    log.info("held-out bytes/token: ours %s, GPT-2 %s", total["bytes_per_token_ours"], total["bytes_per_token_gpt2"])
    return write_manifest(
        manifest_out, stage="tokenizer", config=config,
        inputs=[s.path for s in sources] + list(gpt2_files),
        outputs={tokenizer_out: tokenizer.n_vocab, compression_out: None, report_out: None},
        counts={"sample_documents": len(sample), "sample_bytes": sample_bytes,
                "by_source": {name: dict(sorted(c.items())) for name, c in counts.items()}},
        metrics={"vocab_size": tokenizer.n_vocab, "merges": len(tokenizer.merges), "eos_id": tokenizer.eos_id,
                 "special_tokens": tokenizer.special_tokens,
                 "pattern": config["pattern"], "tokenizer_sha256": sha256_file(tokenizer_out),
                 "bytes_per_token": {"ours": total["bytes_per_token_ours"], "gpt2": total["bytes_per_token_gpt2"]}})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clean", nargs="*", default=[], help="clean web shards (<shard>.parquet)")
    parser.add_argument("--text", type=json_arg, default=[],
                        help="JSON list of inputs.text sources ({name, path, format, separator, field, weight})")
    parser.add_argument("--gpt2", nargs=2, required=True, metavar=("ENCODER_JSON", "VOCAB_BPE"),
                        help="OpenAI's GPT-2 files, the compression report's reference")
    parser.add_argument("--tokenizer", required=True, help="output tokenizer.json")
    parser.add_argument("--compression", required=True, help="output compression.json")
    parser.add_argument("--report", required=True, help="output compression.md")
    parser.add_argument("--manifest", required=True, help="output manifest.json")
    parser.add_argument("--config", type=json_arg, default={}, help="the `tokenizer` config section (JSON)")


def run(args: argparse.Namespace) -> int:
    config = section_config("tokenizer", args.config)
    sources = [web_source(Path(p).name.removesuffix(".parquet"), p) for p in args.clean]
    sources += [Source.from_json(s) for s in args.text]
    if not sources:
        raise ValueError("no sources to train the tokenizer on: give --clean shards and/or --text corpora")
    manifest = train_tokenizer(sources, tuple(args.gpt2), tokenizer_out=args.tokenizer,
                               compression_out=args.compression, report_out=args.report,
                               manifest_out=args.manifest, config=config)
    log.info("wrote %s (vocab %d)", args.tokenizer, manifest["metrics"]["vocab_size"])
    return 0
