"""A conversation -> the prompt ids the model continues: through the folder's Jinja chat template
of an HF folder's tokenizer (tokenizer_config.json's or chat_template.jinja), rendered as
transformers' `apply_chat_template(messages, add_generation_prompt=True)` renders it (a folder
without one has no chat: a ValueError, which the server answers with a 400); for our own
BPETokenizer, our template (pipeline/tokenizer/chat.py's `render_prompt`).

The Jinja environment is transformers': sandboxed, `trim_blocks` and `lstrip_blocks`, loop
controls, its `tojson` (no HTML escaping), `raise_exception` and `strftime_now`; the template sees
`messages`, `add_generation_prompt` and the tokenizer's bos/eos/unk/pad token strings. The text it
renders is encoded with its special tokens parsed and nothing added (the template writes the BOS
itself), as transformers does.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.tokenizer.bpe import BPETokenizer
from pipeline.tokenizer.chat import render_prompt
from pipeline.tokenizer.hf_tokenizer import HFTokenizer


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat_text(template: str, messages: list[dict], tokens: dict[str, str | None],
                     add_generation_prompt: bool = True) -> str:
    """The template's text for `messages`; a template error (its own `raise_exception`, a message
    shape it cannot read) is a ValueError saying so."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"a conversation is a list of message objects, got {messages!r:.80}")
    try:
        return compile_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 tools=None, documents=None, **tokens)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the model's chat template refused the messages: {e}") from None
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"the model's chat template could not render the messages: {e!r}") from None


def chat_prompt_ids(tokenizer: BPETokenizer | HFTokenizer, messages: list[dict]) -> list[int]:
    """The prompt ids of a conversation ending with a user turn, ready for the assistant's reply."""
    if isinstance(tokenizer, BPETokenizer):  # our own template
        return render_prompt(tokenizer, messages)
    template = tokenizer.chat_template
    if template is None:
        raise ValueError(f"{tokenizer.path.parent} has no chat template (tokenizer_config.json's chat_template or "
                         "chat_template.jinja): the model has no chat format; use /v1/completions")
    text = render_chat_text(template, messages, tokenizer.template_tokens)
    return tokenizer.encode(text, allowed_special="all", add_special_tokens=False)
