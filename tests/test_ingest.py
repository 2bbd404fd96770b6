"""ingest: every bad record is dropped with its reason; a damaged stream keeps what came before."""

from __future__ import annotations

import gzip

import polars as pl
import pytest

from conftest import write_wet
from pipeline.data import warc
from pipeline.data.ingest import DamagedInput, ingest
from pipeline.data.warc import NotWet

GOOD = "A perfectly ordinary paragraph of English text about gardens.\n".encode() * 3


def run_ingest(tmp_path, wet, **config):
    out = tmp_path / "out"
    manifest = ingest(str(wet), output=str(out / "docs.parquet"), removed=str(out / "removed.parquet"),
                      manifest=str(out / "m.json"), config=config)
    kept = pl.read_parquet(out / "docs.parquet")
    removed = pl.read_parquet(out / "removed.parquet")
    return manifest["counts"], kept, removed


def test_sample_wet_all_records_accounted_for(tmp_path, sample_wet):
    counts, kept, removed = run_ingest(tmp_path, sample_wet)
    assert counts["docs_in"] == 318  # the PROVENANCE count of conversion records
    assert counts["docs_in"] == counts["docs_out"] + sum(counts["dropped"].values())
    assert kept.height == counts["docs_out"] and removed.height == sum(counts["dropped"].values())
    assert kept["id"].str.starts_with("<urn:uuid:").all()
    assert not kept["text"].str.starts_with("\ufeff").any()  # BOMs stripped


@pytest.mark.parametrize("body, reason", [
    (b"\xff\xfe not utf-8 \xc3\x28", "invalid_utf8"),
    (b"  \n\t \n", "empty"),
    (b"x" * 5000, "oversize"),
])
def test_bad_record_dropped_with_reason(tmp_path, body, reason):
    wet = write_wet(tmp_path / "t.warc.wet.gz", [GOOD, body, GOOD])
    counts, kept, removed = run_ingest(tmp_path, wet, max_doc_bytes=4096)
    assert counts["dropped"] == {reason: 1}
    assert kept["id"].to_list() == ["<urn:uuid:doc-0000>", "<urn:uuid:doc-0002>"]
    assert removed.row(0, named=True)["reason"] == reason and removed["id"][0] == "<urn:uuid:doc-0001>"


def test_truncated_record_is_dropped_not_kept_half(tmp_path):
    wet = write_wet(tmp_path / "t.warc.wet", [GOOD, GOOD * 10], gzip=False)
    data = wet.read_bytes()
    wet.write_bytes(data[: len(data) - 200])  # cut inside the last record's body
    counts, kept, removed = run_ingest(tmp_path, wet)
    assert counts["dropped"] == {"truncated": 1}
    assert kept["text"].to_list() == [GOOD.decode()]


def test_digest_mismatch_is_dropped(tmp_path):
    wet = write_wet(tmp_path / "t.warc.wet", [GOOD, GOOD], gzip=False)
    data = wet.read_bytes()
    at = data.rindex(b"gardens")
    wet.write_bytes(data[:at] + b"Gardens" + data[at + 7:])  # same length, one byte changed
    counts, kept, _ = run_ingest(tmp_path, wet)
    assert counts["dropped"] == {"digest_mismatch": 1} and kept.height == 1
    counts, kept, _ = run_ingest(tmp_path, wet, check_digests=False)
    assert counts["dropped"] == {} and kept.height == 2


def damaged_gzip(tmp_path):
    """Three records, one gzip member each; the third member's deflate data is overwritten."""
    wet = write_wet(tmp_path / "t.warc.wet.gz", [GOOD, GOOD, GOOD], with_warcinfo=False)
    data = bytearray(wet.read_bytes())
    members = [i for i in range(len(data) - 2) if data[i:i + 3] == b"\x1f\x8b\x08"]
    assert len(members) == 3
    data[members[2] + 20: members[2] + 60] = b"\x00" * 40
    wet.write_bytes(bytes(data))
    with pytest.raises(Exception):
        gzip.decompress(bytes(data))
    return wet


