"""BPETokenizer: GPT-2 exactness against tiktoken, round trips, save/load, the tiktoken export,
hand-checkable training, determinism, and clear errors on bad input."""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from warcio.archiveiterator import ArchiveIterator

from conftest import RESOURCES, SAMPLE_WET, shared_file
from pipeline.tokenizer import BPETokenizer
from pipeline.tokenizer.bpe import PATTERNS, count_words, utf8_safe

GPT2_DIR = RESOURCES / "gpt2"
TINYSTORIES = RESOURCES / "tinystories" / "TinyStories-valid.head1.5M.txt.gz"

VARIED_TEXTS = [
    "hello world",
    "Hello, World! HELLO world... hello-world",
    "I'm sure you've heard they'll say she'd won; it's OK. DON'T SHOUT 'TIL I'M DONE",
    "def f(x):\n    return {'a': x ** 2, \"b\": [1, 2, 3]}  # comment\n\n\tif x:\n\t\tpass\r\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }  // C++ && || != ==>",
    "中文分词测试，这是一个句子。日本語のテキストとカタカナ。한국어 문장입니다.",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी, ไทย",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 keycap 1️⃣",
    "digits 1234567890 3.14159 -42 1e-10 0x1F 1,000,000 ١٢٣ ४५६",
    "whitespace   runs\t\t\tand\n\n\n\nnewlines   \n   \u00a0\u2003\u3000 ",
    "   leading and trailing   ",
    "\n",
    "",
    "a" * 300,
    " " * 5000 + "x",
    "the <|endoftext|> marker is ordinary text here",
    "combining e\u0301 and a\u0308, zero\u200bwidth, soft\u00adhyphen, BOM\ufeff",
    "ſ long s, Kelvin \u212a, Turkish İı, ß ẞ ﬁ ligature",
    "tab\x00nul\x07bell\x1bescape\x7fdel",
    "https://example.com/path?q=a+b&x=%20#frag user@mail.org",
]


