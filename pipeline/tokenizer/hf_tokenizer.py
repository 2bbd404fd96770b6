"""A transformers folder's tokenizer (tokenizer.json + tokenizer_config.json), behaving as
transformers' tokenizer of that folder does, on one of two backends:

- our `BPETokenizer` ("wetstone-bpe"), where it represents tokenizer.json exactly: a byte-level BPE
  with `ignore_merges` (tiktoken's rule: a piece that is a token is taken whole), one Split regex,
  no normalizer, every token past the 256 bytes one merge of two older ones, no added tokens but
  special ones numbered after the vocabulary (pipeline/hf.py's `tokenizer_from_hf`), and it encodes
  a probe text of many scripts as the `tokenizers` library does. Our exports and Llama 3's
  tokenizer are of this kind;
- else the `tokenizers` library itself ("tokenizers"), e.g. for Qwen2's (NFC normalizer, merges
  applied to pieces that are whole tokens), with byte-level decoding (`ByteLevel` decoder). A
  tokenizer of another decoder (SentencePiece's metaspace) is refused: its text is not the
  concatenation of its tokens' bytes, which streaming decodes.

`HFTokenizer.backend` says which, and `load_hf_tokenizer` logs it. As transformers: `encode`
parses special tokens in the text and adds what the post-processor adds (Llama 3's
<|begin_of_text|>) unless `add_special_tokens=False`; `chat_template`, `bos_token` and `eos_token`
come from tokenizer_config.json (the template from chat_template.jinja where transformers 5 put
it; rendered by pipeline/tokenizer/chat_template.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Literal

from pipeline.tokenizer.bpe import BPETokenizer, str_to_token

log = logging.getLogger(__name__)

# many scripts, digits, contractions, runs of spaces and newlines: where regex dialects and merge
# rules part, if they do
PROBE = ("Hello world! It's 2026-12-05, and we'll     see:\n\n\tcafé naïve Ünïcödé 東京タワー 서울 Москва "
         "القاهرة हिन्दी 🙂🚀 x=3.14159*2^10; don't I'm you've they're 1234567 ...\r\n  end  ")


class HFTokenizer:
    """The interface the server and engine use (`encode`, `decode_bytes`, `decode`, `vocab`,
    `special_tokens`, `n_vocab`), over a BPETokenizer or a `tokenizers.Tokenizer`."""

    def __init__(self, path: Path, backend: BPETokenizer | object, prefix: list[int], config: dict):
        self.path = path
        self.bpe = backend if isinstance(backend, BPETokenizer) else None
        self.library = None if self.bpe is not None else backend
        self.backend = "wetstone-bpe" if self.bpe is not None else "tokenizers"
        self.prefix = prefix  # ids the post-processor puts before a text (BPE backend)
        if self.bpe is not None:
            self.special_tokens = dict(self.bpe.special_tokens)
            by_id = dict(enumerate(self.bpe.vocab)) | {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        else:
            from tokenizers import Tokenizer

            # a second instance that reads special-token strings as text: one setting per instance,
            # never flipped while another thread encodes
            self._plain = Tokenizer.from_str(self.library.to_str())
            self._plain.encode_special_tokens = True
            added = self.library.get_added_tokens_decoder()
            self.special_tokens = {t.content: i for i, t in added.items() if t.special}
            by_id = {i: str_to_token(s, f"{path} model.vocab[{i}]")
                     for s, i in self.library.get_vocab(with_added_tokens=False).items()}
            by_id |= {i: t.content.encode("utf-8") for i, t in added.items()}
        self._by_id = by_id
        # every id's bytes (a special token's as its text), in id order: the server bounds a
        # prompt's tokens by its characters with the longest
        self.vocab = [by_id[i] for i in sorted(by_id)]
        self.chat_template: str | None = config.get("chat_template")
        self.template_tokens = {name: _content(config.get(name)) for name in
                                ("bos_token", "eos_token", "unk_token", "pad_token")}

    @property
    def n_vocab(self) -> int:
        return max(self._by_id, default=-1) + 1

    def encode(self, text: str, allowed_special: Collection[str] | Literal["all"] = "all",
               add_special_tokens: bool = True) -> list[int]:
        """Ids of `text` as transformers' `tokenizer.encode(text)` gives them: special-token strings
        parsed (`allowed_special=()` keeps them plain text) and the post-processor's ids added."""
        if self.bpe is not None:
            ids = self.bpe.encode(text, allowed_special=allowed_special)
            return self.prefix + ids if add_special_tokens else ids
        if allowed_special not in ("all", ()):
            raise ValueError("the tokenizers backend parses all special tokens or none (allowed_special 'all' or ())")
        library = self.library if allowed_special == "all" else self._plain
        return library.encode(text, add_special_tokens=add_special_tokens).ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if self.bpe is not None:
            return self.bpe.decode_bytes(ids)
        ids = list(ids)
        try:
            return b"".join(self._by_id[i] for i in ids)
        except (KeyError, TypeError):
            bad = next(i for i in ids if i not in self._by_id)
            raise ValueError(f"token id {bad!r} is not in {self.path} (n_vocab {self.n_vocab})") from None

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _content(token: str | dict | None) -> str | None:
    """tokenizer_config.json writes a token as its string or as {"content": ..., ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _prefix(post_processor: dict | None, ids: dict[str, int]) -> list[int] | None:
    """The ids a post-processor puts before a single text: [] for none or ByteLevel, the special
    tokens before the sequence of a TemplateProcessing; None for anything else (not representable)."""
    if post_processor is None or post_processor.get("type") == "ByteLevel":
        return []
    if post_processor.get("type") == "Sequence":
        parts = [_prefix(p, ids) for p in post_processor.get("processors", [])]
        return None if None in parts else [i for p in parts for i in p]
    if post_processor.get("type") == "TemplateProcessing":
        prefix = []
        for item in post_processor.get("single", []):
            if "Sequence" in item:
                break
            prefix.append(ids.get(item.get("SpecialToken", {}).get("id")))
        else:
            return None
        if None in prefix or list(post_processor["single"][-1]) != ["Sequence"]:
            return None  # something after the text: leave it to the library
        return prefix
    return None


def _merges_follow_ranks(model: dict) -> bool:
    """Whether the BPE's merge list is in the order of the ids of the tokens each merge makes, so
    that merging by list position (the library) and by the merged token's rank (ours, tiktoken's)
    pick the same pair."""
    vocab, last = model.get("vocab") or {}, -1
    for merge in model.get("merges") or []:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        made = vocab.get(a + b)
        if made is None or made < last:
            return False
        last = made
    return True


def load_hf_tokenizer(folder: str | os.PathLike) -> HFTokenizer:
    """The folder's tokenizer.json (and tokenizer_config.json, when there) on our BPE where that is
    exact, else on the `tokenizers` library; the choice and its reason are logged. Errors name the file."""
    from tokenizers import Tokenizer

    from pipeline.hf import tokenizer_from_hf
    from pipeline.tokenizer.chat_template import compile_template

    folder = Path(folder)
    path, config_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the folder's tokenizer; slow tokenizers without "
                                "tokenizer.json are not read)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        library = Tokenizer.from_file(str(path))
    except Exception as e:  # the library's own errors are plain Exceptions
        raise ValueError(f"{path}: not a tokenizer the `tokenizers` library reads ({e})") from e
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{config_path}: not readable JSON ({e})") from e
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one serves chat
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (folder / "chat_template.jinja").is_file():  # where transformers 5 saves it
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None:
        import jinja2

        try:
            compile_template(template)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"{folder}: the chat template does not compile ({e})") from e
    config = {**config, "chat_template": template}
    decoder = (data.get("decoder") or {}).get("type")
    if decoder != "ByteLevel":
        raise ValueError(f"{path}: decoder {decoder!r}; only byte-level tokenizers (decoder ByteLevel: GPT-2, "
                         "Llama 3, Qwen2) are served, whose text is the concatenation of their tokens' bytes")
    added = data.get("added_tokens", [])
    why = None
    if data.get("normalizer") is not None:
        why = f"normalizer {data['normalizer'].get('type')}"
    elif any(not t.get("special") for t in added):
        why = "added tokens that are not special"
    if why is None and not _merges_follow_ranks(data.get("model") or {}):
        why = "merges not in the order of the tokens they make (the library merges by list order, ours by rank)"
    prefix = _prefix(data.get("post_processor"), {t["content"]: t["id"] for t in added})
    if why is None and prefix is None:
        why = f"post-processor {data['post_processor'].get('type')}"
    bpe = None
    if why is None:
        try:
            bpe = tokenizer_from_hf(path)
        except ValueError as e:
            why = str(e).removeprefix(f"{path}: ")
    if bpe is not None:
        ours, theirs = bpe.encode(PROBE, allowed_special="all"), library.encode(PROBE, add_special_tokens=False).ids
        if ours != theirs:
            why = "it encodes the probe text differently"
            bpe = None
    if bpe is None:
        log.info("%s: tokenizer on the `tokenizers` library (our BPE is not exact here: %s)", path, why)
        return HFTokenizer(path, library, [], config)
    log.info("%s: tokenizer on our BPE (exact: byte-level BPE with ignore_merges, same ids on the probe)", path)
    return HFTokenizer(path, bpe, prefix, config)
