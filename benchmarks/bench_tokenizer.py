"""Tokenizer benchmarks: training time against HuggingFace `tokenizers`, where our training time
goes, encoding speed, and compression against GPT-2. Writes the `## Tokenizer` section of
docs/benchmarks.md (figures and the command that made them).

    .venv/bin/python -m benchmarks.bench_tokenizer                       # web text: results/sample/data/clean/*.parquet
    .venv/bin/python -m benchmarks.bench_tokenizer --web /tmp/x.parquet  # or any parquet files with id, text

The corpus is the default run's: the web documents plus the bundled TinyStories sample. Without
clean shards (the data stages have not run) the web text is the bundled WET sample straight out of
`ingest`, every language included, and the report says so. Training
runs on its train split and compression is measured on its val split (the pipeline's hash split).
Timings are wall-clock on whatever machine runs this; other work on it adds noise.
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import multiprocessing
import os
import pstats
import time
from pathlib import Path

from benchmarks.common import machine, write_section
from pipeline.tokenizer import BPETokenizer
from pipeline.tokenizer.bpe import PATTERNS, count_words, learn_merges
from pipeline.tokenizer.sources import Source, is_val, read_documents

ROOT = Path(__file__).resolve().parent.parent

GPT2_FILES = (ROOT / "resources/gpt2/encoder.json", ROOT / "resources/gpt2/vocab.bpe")
TINYSTORIES = ROOT / "resources/tinystories/TinyStories-valid.head1.5M.txt.gz"


def load_corpus(web_files: list[str], val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """(train texts, val texts) of the web files and TinyStories, split as the pipeline splits."""
    sources = [Source(Path(p).stem, p) for p in web_files]
    sources.append(Source("tinystories", str(TINYSTORIES), format="text"))
    train, val = [], []
    for source in sources:
        for doc_id, text in read_documents(source):
            (val if is_val(doc_id, val_fraction) else train).append(text)
    return train, val


def ingest_sample() -> str:
    """The bundled WET sample through `ingest` (no language or quality filtering): a stand-in."""
    from pipeline.data.ingest import ingest

    out = ROOT / "results/bench_tokenizer/ingest"
    wet = glob.glob(str(ROOT / "resources/commoncrawl/*.warc.wet.gz"))[0]
    ingest(wet, output=str(out / "web.parquet"), removed=str(out / "removed.parquet"),
           manifest=str(out / "manifest.json"), config={})
    return str(out / "web.parquet")


def mb(texts: list[str]) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


# --- training --------------------------------------------------------------------------------------

def hf_train(texts: list[str], vocab_size: int) -> float:
    """Seconds for `tokenizers`' BPE trainer with GPT-2 byte-level pre-tokenization (regex on),
    the same <|endoftext|> special and the 256-byte initial alphabet: the same task as ours."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    start = time.perf_counter()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return time.perf_counter() - start