def wet_texts(limit: int) -> list[str]:
    """Conversion-record bodies of the bundled WET sample (web text in many languages)."""
    texts = []
    with open(SAMPLE_WET, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type == "conversion":
                texts.append(record.content_stream().read().decode("utf-8", errors="replace"))
                if len(texts) == limit:
                    break
    return texts


@pytest.fixture(scope="module")
def gpt2() -> BPETokenizer:
    return BPETokenizer.from_gpt2_files(GPT2_DIR / "encoder.json", GPT2_DIR / "vocab.bpe")


@pytest.fixture(scope="module")
def tiktoken_from_files() -> tiktoken.Encoding:
    """tiktoken's own GPT-2 loader on the bundled files (no ../shared, no network): the yardstick
    when the tiktoken cache is absent. An empty TIKTOKEN_CACHE_DIR turns its cache off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        ranks = data_gym_to_mergeable_bpe_ranks(str(GPT2_DIR / "vocab.bpe"), str(GPT2_DIR / "encoder.json"))
    return tiktoken.Encoding("gpt2-files", pat_str=PATTERNS["gpt2"], mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


@pytest.fixture(scope="module")
def trained() -> BPETokenizer:
    """A small tokenizer trained on TinyStories plus the varied texts, so it holds merges for
    letters, digits, CJK bytes and whitespace alike."""
    stories = gzip.open(TINYSTORIES, "rt", encoding="utf-8").read(200_000).split("<|endoftext|>")
    return BPETokenizer.train(stories + VARIED_TEXTS * 3, vocab_size=600)


# --- GPT-2 exactness -------------------------------------------------------------------------------

def test_gpt2_matches_tiktoken_gpt2_from_cache(gpt2, monkeypatch):
    cache = shared_file("gpt2/tiktoken_cache")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    reference = tiktoken.get_encoding("gpt2")
    texts = VARIED_TEXTS + wet_texts(80)
    for text in texts:
        assert gpt2.encode(text) == reference.encode_ordinary(text), text[:80]
    assert gpt2.n_vocab == reference.n_vocab and gpt2.eos_id == reference.eot_token


def test_gpt2_matches_tiktoken_built_from_bundled_files(gpt2, tiktoken_from_files):
    for text in VARIED_TEXTS + wet_texts(80):
        assert gpt2.encode(text) == tiktoken_from_files.encode_ordinary(text), text[:80]


def test_gpt2_matches_tiktoken_on_every_code_point(gpt2, tiktoken_from_files):
    """Each code point after a space and doubled: our regex (the `regex` package) must class every
    one (\\p{L}, \\p{N}, \\s, other) exactly as tiktoken's Rust regex does, which a newer
    Unicode table on either side would break. Planes 0-3 and 14 hold every assigned character;
    planes 4-13 are unassigned and 15-16 private use, so they are left out to save time."""
    points = [c for c in [*range(0x40000), *range(0xE0000, 0xF0000)] if not 0xD800 <= c < 0xE000]
    for start in range(0, len(points), 8192):
        text = "".join(f" {chr(c)}{chr(c)}" for c in points[start:start + 8192])
        assert gpt2.encode(text) == tiktoken_from_files.encode_ordinary(text), f"code points from U+{points[start]:04X}"


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(exclude_categories=()), max_size=60))  # surrogates included
def test_gpt2_matches_tiktoken_on_arbitrary_text(gpt2, tiktoken_from_files, text):
    ids = gpt2.encode(text)
    assert ids == tiktoken_from_files.encode_ordinary(text)
    assert gpt2.decode(ids) == utf8_safe(text)  # lone surrogates become U+FFFD, as in tiktoken


def test_gpt2_byte_tokens_follow_the_byte_to_unicode_order(gpt2):
    """encoder.json numbers its 256 byte tokens printable-first: id 0 is '!', byte 0 is id 188."""
    assert gpt2.vocab[0] == b"!" and gpt2.encode("\x00") == [188] and gpt2.encode(" ") == [220]


def test_special_tokens_only_when_allowed(gpt2, tiktoken_from_files):
    text = "a<|endoftext|>b"
    assert gpt2.encode(text) == tiktoken_from_files.encode_ordinary(text)
    assert 50256 not in gpt2.encode(text)
    assert gpt2.encode(text, allowed_special="all") == tiktoken_from_files.encode(text, allowed_special="all")
    assert gpt2.encode(text, allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    with pytest.raises(ValueError, match="<|im_start|>"):
        gpt2.encode(text, allowed_special={"<|im_start|>"})


def test_long_whitespace_run_is_exact(gpt2, tiktoken_from_files):
    text = " " * 100_000 + "\n" * 1000 + "a"
    assert gpt2.encode(text) == tiktoken_from_files.encode_ordinary(text)


# --- round trips, decode ---------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_trained_encode_decode_round_trip_and_export(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert trained.to_tiktoken().encode_ordinary(text) == ids


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=40))
def test_decode_of_arbitrary_bytes_replaces_like_tiktoken(gpt2, tiktoken_from_files, data):
    ids = [gpt2.ranks[bytes([b])] for b in data]
    assert gpt2.decode_bytes(ids) == data
    assert gpt2.decode(ids) == data.decode("utf-8", errors="replace") == tiktoken_from_files.decode(ids)


def test_decode_of_unknown_id_names_it(trained):
    with pytest.raises(ValueError, match="token id 99999"):
        trained.decode([1, 99999])
    with pytest.raises(ValueError, match="token id -1"):
        trained.decode([-1])


# --- the tiktoken export ---------------------------------------------------------------------------

def test_tiktoken_export_equals_our_encode(trained):
    export = trained.to_tiktoken()
    for text in VARIED_TEXTS + wet_texts(40):
        assert export.encode_ordinary(text) == trained.encode(text), text[:80]
    text = "end.<|endoftext|>Next"
    assert export.encode(text, allowed_special="all") == trained.encode(text, allowed_special="all")
    assert export.n_vocab == trained.n_vocab == 600 and export.eot_token == trained.eos_id == 599


def test_a_piece_that_is_a_token_encodes_whole_as_in_tiktoken():
    """tiktoken returns a piece's own token when there is one, even where merging by rank would
    stall: here (b,c) merges first and no token joins a|bc|d, yet 'abcd' is a token."""
    vocab = [bytes([b]) for b in range(256)] + [b"bc", b"ab", b"cd", b"abcd"]
    tokenizer = BPETokenizer(vocab, [(98, 99), (97, 98), (99, 100), (257, 258)], "gpt2", {"<|endoftext|>": 260})
    assert tokenizer.encode("abcd") == tokenizer.to_tiktoken().encode_ordinary("abcd") == [259]
    assert tokenizer.encode("abcde") == tokenizer.to_tiktoken().encode_ordinary("abcde") == [97, 256, 100, 101]


def test_gpt4_pattern_export_equals_our_encode(gpt2):
    """The cl100k pattern (case-insensitive contractions, 1-3 digit groups) over GPT-2's ranks."""
    gpt4 = BPETokenizer(gpt2.vocab, gpt2.merges, "gpt4", gpt2.special_tokens)
    export = gpt4.to_tiktoken()
    for text in VARIED_TEXTS + wet_texts(40):
        assert gpt4.encode(text) == export.encode_ordinary(text), text[:80]
    # the pattern is in use: digits split 123|456|7 (GPT-2: one piece, merged 123|45|67)
    assert [gpt4.decode([i]) for i in gpt4.encode("1234567")] == ["123", "456", "7"]


# --- save / load -----------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["gpt2", "trained"])
def test_save_load_round_trips_exactly(which, request, tmp_path):
    tokenizer = request.getfixturevalue(which)
    tokenizer.save(tmp_path / "a.json")
    loaded = BPETokenizer.load(tmp_path / "a.json")
    assert (loaded.vocab, loaded.merges, loaded.pattern, loaded.special_tokens) == \
           (tokenizer.vocab, tokenizer.merges, tokenizer.pattern, tokenizer.special_tokens)
    loaded.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    for text in VARIED_TEXTS:
        assert loaded.encode(text, allowed_special="all") == tokenizer.encode(text, allowed_special="all")


def test_saved_file_is_readable(trained, tmp_path):
    trained.save(tmp_path / "t.json")
    text = (tmp_path / "t.json").read_text(encoding="utf-8")
    assert '"Ġ t"' in text and '"<|endoftext|>": 599' in text  # merges and specials in plain sight


def test_load_rejects_a_damaged_file(trained, tmp_path):
    data = trained.to_dict()
    data["merges"][5] = "Ġ nosuchtoken"
    with pytest.raises(ValueError, match=r"merges\[5\]"):
        BPETokenizer.from_dict(data)
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        BPETokenizer.load(tmp_path / "bad.json")


# --- training --------------------------------------------------------------------------------------

def test_training_learns_the_hand_computed_merges():
    """'aaabdaaabac' (one word): (a,a) is most frequent (4); then (aa,a) and (a,b) tie at 2 and the
    smaller ids (97, 98) win; then (aa,ab) with 2; then all pairs are at 1 and (a,c) = (97, 99) is
    the smallest."""
    tokenizer = BPETokenizer.train(["aaabdaaabac"], vocab_size=256 + 4 + 1)
    assert [tokenizer.vocab[i] for i in range(256, 260)] == [b"aa", b"ab", b"aaab", b"ac"]
    assert tokenizer.merges == [(97, 97), (97, 98), (256, 257), (97, 99)]
    assert tokenizer.encode("aaabdaaabac") == [258, 100, 258, 259]
    assert tokenizer.special_tokens == {"<|endoftext|>": 260}


def test_training_respects_pre_tokenization():
    """Merges never cross a regex piece: ' ab' + 'ab' words make (a,b) and ( ,ab), never (b, )."""
    tokenizer = BPETokenizer.train(["ab ab ab"], vocab_size=256 + 2 + 1)
    assert [tokenizer.vocab[i] for i in range(256, 258)] == [b"ab", b" ab"]


def naive_merges(word_counts: Counter, n_merges: int) -> list[tuple[int, int]]:
    """Textbook BPE: recount every pair of every word before each merge (the slow reference)."""
    words = {tuple(w): c for w, c in word_counts.items()}
    vocab = [bytes([b]) for b in range(256)]
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        pair = min(pairs, key=lambda p: (-pairs[p], p))
        new_id = len(vocab)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        merges.append(pair)
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def test_incremental_training_equals_naive_recount():
    texts = gzip.open(TINYSTORIES, "rt", encoding="utf-8").read(30_000).split("<|endoftext|>")
    tokenizer = BPETokenizer.train(texts, vocab_size=256 + 150 + 1)
    assert tokenizer.merges == naive_merges(count_words(texts, PATTERNS["gpt2"]), 150)


def test_training_merges_match_huggingface_tokenizers():
    """The `tokenizers` BPE trainer (GPT-2 byte-level pre-tokenizer) learns the same merges; only
    the order within equal counts may differ, since its tie-break follows its own ids."""
    tk = pytest.importorskip("tokenizers")
    texts = gzip.open(TINYSTORIES, "rt", encoding="utf-8").read(100_000).split("<|endoftext|>")
    ours = BPETokenizer.train(texts, vocab_size=512)
    hf = tk.Tokenizer(tk.models.BPE())
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.train_from_iterator(texts, tk.trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    hf_merges = {" ".join(m) if isinstance(m, list) else m for m in json.loads(hf.to_str())["model"]["merges"]}
    assert set(ours.to_dict()["merges"]) == hf_merges


def test_training_is_deterministic_and_order_free():
    texts = gzip.open(TINYSTORIES, "rt", encoding="utf-8").read(50_000).split("<|endoftext|>") + VARIED_TEXTS
    shuffled = texts[:]
    random.Random(0).shuffle(shuffled)
    a = BPETokenizer.train(texts, vocab_size=400)
    b = BPETokenizer.train(shuffled, vocab_size=400)
    assert a.to_dict() == b.to_dict()


def test_special_token_strings_in_training_text_are_not_learned():
    tokenizer = BPETokenizer.train(["<|endoftext|>" * 50 + "ab"], vocab_size=256 + 1 + 1)
    assert tokenizer.vocab[256] == b"ab"


def test_gpt4_pattern_training():
    tokenizer = BPETokenizer.train(["1234567 1234567 HELLO'S"], vocab_size=300, pattern="gpt4")
    assert tokenizer.pattern == PATTERNS["gpt4"]
    assert b"4567" not in tokenizer.vocab and b"123" in tokenizer.vocab  # digits group by three


@pytest.mark.parametrize("texts", [[], [""], ["", ""]])
def test_empty_corpus_fails_clearly(texts):
    with pytest.raises(ValueError, match="empty corpus"):
        BPETokenizer.train(texts, vocab_size=300)


def test_vocab_size_below_bytes_plus_specials_fails_clearly():
    with pytest.raises(ValueError, match="vocab_size 256 is below 256 byte tokens \\+ 1 special tokens = 257"):
        BPETokenizer.train(["hello"], vocab_size=256)
    assert BPETokenizer.train(["hello"], vocab_size=257).n_vocab == 257  # no merges: allowed


def test_running_out_of_pairs_stops_with_a_smaller_vocabulary(caplog):
    tokenizer = BPETokenizer.train(["abc"], vocab_size=1000)
    assert tokenizer.n_vocab == 256 + 2 + 1 and "ran out of pairs" in caplog.text
