"""Byte-level BPE, written here: train, encode, decode, save, load; GPT-2 files in, tiktoken out.

The model is a vocabulary of byte strings, one per id, where the id doubles as the merge rank,
plus a pre-tokenization regex and a few special tokens after the ordinary ids:

- Text is split by the regex (GPT-2's, or GPT-4's cl100k one) into pieces; BPE never crosses a
  piece boundary.
- Encoding a piece works on its UTF-8 bytes exactly as tiktoken does: if the whole piece is a token,
  that is the answer; otherwise start from single bytes and repeatedly join the adjacent pair whose
  concatenation is the token of lowest rank (ties: the leftmost pair), until no adjacent pair is a
  token. Because this is tiktoken's rule, OpenAI's GPT-2 files loaded here encode to exactly
  tiktoken's `gpt2` ids, and our trained vocabularies export to a `tiktoken.Encoding` that gives
  exactly our ids (the fast engine for bulk encoding).
- Training counts each distinct pre-tokenized word once (with its frequency), then merges the most
  frequent adjacent pair, updating pair counts incrementally: only words that hold the merged pair
  are touched. Ties between equally frequent pairs go to the smallest (left id, right id), i.e. the
  pair of older tokens (for two byte pairs: the lower byte values), as in HuggingFace `tokenizers`.
  A merge whose bytes already formed a token (from a different split) would reuse that token, as
  HuggingFace's trainer does, so every id keeps distinct bytes (tiktoken requires it). We have not
  seen it happen (30,000 random small corpora never produced one); the guard is one dict lookup.

GPT-2 detail: its ids are ranks too, but its 256 byte tokens are numbered in the order of GPT-2's
byte-to-unicode table (printable bytes first), so id 0 is `!`, not byte 0. Keeping bytes per id
(rather than assuming id == byte) handles both.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from functools import cache
from pathlib import Path
from typing import Literal

import regex
from tqdm import tqdm

from pipeline.artifacts import atomic_write_json

log = logging.getLogger(__name__)

# tiktoken's patterns verbatim (r50k/gpt2 and cl100k). The possessive quantifiers (`++`) only make
# matching faster; they split text exactly like GPT-2's original `\s+(?!\S)|\s+` form.
PATTERNS: dict[str, str] = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
}
# Special tokens: the one definition of each. <|endoftext|> separates documents in pretraining (and
# starts every chat); the role tokens frame chat turns (pipeline/tokenizer/chat.py), nanochat style.
# They are reserved when the tokenizer is trained, so the pretrained embedding already has their
# rows and SFT never resizes it.
ENDOFTEXT = "<|endoftext|>"
USER_START = "<|user_start|>"
USER_END = "<|user_end|>"
ASSISTANT_START = "<|assistant_start|>"
ASSISTANT_END = "<|assistant_end|>"
# the `tokenizer.special_tokens` default; train() gives them the last ids, in this order
CHAT_SPECIAL_TOKENS = (ENDOFTEXT, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END)
FORMAT = "wetstone-bpe"
FORMAT_VERSION = 1
_CACHE_LIMIT = 1 << 17  # encoded pieces kept per tokenizer; natural text repeats its words a lot


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (used by encoder.json, vocab.bpe
    and our tokenizer.json, so every token is a readable string: ' the' shows as 'Ġthe').

    Printable Latin-1 bytes map to themselves; the other 68 bytes to chr(256 + n), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


@cache
def unicode_to_byte() -> dict[str, int]:
    return {char: b for b, char in byte_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(text: str, where: str) -> bytes:
    table = unicode_to_byte()
    try:
        return bytes(table[char] for char in text)
    except KeyError as e:
        raise ValueError(f"{where}: {text!r} holds {e.args[0]!r}, not a byte-level character") from None


def utf8_safe(text: str) -> str:
    """Text as tiktoken sees it: lone surrogates (not encodable as UTF-8) become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _special_splitter(specials: Collection[str]) -> regex.Pattern | None:
    """A regex capturing any of `specials` (longest first, so a special containing another wins)."""
    if not specials:
        return None
    return regex.compile("(" + "|".join(regex.escape(s) for s in sorted(specials, key=lambda s: (-len(s), s))) + ")")