def hf_train_in_child(texts: list[str], vocab_size: int, threads: int) -> float:
    """hf_train in a fresh process, so RAYON_NUM_THREADS (read once, at first use) takes effect."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(hf_train, (texts, vocab_size))
    finally:
        del os.environ["RAYON_NUM_THREADS"]


def our_train(texts: list[str], vocab_size: int) -> tuple[float, int, dict[str, float], list[tuple[str, float]]]:
    """Seconds for BPETokenizer.train; then, timing its parts separately: distinct words, seconds per
    phase (the merge loop split between rewriting words and the rest by cProfile's shares), and
    cProfile's top functions of the merge loop by own time."""
    start = time.perf_counter()
    BPETokenizer.train(texts, vocab_size)
    total = time.perf_counter() - start
    t0 = time.perf_counter()
    words = count_words(texts, PATTERNS["gpt2"], ["<|endoftext|>"])
    t1 = time.perf_counter()
    learn_merges(words, 0)  # only the initial pair counts and heap
    t2 = time.perf_counter()
    profile = cProfile.Profile()
    profile.runcall(learn_merges, words, vocab_size - 257)
    stats = pstats.Stats(profile).stats
    own = {(name if path == "~" else f"{Path(path).name}:{line}({name})"): s[2] for (path, line, name), s in stats.items()}
    cumulative = {name: s[3] for (_, _, name), s in stats.items()}
    rewrite_share = cumulative["merge_word"] / cumulative["learn_merges"]
    merge_loop = total - (t1 - t0) - (t2 - t1)
    phases = {"pre-tokenize and count words (regex)": t1 - t0,
              "initial pair counts and heap": t2 - t1,
              "merge loop: rewrite the words holding the pair (`merge_word`)": merge_loop * rewrite_share,
              "merge loop: heap pops, pair-count updates": merge_loop * (1 - rewrite_share)}
    return total, len(words), phases, sorted(own.items(), key=lambda kv: -kv[1])[:6]


# --- encoding --------------------------------------------------------------------------------------

_ENCODER = None


def _init_worker(kind: str, tokenizer_json: str) -> None:
    global _ENCODER
    tokenizer = BPETokenizer.load(tokenizer_json)
    _ENCODER = {"ours": tokenizer.encode, "export": tokenizer.to_tiktoken().encode_ordinary,
                "gpt2-ours": BPETokenizer.from_gpt2_files(*GPT2_FILES).encode,
                "gpt2-tiktoken": BPETokenizer.from_gpt2_files(*GPT2_FILES).to_tiktoken("gpt2").encode_ordinary}[kind]


def _encode_chunk(texts: list[str]) -> int:
    return sum(len(_ENCODER(t)) for t in texts)


def encode_mb_per_s(kind: str, tokenizer_json: str, texts: list[str], processes: int) -> float:
    """MB/s encoding `texts` with `processes` worker processes (started and loaded before timing;
    a fresh pool per measurement, so no encoder cache is warm when the clock starts)."""
    chunks = [texts[i::processes * 8] for i in range(processes * 8)]
    with multiprocessing.get_context("fork").Pool(processes, _init_worker, (kind, tokenizer_json)) as pool:
        pool.map(_encode_chunk, [[]] * processes)  # wait until every worker has loaded its encoder
        start = time.perf_counter()
        pool.map(_encode_chunk, chunks, chunksize=1)
        seconds = time.perf_counter() - start
    return mb(texts) / seconds


# --- compression -----------------------------------------------------------------------------------

def bytes_per_token(encode, texts: list[str]) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / sum(len(encode(t)) for t in texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--web", nargs="*", help="web document parquet files (default: the sample run's clean shards)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--compression-vocab-sizes", type=int, nargs="*", default=[1024, 4096, 16384])
    args = parser.parse_args()
    web = args.web if args.web is not None else sorted(glob.glob(str(ROOT / "results/sample/data/clean/*.parquet")))
    web_note = "given with --web" if args.web else "clean documents"
    if not web:
        web, web_note = [ingest_sample()], "no clean shards yet, so the WET sample's `ingest` output, all languages"
    train, val = load_corpus(web)
    print(f"corpus: {len(train)} train docs ({mb(train):.2f} MB), {len(val)} val docs ({mb(val):.2f} MB)")

    # training
    ours_s, words, phases, top = our_train(train, args.vocab_size)
    hf_s = {threads: hf_train_in_child(train, args.vocab_size, threads) for threads in (1, 2)}
    print(f"train: ours {ours_s:.2f} s, tokenizers {hf_s}")

    # compression, and the tokenizer whose encoding speed is measured
    trained = {v: BPETokenizer.train(train, v) for v in sorted({*args.compression_vocab_sizes, args.vocab_size})}
    gpt2 = BPETokenizer.from_gpt2_files(*GPT2_FILES).to_tiktoken("gpt2")
    gpt2_bpt = bytes_per_token(gpt2.encode_ordinary, val)
    compression = {v: bytes_per_token(trained[v].to_tiktoken().encode_ordinary, val) for v in args.compression_vocab_sizes}
    print(f"bytes/token: gpt2 {gpt2_bpt:.3f}, ours {compression}")

    # encoding
    tokenizer_json = ROOT / "results/bench_tokenizer/tokenizer.json"
    trained[args.vocab_size].save(tokenizer_json)
    encode_text = train + val  # distinct documents: a repeated text would only measure the piece cache
    speeds = {kind: {p: encode_mb_per_s(kind, str(tokenizer_json), encode_text, p) for p in (1, 2)}
              for kind in ("ours", "gpt2-ours", "export", "gpt2-tiktoken")}
    print(f"encode MB/s: {speeds}")

    command = ".venv/bin/python -m benchmarks.bench_tokenizer" + (f" --web {' '.join(args.web)}" if args.web else "")
    section = render(command, web, web_note, train, val, args.vocab_size, ours_s, hf_s, words, phases, top, speeds,
                     gpt2_bpt, compression, encode_text)
    write_section("Tokenizer", section)
    print("wrote the Tokenizer section of docs/benchmarks.md")


def render(command, web, web_note, train, val, vocab_size, ours_s, hf_s, words, phases, top, speeds, gpt2_bpt, compression,
           encode_text) -> str:
    names = {"ours": f"ours, reference `encode` (trained, {vocab_size:,} ids)",
             "gpt2-ours": "ours, reference `encode` (GPT-2 files, 50,257 ids)",
             "export": f"ours exported to tiktoken (`to_tiktoken()`, {vocab_size:,} ids)",
             "gpt2-tiktoken": "tiktoken `gpt2` (50,257 ids)"}
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end (other work on the machine "
        f"adds noise, and 2 processes may gain little).",
        f"Corpus: the default run's text, {', '.join(Path(p).name for p in web)} ({web_note}) + the bundled "
        f"TinyStories sample; "
        f"train split {len(train):,} documents ({mb(train):.2f} MB), val split {len(val):,} documents "
        f"({mb(val):.2f} MB), split by the pipeline's hash of the document id.", "",
        f"### Training ({vocab_size:,} ids, GPT-2 regex, train split)", "",
        "| trainer | seconds | vs ours |", "| --- | ---: | ---: |",
        f"| ours (`BPETokenizer.train`, pure Python) | {ours_s:.2f} | 1.00 |",
    ]
    for threads, seconds in hf_s.items():
        lines.append(f"| HuggingFace `tokenizers` BpeTrainer (Rust), {threads} thread{'s' * (threads > 1)} "
                     f"| {seconds:.2f} | {seconds / ours_s:.2f} |")
    lines += ["", f"Where our time goes ({words:,} distinct words; phases timed apart, the merge loop split by "
              f"cProfile's shares):", "",
              "| phase | seconds |", "| --- | ---: |"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in phases.items()]
    lines += ["", "Merge loop, top functions by own time (under cProfile, which slows it):", "",
              "| function | own seconds |", "| --- | ---: |"]
    lines += [f"| `{name}` | {seconds:.2f} |" for name, seconds in top]
    lines += ["", f"### Encoding (MB/s over all {len(encode_text):,} documents, {mb(encode_text):.2f} MB; "
              f"a fresh process pool per cell)", "",
              "| encoder | 1 process | 2 processes |", "| --- | ---: | ---: |"]
    lines += [f"| {names[kind]} | {s[1]:.2f} | {s[2]:.2f} |" for kind, s in speeds.items()]
    lines += ["", "### Compression (bytes per token on the val split; higher is better)", "",
              "| tokenizer | ids | bytes/token |", "| --- | ---: | ---: |",
              f"| GPT-2 | 50,257 | {gpt2_bpt:.3f} |"]
    lines += [f"| ours, trained on the train split | {v:,} | {bpt:.3f} |" for v, bpt in compression.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
