"""The quality stage: one crafted document per rule, null turning checks and groups off, C4 line
cleaning, and the stage end to end (counts add up, same bytes twice, config typos named)."""

from __future__ import annotations

import inspect
import json
import random
from collections import Counter

import pytest

from conftest import write_stage_docs
from pipeline.__main__ import main
from pipeline.config import ConfigError, load_schema, section_config
from pipeline.data.docs import DOC_COLUMNS, LANG_COLUMNS, read_docs
from pipeline.data.quality import (GROUPS, C4QualityFilter, build_filters, count_sentences, dup_ngram_chars,
                                   encode_words, judge, ngram_firsts, quality, split_words, top_ngram_chars)

# A realistic English article (written for this test): it passes every rule with the defaults.
PROSE = """How to keep a sourdough starter alive through the winter

A sourdough starter is a small colony of wild yeast and lactic acid bacteria living in a paste of flour and water. It needs food, warmth and a little attention, and in return it raises bread without any packet of commercial yeast.
Most starters die in winter for the same reason: the kitchen gets cold, the yeast slows down, and the baker forgets to feed it. A jar that bubbled happily in July can sit flat and grey for days in January.

The simplest fix is to find a warmer spot. The top of the fridge, a shelf above the radiator or an oven with only the light switched on will usually stay between 24 and 27 degrees Celsius.
If no warm place exists, feed the starter with slightly warmer water and give it more time. A feeding that took six hours in summer may take ten hours now, and that is fine.

Watch the starter rather than the clock. When it has doubled, smells pleasantly sour and shows large bubbles on the side of the jar, it is ready to use.
Should a layer of grey liquid appear on top, pour it off and feed the starter again. This liquid is alcohol made by hungry yeast, and it is a sign of neglect rather than of death.

Finally, keep a spoonful of dried starter in a sealed bag as insurance. Spread some active starter thinly on baking paper, let it dry completely, then crumble it into flakes that will keep for months.
"""
PARAGRAPHS = PROSE.strip().split("\n\n")
LINES = [line for line in PROSE.splitlines() if line]
NAMES = [group.name for group in GROUPS]


def filters(**config) -> list:
    """The filters of a `quality` config (a group not named takes its defaults)."""
    return build_filters(section_config("quality", config))


def only(group: str, **overrides) -> list:
    """The filters of `group` alone (every other group null)."""
    return filters(**({name: None for name in NAMES} | {group: overrides}))


def reason(chain: list, text: str) -> str | None:
    return judge(chain, {"text": text})[1]