def bpe_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encode one pre-tokenized piece: tiktoken's byte-pair merge, with a heap so that long pieces
    (a 100 kB run of spaces) stay O(n log n).

    Parts are kept as a linked list of byte spans keyed by start offset. A heap entry
    (rank, start, end) names the pair spanning piece[start:end]; it is stale once the part at
    `start` is gone or the pair starting there no longer ends at `end`. Popping the smallest
    (rank, start) gives the lowest rank, leftmost on ties: tiktoken's choice."""
    if (rank := ranks.get(piece)) is not None:
        return [rank]
    n = len(piece)
    nxt = list(range(1, n + 1))   # nxt[s]: start of the part after the part starting at s (n: none)
    prv = list(range(-1, n - 1))  # prv[s]: start of the part before it (-1: none)
    alive = [True] * n
    heap = [(r, s, s + 2) for s in range(n - 1) if (r := ranks.get(piece[s:s + 2])) is not None]
    heapq.heapify(heap)

    def push(start: int) -> None:
        """Queue the pair starting at `start`, if there is one and it is a token."""
        if start < 0 or nxt[start] >= n:
            return
        end = nxt[nxt[start]]
        if (r := ranks.get(piece[start:end])) is not None:
            heapq.heappush(heap, (r, start, end))

    while heap:
        _, s, e = heapq.heappop(heap)
        if not alive[s] or nxt[s] >= n or nxt[nxt[s]] != e:
            continue  # stale: one of its parts has merged since
        right = nxt[s]
        alive[right] = False
        nxt[s] = e
        if e < n:
            prv[e] = s
        push(prv[s])
        push(s)
    out, s = [], 0
    while s < n:
        out.append(ranks[piece[s:nxt[s]]])
        s = nxt[s]
    return out


