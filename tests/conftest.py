"""Shared fixtures: paths to bundled data and to ../shared (tests needing it skip without it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores,
# and so do the processes its tests start (they inherit OMP_NUM_THREADS): torch's threads spin while
# they wait, so two workers of two threads each on two cores run far slower than one of each.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

ROOT = Path(__file__).resolve().parent.parent
RESOURCES = ROOT / "resources"
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE_WET = RESOURCES / "commoncrawl" / "CC-MAIN-20201129214615-20201130004615-00404.head.warc.wet.gz"

WARC_SAMPLES = RESOURCES / "commoncrawl" / "warc"
SAMPLE_WARC = WARC_SAMPLES / "CC-MAIN-20200808165417-20200808195417-00395.head.warc.gz"


@pytest.fixture
def sample_wet() -> Path:
    return SAMPLE_WET


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    return path


def write_wet(path: Path, bodies: list[bytes], gzip: bool = True, with_warcinfo: bool = True) -> Path:
    """Write a real WET file with warcio: one `conversion` record per body (digests computed by
    warcio), each gzip-compressed as its own member when `gzip`, as Common Crawl does."""
    from io import BytesIO

    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=gzip)
        if with_warcinfo:
            writer.write_record(writer.create_warcinfo_record(path.name, {"software": "wetstone-tests"}))
        for i, body in enumerate(bodies):
            record = writer.create_warc_record(
                f"http://example.com/{i}", "conversion", payload=BytesIO(body),
                warc_headers_dict={"Content-Type": "text/plain", "WARC-Record-ID": f"<urn:uuid:doc-{i:04d}>"})
            writer.write_record(record)
    return path


def write_warc(path: Path, responses: list[tuple], gzip: bool = True) -> Path:
    """Write a real WARC file with warcio, as a crawler does: a warcinfo record, then a request
    and a response record per (url, HTTP status line, HTTP headers, payload bytes)."""
    from io import BytesIO

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=gzip)
        writer.write_record(writer.create_warcinfo_record(path.name, {"software": "wetstone-tests"}))
        for i, (url, status, headers, payload) in enumerate(responses):
            request = StatusAndHeaders("GET / HTTP/1.1", [("Host", "example.com")], is_http_request=True)
            writer.write_record(writer.create_warc_record(url, "request", payload=BytesIO(b""), http_headers=request))
            http = StatusAndHeaders(status, list(headers), protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(
                url, "response", payload=BytesIO(payload), http_headers=http,
                warc_headers_dict={"WARC-Record-ID": f"<urn:uuid:page-{i:04d}>"}))
    return path


@pytest.fixture(scope="session")
def stories() -> list[str]:
    """Real English documents: the first stories of the bundled TinyStories sample."""
    import gzip

    text = gzip.decompress((RESOURCES / "tinystories" / "TinyStories-valid.head1.5M.txt.gz").read_bytes()).decode()
    parts = [s.strip() for s in text.split("<|endoftext|>")[1:]]  # [0] is a truncated opening
    return [s for s in parts if len(s.split()) > 120][:60]


def write_stage_docs(path: Path, rows: list[dict], schema: dict) -> Path:
    """Documents as an upstream stage leaves them: the parquet and its job's manifest beside it
    (stages read only files a manifest names, checked against its sha256)."""
    from pipeline.artifacts import write_manifest
    from pipeline.data.docs import write_docs

    n = write_docs(path, rows, schema)
    write_manifest(path.with_name(f"{path.stem}.manifest.json"), stage="upstream", config={}, inputs=[],
                   outputs={path: n})
    return path


def make_docs(texts: list[str], source: str = "s", **extra) -> list[dict]:
    return [{"id": f"<urn:uuid:{source}-{i:04d}>", "url": f"http://{source}.example/{i}", "date": "2020-11-30",
             "source": source, "text": t, **extra} for i, t in enumerate(texts)]


def seal(*paths: Path) -> tuple[Path, ...]:
    """`paths` (in one folder) named by a manifest.json beside them, as the stage that wrote them
    leaves them: stages check a model or a tokenizer against it before loading it."""
    from pipeline.artifacts import write_manifest

    write_manifest(paths[0].parent / "manifest.json", stage="upstream", config={}, inputs=[],
                   outputs={p: None for p in paths})
    return paths


def save_chat_model(folder: Path, stories: list[str], seq_len: int, stage: str) -> tuple[Path, Path]:
    """(final.pt, tokenizer.json): a seeded nano GPT saved as the training engine exports it, beside
    a small tokenizer with the chat special tokens, both named by a `stage` manifest."""
    import torch

    from pipeline.artifacts import write_manifest
    from pipeline.model.gpt import GPT, GPTConfig
    from pipeline.tokenizer.bpe import CHAT_SPECIAL_TOKENS, BPETokenizer

    tokenizer = BPETokenizer.train(stories, 400, special_tokens=CHAT_SPECIAL_TOKENS)
    tokenizer.save(folder / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size("nano", vocab_size=tokenizer.n_vocab, seq_len=seq_len))
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict(), "step": 100,
                "vocab_size": tokenizer.n_vocab, "eos_id": tokenizer.eos_id}, folder / "final.pt")
    write_manifest(folder / "manifest.json", stage=stage, config={}, inputs=[],
                   outputs={folder / "final.pt": None, folder / "tokenizer.json": None})
    return folder / "final.pt", folder / "tokenizer.json"


def save_chat_tokens(folder: Path, tokenizer_path: Path, train: list[str], val: list[str]) -> Path:
    """tokens/ as the tokens stage leaves it for the tokenizer in `tokenizer_path`: train/ and val/
    shards of the documents (each ending with the end-of-text id) and the manifest naming them."""
    from pipeline.artifacts import sha256_file, write_manifest
    from pipeline.token_shards import write_shard
    from pipeline.tokenizer.bpe import BPETokenizer

    tokenizer = BPETokenizer.load(tokenizer_path)
    for split, docs in (("train", train), ("val", val)):
        write_shard(folder / split / "text.bin", [tokenizer.encode(d) + [tokenizer.eos_id] for d in docs],
                    tokenizer.n_vocab)
    write_manifest(folder / "manifest.json", stage="tokens", config={}, inputs=[],
                   outputs={p: None for p in sorted(folder.glob("*/text.*"))},
                   metrics={"vocab_size": tokenizer.n_vocab, "eos_id": tokenizer.eos_id,
                            "tokenizer_sha256": sha256_file(tokenizer_path)})
    return folder


@pytest.fixture
def one_torch_thread(monkeypatch):
    """W&B off; one torch thread (on 2 shared cores, two threads per process spin against each other)."""
    import torch

    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