def dup_ngram_doc(n: int, frac: float, copies: int = 12) -> str:
    """A phrase of n distinct 10-letter words in `copies` different lines, padded with words that
    do not repeat, so that the repeats hold just over `frac` of the characters. Many copies keep
    the top 2- to 4-gram fractions (which count the first copy and spaces too) under theirs."""
    phrase = " ".join(f"repeated{c}{c}" for c in "abcdefghij"[:n])
    # a unique word on each side of every copy, so that no longer n-gram repeats
    head = "".join(f"Line{i} {phrase} end{i}.\n" for i in range(copies))
    total = round((copies - 1) * n * 10 / (frac + 0.003))
    filler = " ".join(f"filler{i:04d}" for i in range((total - len(head)) // 11 + 1))
    return (head + filler)[:total]


# group, rule, the crafted text, the key that turns the rule off (with the `off` value), and the
# reason once it is off: None, or the later rule that the same text also trips.
CASES = [
    # --- gopher_repetition
    ("gopher_repetition", "dup_para_frac", PROSE + "\n\n" + "\n\n".join(["Thanks for reading."] * 4),
     "dup_para_frac", None, None),
    ("gopher_repetition", "dup_para_char_frac", PROSE + "\n\n" + PARAGRAPHS[1],
     "dup_para_char_frac", None, "dup_line_char_frac"),  # a repeated paragraph's lines repeat too
    ("gopher_repetition", "dup_line_frac", PROSE + "\n\n" + "\n".join(["Reply"] * 8),
     "dup_line_frac", None, None),
    ("gopher_repetition", "dup_line_char_frac", PROSE + "\n\n" + "\n".join([LINES[1], LINES[2], "That is all."]),
     "dup_line_char_frac", None, "dup_5_gram_char_frac"),  # ... and so do their n-grams
    ("gopher_repetition", "top_2_gram_char_frac",
     PROSE + "\n".join(f"Offer {i}: buy now, buy now, buy now!" for i in range(30)),
     "top_2_gram_char_frac", None, "top_3_gram_char_frac"),
    ("gopher_repetition", "top_3_gram_char_frac",
     PROSE + "\n".join(f"see the supercalifragilistic {i}" for i in range(20)),
     "top_3_gram_char_frac", None, None),
    ("gopher_repetition", "top_4_gram_char_frac",
     PROSE + "\n".join(f"go to the supercalifragilistic {i}" for i in range(20)),
     "top_4_gram_char_frac", None, None),
    *[("gopher_repetition", f"dup_{n}_gram_char_frac", dup_ngram_doc(n, frac),
       f"dup_{n}_gram_char_frac", None, None)
      for n, frac in [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]],
    # --- gopher_quality
    ("gopher_quality", "too_few_words", "The cat sat with the dog and the bird.", "min_doc_words", None, None),
    ("gopher_quality", "too_many_words", (PROSE + "\n") * 400, "max_doc_words", None, None),
    ("gopher_quality", "mean_word_length_too_short", "To be or not to be, so it is. " * 10,
     "min_avg_word_length", None, None),
    ("gopher_quality", "mean_word_length_too_long",
     "Internationalization telecommunications infrastructure and standardization "
     "interoperability requirements. " * 8,
     "max_avg_word_length", None, None),
    ("gopher_quality", "too_many_hashes",
     "We love writing code with the team and sharing it #python #coding\n" * 5,
     "max_symbol_word_ratio", None, None),
    ("gopher_quality", "too_many_ellipses",
     "We waited for the bus ... and then we waited for the train ... until night came at last\n" * 4,
     "max_symbol_word_ratio", None, None),
    ("gopher_quality", "too_many_bullet_lines", "- the cat sat on the mat and that was good\n" * 6,
     "max_bullet_lines_ratio", None, None),
    ("gopher_quality", "too_many_ellipsis_lines",
     "It was the best of times and the worst of times and then it ended ...\n" * 4,
     "max_ellipsis_lines_ratio", None, None),
    ("gopher_quality", "too_few_alpha_words", "The prices of the items were 1200 3400 5600 7800 9000 1100 2200 "
     "3300 4400 5500 and 6600 7700 8800 9900 1000\n" * 4, "min_alpha_words_ratio", None, None),
    ("gopher_quality", "too_few_stop_words", "Bright colours fill every corner while children run around happily "
     "singing songs in this small village near green mountains. Farmers bring fresh bread, cheese, apples, honey, "
     "eggs, milk for everyone each morning; visitors often stay longer than planned because nobody wants such "
     "pleasant days ending.\n" * 2, "min_stop_words", None, None),
    # --- c4 (page rules; line rules are tested below)
    ("c4", "lorem_ipsum", PROSE + "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
     "filter_lorem_ipsum", False, None),
    ("c4", "curly_bracket", PROSE + "Add this to your style sheet: body { color: black; }",
     "filter_curly_bracket", False, None),
    ("c4", "too_few_sentences", "Home\nAbout us\nOur bakery opens at seven every morning.\n"
     "We sell bread and cakes.\nCall us today.", "min_num_sentences", None, None),
    # --- fineweb
    ("fineweb", "too_few_punct_lines",
     "\n".join([f"Handmade ceramic mug number {i} in glazed blue" for i in range(9)]
               + ["All mugs ship within two working days."]),
     "line_punct_thr", None, None),
    ("fineweb", "too_many_short_lines", "It rained all day.\nWe stayed in.\nMum made soup.\nDad read a book.\n"
     "The cat slept.\nNobody went out.\nThen the sun came out and everyone ran into the garden at once.",
     "short_line_thr", None, None),
    ("fineweb", "too_many_dup_line_chars", PROSE + "Share this article.\nShare this article.\n",
     "char_duplicates_ratio", None, None),
    ("fineweb", "too_many_newlines", "\n".join(f"Internationalization consideration{i}" + "." * (i % 4 == 0)
                                               for i in range(12)), "new_line_ratio", None, None),
]


@pytest.mark.parametrize("group, rule, text, key, off, reason_when_off", CASES, ids=[c[1] for c in CASES])
def test_each_rule_trips_on_its_document_and_its_key_turns_it_off(group, rule, text, key, off, reason_when_off):
    assert reason(only(group), text) == f"{group}:{rule}"
    expected = None if reason_when_off is None else f"{group}:{reason_when_off}"
    assert reason(only(group, **{key: off}), text) == expected


def test_realistic_article_passes_every_rule_and_c4_only_drops_its_blank_lines():
    kept, why = judge(filters(), {"id": "a", "text": PROSE})
    assert why is None
    assert kept["text"] == "\n".join(LINES)


def test_first_failed_rule_wins_across_and_within_groups():
    # repeated lines, too few words, too few stop words, too few sentences: repetition runs first
    assert reason(filters(), "Home\n" * 10) == "gopher_repetition:dup_line_frac"
    assert reason(filters(gopher_repetition=None), "Home\n" * 10) == "gopher_quality:too_few_words"
    assert reason(only("gopher_quality"), "Buy cheap shoes online") == "gopher_quality:too_few_words"


def test_c4_page_left_empty_is_dropped():
    nav = "Home\nAbout\nContact us"
    assert reason(only("c4", min_num_sentences=None), nav) == "c4:no_lines_left"
    assert reason(only("c4", min_num_sentences=None, min_words_per_line=None), nav) is None


C4_PAGE = [
    "  Our bakery opens at seven every morning.  ",        # kept, stripped
    "Home",                                                # too_few_words
    "Please enable JavaScript to see the map.",            # javascript
    "By using this site you agree to our Terms of Use.",   # policy
    "x" * 1001 + " is one long token",                     # too_long_word
    "Sourdough [1] needs time [edit] and patience [citation needed].",  # kept, markers removed
    "",                                                    # too_few_words
    "{}",                                                  # too_few_words: a removed line cannot drop the page
    "We bake rye, spelt and wheat loaves every day",       # kept (no terminal punctuation needed)
    "Come early. The best loaves sell out before nine!",   # kept, two sentences
]


def test_c4_line_cleaning_removes_the_right_lines_and_keeps_the_rest():
    c4 = C4QualityFilter()
    doc = {"text": "\n".join(C4_PAGE)}
    assert c4.filter(doc) is True
    assert doc["text"] == ("Our bakery opens at seven every morning.\n"
                           "Sourdough  needs time  and patience .\n"
                           "We bake rye, spelt and wheat loaves every day\n"
                           "Come early. The best loaves sell out before nine!")
    assert c4.lines_in == len(C4_PAGE)
    assert c4.lines_removed == Counter(too_few_words=3, javascript=1, policy=1, too_long_word=1)


def test_c4_line_rules_turn_off_and_terminal_punctuation_turns_on():
    c4 = C4QualityFilter(filter_javascript=False, filter_policy=False, min_num_sentences=None)
    doc = {"text": "\n".join(C4_PAGE)}
    assert c4.filter(doc) is True
    assert "Please enable JavaScript to see the map." in doc["text"]
    assert "agree to our Terms of Use." in doc["text"]

    c4 = C4QualityFilter(filter_no_terminal_punct=True, min_num_sentences=None)
    doc = {"text": "Fresh bread every single day\nIt was good and then...\nWe open at seven."}
    assert c4.filter(doc) is True
    assert doc["text"] == "We open at seven."
    assert c4.lines_removed == Counter(no_terminal_punct=2)


def test_words_and_sentences_split_like_the_docstring_says():
    assert split_words("Don't e-mail the U.S. about 3.5% ... now #1") == [
        "Don't", "e-mail", "the", "U.S", ".", "about", "3.5", "%", "...", "now", "#", "1"]
    assert count_sentences("Mix the flour. Add water! Is it ready? yes, it is.") == 3


def reference_ngram_chars(words: list[str], n: int) -> tuple[int, int]:
    """(top n-gram characters, duplicated n-gram characters) the plain way, over tuples of words:
    the definitions the integer-sort versions must keep exactly."""
    grams = list(zip(*(words[i:] for i in range(n))))
    top = 0
    if grams:
        gram, count = Counter(grams).most_common(1)[0]  # ties: the first seen
        top = (sum(map(len, gram)) + n - 1) * count if count >= 2 else 0
    seen, dup, i = set(), 0, 0
    while i < len(grams):
        if grams[i] in seen:
            dup, i = dup + sum(map(len, grams[i])), i + n
        else:
            seen.add(grams[i])
            i += 1
    return top, dup


def test_ngram_measures_match_the_plain_definition_on_repetitive_texts():
    rng = random.Random(0)
    for _ in range(3000):
        vocab = [f"w{i}" * rng.randint(1, 3) for i in range(rng.choice([1, 2, 3, 8, 100]))]
        words = [rng.choice(vocab) for _ in range(rng.randint(0, rng.choice([6, 40, 300])))]
        ids, ends = encode_words(words)
        firsts = ngram_firsts(ids, 10)
        for n in range(2, 11):
            top, dup = reference_ngram_chars(words, n)
            assert top_ngram_chars(firsts[n], ends, n) == top, (words, n)
            assert dup_ngram_chars(firsts[n], ends, n) == dup, (words, n)


def test_schema_defaults_are_the_constructor_defaults():
    schema = load_schema()["properties"]["quality"]["properties"]
    for group in GROUPS:
        params = inspect.signature(group).parameters
        keys = schema[group.name]["properties"]
        assert set(keys) == set(params), group.name
        for key, spec in keys.items():
            default = params[key].default
            assert spec["default"] == (list(default) if isinstance(default, tuple) else default), key


def test_config_typo_names_the_key():
    with pytest.raises(ConfigError, match=r"quality\.c4\.min_num_sentence\b"):
        section_config("quality", {"c4": {"min_num_sentence": 3}})
    with pytest.raises(ConfigError, match=r"quality\.fineweb\.new_line_ratio"):
        section_config("quality", {"fineweb": {"new_line_ratio": "high"}})


def stage_docs() -> list[dict]:
    base = {"url": "http://example.com/", "date": "2020-11-30T00:00:00Z", "source": "shard0",
            "lang": "en", "lang_score": 0.95}
    texts = {
        "prose": PROSE,
        "prose_nav": "Home\nShop\nPlease enable JavaScript to order.\n" + PROSE,
        "menu": "Home\n" * 10,
        "short": "The cat sat with the dog and the bird.",
        "lorem": PROSE + "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    }
    return [{**base, "id": f"<urn:uuid:{name}>", "text": text} for name, text in texts.items()]


def test_stage_end_to_end_counts_add_up_and_same_bytes_twice(tmp_path):
    docs_in = tmp_path / "in.parquet"
    write_stage_docs(docs_in, stage_docs(), {**DOC_COLUMNS, **LANG_COLUMNS})
    outs = {}
    for run in ("a", "b"):
        folder = tmp_path / run
        paths = dict(output=folder / "kept.parquet", removed=folder / "removed.parquet",
                     manifest=folder / "manifest.json")
        if run == "a":
            quality(docs_in, config={}, **paths)
        else:  # the command line does the same
            assert main(["quality", "--input", str(docs_in), "--output", str(paths["output"]),
                         "--removed", str(paths["removed"]), "--manifest", str(paths["manifest"]),
                         "--config", "{}"]) == 0
        outs[run] = {name: path.read_bytes() for name, path in paths.items()}
    assert outs["a"] == outs["b"]

    kept, removed = read_docs(tmp_path / "a/kept.parquet"), read_docs(tmp_path / "a/removed.parquet")
    manifest = json.loads(outs["a"]["manifest"])
    counts, metrics = manifest["counts"], manifest["metrics"]
    assert [d["id"] for d in kept] == ["<urn:uuid:prose>", "<urn:uuid:prose_nav>"]
    assert kept[1]["text"] == "\n".join(LINES) and kept[1]["lang"] == "en"
    assert {d["id"]: d["reason"] for d in removed} == {
        "<urn:uuid:menu>": "gopher_repetition:dup_line_frac",
        "<urn:uuid:short>": "gopher_quality:too_few_words",
        "<urn:uuid:lorem>": "c4:lorem_ipsum"}
    assert removed[2]["text"] == stage_docs()[4]["text"]  # dropped documents are kept as they came
    assert counts["docs_in"] == 5 == counts["docs_out"] + sum(counts["dropped"].values())
    dropped_bytes = sum(counts["dropped_bytes"].values())
    assert counts["bytes_in"] == counts["bytes_out"] + dropped_bytes + metrics["bytes_cleaned"]
    assert metrics["c4_lines"]["removed_by_rule"] == {"javascript": 1, "too_few_words": 2 + 2 * 4}


def test_stage_config_typo_fails_before_writing(tmp_path):
    docs_in = tmp_path / "in.parquet"
    write_stage_docs(docs_in, stage_docs(), {**DOC_COLUMNS, **LANG_COLUMNS})
    with pytest.raises(ConfigError, match=r"quality\.gopher_quality\.min_doc_wordz"):
        quality(docs_in, output=tmp_path / "k.parquet", removed=tmp_path / "r.parquet",
                manifest=tmp_path / "m.json", config={"gopher_quality": {"min_doc_wordz": 10}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.manifest.json", "in.parquet"]