class BPETokenizer:
    """A byte-level BPE tokenizer: `vocab[id]` is the token's bytes, and ids are merge ranks.

    Build one with `train`, `from_gpt2_files` or `load`."""

    def __init__(self, vocab: list[bytes], merges: list[tuple[int, int]], pattern: str,
                 special_tokens: dict[str, int]) -> None:
        self.vocab = list(vocab)
        self.merges = list(merges)
        self.pattern = PATTERNS.get(pattern, pattern)
        self.special_tokens = dict(special_tokens)
        self.ranks = {token: i for i, token in enumerate(self.vocab)}
        self._check()
        self._regex = regex.compile(self.pattern)
        self._id_to_special = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._cache: dict[str, list[int]] = {}

    def _check(self) -> None:
        if len(self.ranks) != len(self.vocab):
            dup = next(t for t, n in Counter(self.vocab).items() if n > 1)
            raise ValueError(f"vocabulary lists the token {dup!r} twice")
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise ValueError(f"vocabulary lacks {len(missing)} single-byte tokens (first: byte {missing[0]}); "
                             f"byte-level BPE needs all 256")
        for a, b in self.merges:
            if not (0 <= a < len(self.vocab) and 0 <= b < len(self.vocab)):
                raise ValueError(f"merge ({a}, {b}) names an id outside the vocabulary of {len(self.vocab)}")
            if self.vocab[a] + self.vocab[b] not in self.ranks:
                raise ValueError(f"merge ({a}, {b}) makes {self.vocab[a] + self.vocab[b]!r}, which is not in the vocabulary")
        ids = sorted(self.special_tokens.values())
        if ids and (ids[0] < len(self.vocab) or len(set(ids)) != len(ids)):
            raise ValueError(f"special token ids {self.special_tokens} must be distinct and come after the "
                             f"{len(self.vocab)} ordinary ids")

    # --- sizes -----------------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        """Ids are 0 .. n_vocab - 1 (ordinary tokens, then specials)."""
        return max([len(self.vocab) - 1, *self.special_tokens.values()]) + 1

    @property
    def eos_id(self) -> int:
        if ENDOFTEXT not in self.special_tokens:
            raise ValueError(f"this tokenizer has no {ENDOFTEXT} special token (it has {sorted(self.special_tokens)})")
        return self.special_tokens[ENDOFTEXT]

    # --- encode / decode -------------------------------------------------------------------------

    def encode(self, text: str, allowed_special: Collection[str] | Literal["all"] = ()) -> list[int]:
        """Token ids of `text`. Special-token strings are ordinary text unless named in
        `allowed_special` ("all" allows every one), which then encode as their single id."""
        text = utf8_safe(text)
        allowed = self.special_tokens if allowed_special == "all" else allowed_special
        unknown = set(allowed) - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special names tokens this tokenizer lacks: {sorted(unknown)}")
        splitter = _special_splitter(allowed)
        chunks = splitter.split(text) if splitter else [text]
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            if i % 2:  # split() with a capture group puts the matched specials at odd positions
                ids.append(self.special_tokens[chunk])
            else:
                ids.extend(self._encode_ordinary(chunk))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for piece in self._regex.findall(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                piece_ids = cache[piece] = bpe_merge(piece.encode("utf-8"), self.ranks)
            ids.extend(piece_ids)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        vocab, n, specials = self.vocab, len(self.vocab), self._id_to_special
        try:
            return b"".join(vocab[i] if 0 <= i < n else specials[i] for i in ids)
        except (KeyError, TypeError):
            bad = next(i for i in ids if not (isinstance(i, int) and 0 <= i < n or i in specials))
            raise ValueError(f"token id {bad!r} is not in this tokenizer (n_vocab {self.n_vocab})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD, as in tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- training --------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = "gpt2",
              special_tokens: Collection[str] = (ENDOFTEXT,)) -> BPETokenizer:
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `texts`.

        Special-token strings in the texts are cut out, never learned. If the words run out of
        pairs first, training stops there with a warning (the vocabulary is then smaller)."""
        special_tokens = list(dict.fromkeys(special_tokens))
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size {vocab_size} is below 256 byte tokens + {len(special_tokens)} "
                             f"special tokens = {256 + len(special_tokens)}")
        words = count_words(texts, PATTERNS.get(pattern, pattern), special_tokens)
        if not words:
            raise ValueError("empty corpus: the training texts hold no characters to learn merges from")
        vocab, merges = learn_merges(words, n_merges)
        if len(vocab) < 256 + n_merges:
            log.warning("the corpus ran out of pairs after %d merges: vocabulary %d, not %d",
                        len(merges), len(vocab) + len(special_tokens), vocab_size)
        specials = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
        return cls(vocab, merges, pattern, specials)

    # --- files -----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The readable saved form: tokens and merges written with GPT-2's byte-to-unicode map,
        merges one 'left right' string each in rank order, exactly as in GPT-2's vocab.bpe."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab": [token_to_str(t) for t in self.vocab],
            "merges": [f"{token_to_str(self.vocab[a])} {token_to_str(self.vocab[b])}" for a, b in self.merges],
        }

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, where: str = "tokenizer") -> BPETokenizer:
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{where}: not a {FORMAT} v{FORMAT_VERSION} file "
                             f"(format {data.get('format')!r}, version {data.get('version')!r})")
        vocab = [str_to_token(s, f"{where} vocab[{i}]") for i, s in enumerate(data["vocab"])]
        ids = {token_to_str(t): i for i, t in enumerate(vocab)}
        merges = []
        for n, line in enumerate(data["merges"]):
            left, _, right = line.partition(" ")
            if left not in ids or right not in ids:
                raise ValueError(f"{where} merges[{n}]: {line!r} names a token not in the vocabulary")
            merges.append((ids[left], ids[right]))
        return cls(vocab, merges, data["pattern"], data["special_tokens"])

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable tokenizer file ({e})") from e
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_gpt2_files(cls, encoder_json: str | os.PathLike, vocab_bpe: str | os.PathLike) -> BPETokenizer:
        """OpenAI's GPT-2 tokenizer from its two files: `encoder.json` (token string -> id) and
        `vocab.bpe` (a '#version' line, then one merge 'left right' per line in rank order).

        Entries of encoder.json that are neither a byte nor a merge result are special tokens
        (GPT-2 has one, <|endoftext|> = 50256). The files must agree that merge n makes id 256 + n,
        which is what makes ids usable as ranks (tiktoken checks the same)."""
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:]  # line 1 is '#version: 0.2'
        pairs = [tuple(str_to_token(part, f"{vocab_bpe} line {n + 2}") for part in line.split(" "))
                 for n, line in enumerate(lines) if line]
        mergeable = {bytes([b]) for b in range(256)} | {left + right for left, right in pairs}
        ids: dict[bytes, int] = {}
        specials: dict[str, int] = {}
        for text, i in encoder.items():
            token = str_to_token(text, str(encoder_json)) if _is_byte_level(text) else None
            if token in mergeable:
                ids[token] = i
            else:
                specials[text] = i
        if len(ids) != len(mergeable) or sorted(ids.values()) != list(range(len(ids))):
            raise ValueError(f"{encoder_json}: its byte and merge tokens should have ids 0..{len(mergeable) - 1}; "
                             f"is {vocab_bpe} its merges file?")
        vocab = sorted(ids, key=ids.__getitem__)
        merges = []
        for n, (left, right) in enumerate(pairs):
            if ids[left + right] != 256 + n:
                raise ValueError(f"{vocab_bpe} line {n + 2}: merge makes id {ids[left + right]}, not its rank "
                                 f"{256 + n}; the files do not belong together")
            merges.append((ids[left], ids[right]))
        return cls(vocab, merges, "gpt2", specials)

    def to_tiktoken(self, name: str = "wetstone"):
        """This tokenizer as a `tiktoken.Encoding` (same regex, ranks and specials, so the same ids
        on every input): the fast engine for bulk encoding."""
        import tiktoken

        return tiktoken.Encoding(name=name, pat_str=self.pattern,
                                 mergeable_ranks=dict(self.ranks), special_tokens=dict(self.special_tokens))


def _is_byte_level(s: str) -> bool:
    table = unicode_to_byte()
    return all(char in table for char in s)


# --- training internals ----------------------------------------------------------------------------

def count_words(texts: Iterable[str], pattern: str, special_tokens: Collection[str] = ()) -> Counter[bytes]:
    """Pre-tokenize every text (special-token strings cut out) and count each distinct piece."""
    splitter = _special_splitter(special_tokens)
    findall = regex.compile(pattern).findall
    counts: Counter[str] = Counter()
    for text in tqdm(texts, desc="pre-tokenize", unit="doc", disable=None):
        text = utf8_safe(text)
        for i, chunk in enumerate(splitter.split(text) if splitter else [text]):
            if i % 2 == 0:
                counts.update(findall(chunk))
    return Counter({word.encode("utf-8"): n for word, n in counts.items()})


def learn_merges(word_counts: dict[bytes, int], n_merges: int) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Run BPE on counted words; return (vocab as bytes per id, merges as (left id, right id)).

    `where[pair]` names the words that may hold `pair` (a superset: entries go stale as words
    change, and are skipped). After each merge only those words are rewritten, and only the pairs
    next to each merged occurrence change count (see `merge_word`). A max-heap keyed by
    (-count, pair) gives the most frequent pair, smallest ids on ties; entries whose count has
    changed since they were pushed are skipped when popped."""
    words = [list(word) for word in word_counts]
    freqs = list(word_counts.values())
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    vocab = [bytes([b]) for b in range(256)]
    ranks = {token: i for i, token in enumerate(vocab)}
    merges: list[tuple[int, int]] = []
    progress = tqdm(total=n_merges, desc="merges", unit="merge", disable=None)
    while len(vocab) < 256 + n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if neg_count == 0:
            break  # no adjacent pairs left anywhere
        if pair_counts[pair] != -neg_count:
            continue  # stale entry
        merged = vocab[pair[0]] + vocab[pair[1]]
        new_id = ranks.get(merged)
        if new_id is None:
            new_id = ranks[merged] = len(vocab)
            vocab.append(merged)
            progress.update()
        merges.append(pair)
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for w in where.pop(pair):
            merge_word(words, w, freqs[w], pair, new_id, delta, where)
        for p, d in delta.items():
            if d:
                pair_counts[p] += d
                heapq.heappush(heap, (-pair_counts[p], p))
    progress.close()
    return vocab, merges


def merge_word(words: list[list[int]], w: int, freq: int, pair: tuple[int, int], new_id: int,
               delta: dict[tuple[int, int], int], where: dict[tuple[int, int], set[int]]) -> None:
    """Replace each non-overlapping `pair` in `words[w]`, left to right and in place, by `new_id`.

    Only the pairs around each occurrence change: with x a b y becoming x t y, (x, a), (a, b) and
    (b, y) lose `freq` and (x, t), (t, y) gain it. x is read from the word as merged so far, so in
    a b a b the second occurrence sees x = t (and removes the (t, a) the first one added).
    `list.index` does the scanning in C: CJK text makes words hundreds of bytes long."""
    a, b = pair
    word = words[w]
    i = -1
    while True:
        try:
            i = word.index(a, i + 1)
        except ValueError:
            return
        if i + 1 == len(word) or word[i + 1] != b:
            continue
        delta[pair] -= freq
        if i > 0:
            x = word[i - 1]
            delta[x, a] -= freq
            delta[x, new_id] += freq
            where[x, new_id].add(w)
        if i + 2 < len(word):
            y = word[i + 2]
            delta[b, y] -= freq
            delta[new_id, y] += freq
            where[new_id, y].add(w)
        word[i:i + 2] = [new_id]
