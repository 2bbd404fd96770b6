"""The chat template: a conversation -> token ids, and the mask of the tokens SFT trains on.

    <|endoftext|><|user_start|>What is 2 + 3?<|user_end|><|assistant_start|>2 + 3 = 5<|assistant_end|>
                                                                            ^^^^^^^^^^^^^^^^^^^^^^^^^^^^ mask 1

- <|endoftext|> comes first: it separates documents in pretraining, so it is the model's "start".
- `messages` is a list of {"role": "system" | "user" | "assistant", "content": str}. An optional
  system message may come first only; it is folded into the first user turn (nanochat does the
  same), separated by a blank line, so the template needs no system token. After it, turns
  alternate user, assistant, user, ... starting with a user turn.
- The mask is 1 exactly on assistant content and its closing <|assistant_end|> (the model learns to
  answer and to stop), 0 on everything else, <|assistant_start|> included (it is given, not
  predicted, at generation time).
- Content is encoded with no special token allowed, so a user typing "<|user_end|>" gets plain
  text tokens and cannot forge a turn.
- `render_prompt` is the generation form: the conversation ending with a user turn, then
  <|assistant_start|>; generation stops at <|assistant_end|>.
"""

from __future__ import annotations

from pipeline.tokenizer.bpe import ASSISTANT_START, CHAT_SPECIAL_TOKENS, BPETokenizer

ROLES = ("system", "user", "assistant")


def check_messages(messages: list[dict], last: str) -> list[dict]:
    """The user/assistant turns of a well-formed conversation ending with a `last` turn, a leading
    system message folded into the first user turn. Raises ValueError naming the bad message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"a conversation is a non-empty list of messages, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise ValueError(f"message {i}: must be a dict with exactly 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ROLES:
            raise ValueError(f"message {i}: unknown role {message['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {i}: content must be a string, got {type(message['content']).__name__}")
    turns = [dict(m) for m in messages]
    if turns[0]["role"] == "system":
        if len(turns) == 1:
            raise ValueError("message 0: a system message alone is no conversation (a user message must follow)")
        if turns[1]["role"] != "user":
            raise ValueError(f"message 1: role {turns[1]['role']!r} after the system message; a user message must follow it")
        turns[1]["content"] = turns[0]["content"] + "\n\n" + turns[1]["content"]
        turns = turns[1:]
    offset = len(messages) - len(turns)  # index in `messages` of turns[0]
    for i, turn in enumerate(turns):
        expected = ("user", "assistant")[i % 2]
        if turn["role"] != expected:
            where = "only first" if turn["role"] == "system" else f"{expected} expected (turns alternate, user first)"
            raise ValueError(f"message {offset + i}: role {turn['role']!r} out of place: {where}")
    if turns[-1]["role"] != last:
        raise ValueError(f"message {len(messages) - 1}: the conversation must end with a {last!r} turn, "
                         f"not {turns[-1]['role']!r}")
    return turns


def _special_ids(tokenizer: BPETokenizer) -> list[int]:
    """Ids of CHAT_SPECIAL_TOKENS: <|endoftext|>, then user start/end, then assistant start/end."""
    missing = [s for s in CHAT_SPECIAL_TOKENS if s not in tokenizer.special_tokens]
    if missing:
        raise ValueError(f"the tokenizer lacks the chat special tokens {missing}: train it with them in "
                         f"tokenizer.special_tokens (it has {sorted(tokenizer.special_tokens)})")
    return [tokenizer.special_tokens[s] for s in CHAT_SPECIAL_TOKENS]


def _render(tokenizer: BPETokenizer, turns: list[dict]) -> tuple[list[int], list[int]]:
    eot, user_start, user_end, assistant_start, assistant_end = _special_ids(tokenizer)
    ids, mask = [eot], [0]
    for turn in turns:
        content = tokenizer.encode(turn["content"])  # no specials allowed: injection-safe
        if turn["role"] == "user":
            ids += [user_start, *content, user_end]
            mask += [0] * (len(content) + 2)
        else:
            ids += [assistant_start, *content, assistant_end]
            mask += [0] + [1] * (len(content) + 1)
    return ids, mask


def render_conversation(tokenizer: BPETokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, mask) of a whole conversation ending with an assistant turn; mask[i] == 1 exactly on
    the assistant tokens SFT trains on (content and <|assistant_end|>)."""
    return _render(tokenizer, check_messages(messages, last="assistant"))


def render_prompt(tokenizer: BPETokenizer, messages: list[dict]) -> list[int]:
    """Ids of a conversation ending with a user turn, then <|assistant_start|>: what the model
    continues at generation time (stopping at <|assistant_end|>)."""
    ids, _ = _render(tokenizer, check_messages(messages, last="user"))
    return ids + [tokenizer.special_tokens[ASSISTANT_START]]