def test_damaged_gzip_keeps_records_before_and_names_file(tmp_path):
    wet = damaged_gzip(tmp_path)
    counts, kept, _ = run_ingest(tmp_path, wet)
    assert kept.height == 2
    assert len(counts["errors"]) == 1 and counts["errors"][0]["file"] == str(wet)
    assert counts["docs_in"] == counts["docs_out"] + sum(counts["dropped"].values())


def test_damaged_gzip_fails_when_config_says_so(tmp_path):
    wet = damaged_gzip(tmp_path)
    with pytest.raises(DamagedInput, match="t.warc.wet.gz"):
        run_ingest(tmp_path, wet, fail_on_damaged=True)


def random_text(n_bytes: int) -> bytes:
    """Text that gzip cannot shrink much, so a cut near the end of a member lands in the body."""
    import base64
    import random
    return base64.b64encode(random.Random(0).randbytes(n_bytes * 3 // 4))


@pytest.mark.parametrize("cut, reasons", [
    (100, ({"truncated": 1}, {})),   # inside the body: read short, or the stream breaks
    (None, ({"bad_header": 1}, {})),  # inside the header block of a small member
])
def test_gzip_cut_mid_record_keeps_whole_records_only(tmp_path, cut, reasons):
    last = random_text(5000) if cut else GOOD
    wet = write_wet(tmp_path / "t.warc.wet.gz", [GOOD, last])
    data = wet.read_bytes()
    member = data.rindex(b"\x1f\x8b\x08")
    cut_at = len(data) - cut if cut else member + (len(data) - member) // 2
    wet.write_bytes(data[:cut_at])  # a download cut off inside the last gzip member
    counts, kept, _ = run_ingest(tmp_path, wet)
    assert kept["text"].to_list() == [GOOD.decode()]
    assert counts["dropped"] in reasons
    assert counts["dropped"] or len(counts["errors"]) == 1  # never silently lost


# --- input that is not WET ---------------------------------------------------------------------------

def write_responses(path):
    """A WARC of `response` records (what a crawler writes; WET files hold `conversion` records)."""
    from io import BytesIO

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record("http://example.com/", "response",
                                                      payload=BytesIO(b"<html>hi</html>"), http_headers=http))
    return path


@pytest.mark.parametrize("content, message", [
    (b"", "it is empty"),
    (b"<html><body>A page saved under the wrong name</body></html>\n", "begins b'<html>"),
    (gzip.compress(b"just some text\n" * 10, mtime=0), "begins b'just some text"),
    (None, r"found response: 1\); a WARC of `response` records: list it under inputs.warc, not inputs.wet"),
])
def test_input_that_is_not_wet_fails_naming_the_file(tmp_path, content, message):
    wet = tmp_path / "x.warc.wet.gz"
    if content is None:
        write_responses(wet)
    else:
        wet.write_bytes(content)
    with pytest.raises(NotWet, match=message) as raised:
        run_ingest(tmp_path, wet)
    assert str(wet) in str(raised.value)
    assert not (tmp_path / "out" / "docs.parquet").exists()


def test_a_wet_without_conversion_records_names_the_types_it_has(tmp_path):
    wet = write_wet(tmp_path / "x.warc.wet.gz", [])  # a warcinfo record only
    with pytest.raises(NotWet, match=r"no `conversion` record \(found warcinfo: 1\)"):
        run_ingest(tmp_path, wet)


def test_a_wet_gzipped_as_one_member_is_read(tmp_path, sample_wet):
    whole = tmp_path / "whole.warc.wet.gz"
    whole.write_bytes(gzip.compress(gzip.decompress(sample_wet.read_bytes())))
    counts, kept, _ = run_ingest(tmp_path, whole)
    reference, reference_kept, _ = run_ingest(tmp_path / "ref", sample_wet)
    assert counts["errors"] == [] and counts["docs_in"] == 318
    assert kept["text"].to_list() == reference_kept["text"].to_list()


# --- a wrong Content-Length: resynchronise on the next record header ---------------------------------

def without_digests(wet):
    """The file with its digest header lines removed, so only the framing can catch a bad length."""
    lines = wet.read_bytes().split(b"\r\n")
    wet.write_bytes(b"\r\n".join(line for line in lines if not line.startswith(b"WARC-Block-Digest")))
    return wet


def set_length(wet, record: int, delta: int):
    """Change the Content-Length of the record-th conversion record by delta bytes."""
    data = wet.read_bytes()
    at = data.index(f"<urn:uuid:doc-{record:04d}>".encode())
    at = data.index(b"Content-Length: ", at) + len(b"Content-Length: ")
    end = data.index(b"\r\n", at)
    wet.write_bytes(data[:at] + str(int(data[at:end]) + delta).encode() + data[end:])


@pytest.mark.parametrize("delta", [300, 40, -25])
def test_a_wrong_content_length_loses_no_other_record_and_keeps_no_header(tmp_path, delta):
    bodies = [GOOD, b"Second page of text, quite ordinary.\n" * 4, GOOD]
    wet = without_digests(write_wet(tmp_path / "t.warc.wet", bodies, gzip=False))
    set_length(wet, 1, delta)  # too large (into the next record's header) or too small
    counts, kept, removed = run_ingest(tmp_path, wet)
    assert kept["id"].to_list() == ["<urn:uuid:doc-0000>", "<urn:uuid:doc-0002>"]
    assert kept["text"].to_list() == [GOOD.decode()] * 2
    assert counts["dropped"] == {"length_mismatch": 1}
    assert not removed["text"].str.contains("WARC/1.0").any()


def test_a_content_length_swallowing_a_whole_record_keeps_both_out(tmp_path):
    wet = without_digests(write_wet(tmp_path / "t.warc.wet", [GOOD, GOOD, GOOD], gzip=False))
    data = wet.read_bytes()
    second, third = (data.index(f"<urn:uuid:doc-{i:04d}>".encode()) for i in (1, 2))
    swallowed = data.rindex(b"WARC/1.0", 0, third) - data.rindex(b"WARC/1.0", 0, second)
    set_length(wet, 0, swallowed)  # record 0 now claims record 1 as its body, ending exactly on record 2
    counts, kept, _ = run_ingest(tmp_path, wet)
    assert kept["id"].to_list() == ["<urn:uuid:doc-0001>", "<urn:uuid:doc-0002>"]
    assert not kept["text"].str.contains("WARC/1.0").any()
    assert counts["dropped"] == {"length_mismatch": 1}


@pytest.mark.parametrize("chunk", [7, 997, 65536])
def test_streamed_in_small_chunks_gives_the_same_bytes(tmp_path, sample_wet, monkeypatch, chunk):
    """Records cut across reads (headers too) come out exactly as from one big read: the sample,
    and a wrong Content-Length that only a following header shows."""
    bodies = [GOOD, b"Second page of text, quite ordinary.\n" * 4, GOOD]
    short = without_digests(write_wet(tmp_path / "short.warc.wet", bodies, gzip=False))
    set_length(short, 1, 40)
    for name, wet in [("sample", sample_wet), ("short", short)]:
        if chunk == 7 and name == "sample":
            continue  # a byte-sized read of 2 MB is only slow
        run_ingest(tmp_path / f"{name}-whole", wet)
        monkeypatch.setattr(warc, "READ_CHUNK", chunk)
        counts, _, _ = run_ingest(tmp_path / f"{name}-{chunk}", wet)
        monkeypatch.undo()
        assert name == "sample" or counts["dropped"] == {"length_mismatch": 1}  # not `truncated`: more follows
        for part in ("docs.parquet", "removed.parquet"):
            assert (tmp_path / f"{name}-whole/out" / part).read_bytes() == (tmp_path / f"{name}-{chunk}/out" / part).read_bytes()
