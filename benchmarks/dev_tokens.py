"""A stand-in tokens folder for developing and benchmarking pretraining before the tokenize stage.

It has the tokenize stage's layout (`manifest.json` with metrics.vocab_size and metrics.eos_id,
`train/*.bin`, `val/*.bin` + `.idx`) and realistic contents: the bundled WET sample's conversion
records that are mostly ASCII (a crude stand-in for langid + quality; ~0.9 MB) plus the bundled
TinyStories text (~1.5 MB), encoded with a 4096-token byte-level BPE trained here with HF
`tokenizers` (a dev dependency). The vocabulary is also written as a `.tiktoken` rank file, named
among the manifest's inputs, so the pretrain stage's samples decode to text.

    python -m benchmarks.dev_tokens results/sample/tokens   (from the repository root)
"""

from __future__ import annotations

import argparse
import base64
import gzip
from pathlib import Path

from warcio.archiveiterator import ArchiveIterator

from pipeline.artifacts import atomic_write_text, write_manifest
from pipeline.token_shards import write_shard

ROOT = Path(__file__).resolve().parent.parent
WET = ROOT / "resources/commoncrawl/CC-MAIN-20201129214615-20201130004615-00404.head.warc.wet.gz"
TINYSTORIES = ROOT / "resources/tinystories/TinyStories-valid.head1.5M.txt.gz"
EOS = "<|endoftext|>"
VAL_EVERY = 20  # every 20th document goes to val


def web_documents(min_ascii: float = 0.95) -> list[str]:
    docs = []
    with open(WET, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type == "conversion":
                text = record.content_stream().read().decode("utf-8", errors="replace").strip()
                if text and sum(c.isascii() for c in text) >= min_ascii * len(text):
                    docs.append(text)
    return docs


def story_documents() -> list[str]:
    text = gzip.open(TINYSTORIES, "rt", encoding="utf-8").read()
    return [d.strip() for d in text.split(EOS) if d.strip()]


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character stand-ins for bytes, inverted (HF ByteLevel uses the same)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = web_documents() + story_documents()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(docs, trainer)
    eos_id = tokenizer.token_to_id(EOS)
    vocab_size = tokenizer.get_vocab_size()

    to_byte = byte_decoder()
    ranks = sorted((i, tok) for tok, i in tokenizer.get_vocab().items() if i != eos_id)
    rank_file = (args.out / "dev-bpe.tiktoken").resolve()
    atomic_write_text(rank_file, "".join(f"{base64.b64encode(bytes(to_byte[c] for c in tok)).decode()} {i}\n"
                                         for i, tok in ranks))

    encoded = [e.ids + [eos_id] for e in tokenizer.encode_batch(docs)]
    splits = {"train": [d for i, d in enumerate(encoded) if i % VAL_EVERY],
              "val": [d for i, d in enumerate(encoded) if i % VAL_EVERY == 0]}
    outputs = {}
    for split, split_docs in splits.items():
        half = len(split_docs) // 2
        for n, part in enumerate([split_docs[:half], split_docs[half:]] if split == "train" else [split_docs]):
            path = args.out / split / f"part-{n:03d}.bin"
            outputs[path] = write_shard(path, part, vocab_size)[1]
    counts = {f"{split}_tokens": sum(map(len, d)) for split, d in splits.items()}
    write_manifest(args.out / "manifest.json", stage="tokenize (dev stand-in)", config={"vocab_size": args.vocab_size},
                   inputs=[rank_file], outputs=outputs, counts=counts,
                   metrics={"vocab_size": vocab_size, "eos_id": eos_id})
    print(f"{args.out}: vocab {vocab_size}, eos {eos_id}, {counts}")


if __name__ == "__main__":
    main()
