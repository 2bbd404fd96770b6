"""The API fields OpenAI and vLLM clients send (pipeline/inference/server.py): stop strings, batched
prompts, n, logprobs, echo, chat message shapes, penalties, /tokenize and /detokenize, the API key
and the full queue; through the real `openai` client (or the raw HTTP a client sends) against
uvicorn, checked against the engine and the model itself."""

from __future__ import annotations

import json
import random

import openai
import pytest
import torch

from pipeline.eval.loss import token_logprobs
from pipeline.eval.multiple_choice import Question, encode_pair, evaluate
from pipeline.inference import Engine, SamplingParams
from pipeline.tokenizer.bpe import ASSISTANT_END
from pipeline.tokenizer.chat import render_prompt
from test_inference_engine import one_thread  # noqa: F401 (an autouse fixture: one torch thread)
from test_inference_server import assert_openai_error, greedy_text, model, serve, served, tokenizer, wait_idle  # noqa: F401

PROMPT = "Once upon a time, there was a"


def model_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 under one plain forward, over the real vocabulary."""
    logits = model(torch.tensor([ids[:-1]]))
    return token_logprobs(logits, torch.tensor([ids[1:]]), model.config.vocab_size)[0]


def streamed(stream) -> list[str]:
    return [c.choices[0].text for c in stream]


# --- stop strings --------------------------------------------------------------------------------

def test_stop_strings_cut_the_reply_and_a_stream_never_sends_what_it_withdraws(served, model, tokenizer):
    """A stop string ends the reply without being in it (vLLM), with finish_reason "stop", in
    completions and chat; every prefix a stream has sent is a prefix of the final reply, so the
    start of a stop string is never sent, even one that a later token completes or never does."""
    full, ids = greedy_text(model, tokenizer, PROMPT, 24)
    pieces = [tokenizer.decode([t]) for t in ids]
    k = next(k for k in range(2, len(ids) - 2) if pieces[k].strip() and pieces[k + 1].strip()
             and pieces[k] + pieces[k + 1] in full)
    stop = pieces[k] + pieces[k + 1]  # spans two tokens: the first alone must be held back
    expected = full[:full.index(stop)]
    r = served.client.completions.create(model="nano", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    for stops, final in [([stop], expected), ([stop + "\x00never"], full), (["\x00never", stop], expected)]:
        sent = ""
        for c in served.client.completions.create(model="nano", prompt=PROMPT, max_tokens=24, temperature=0,
                                                  stop=stops, stream=True):
            sent += c.choices[0].text
            assert final.startswith(sent), (sent, final)
        assert sent == final
    messages = [{"role": "user", "content": "Tell me a story."}]
    reply = served.client.chat.completions.create(model="nano", messages=messages, max_tokens=20,
                                                  temperature=0).choices[0].message.content
    cut = reply[3:6]
    r = served.client.chat.completions.create(model="nano", messages=messages, max_tokens=20, temperature=0, stop=[cut])
    assert r.choices[0].message.content == reply[:reply.index(cut)] and r.choices[0].finish_reason == "stop"
    wait_idle(served.engine)  # the stopped requests were finished in the engine too


# --- batched prompts and n --------------------------------------------------------------------

def test_batched_prompts_and_n_index_choices_as_openai(served, model, tokenizer):
    """A batch of texts, or of token-id lists, gives choice i x n + j for prompt i's sibling j,
    each the prompt's own completion; usage counts each prompt once."""
    prompts = [PROMPT, "The little dog"]
    single = [greedy_text(model, tokenizer, p, 8)[0] for p in prompts]
    for batch in (prompts, [tokenizer.encode(p) for p in prompts]):
        r = served.client.completions.create(model="nano", prompt=batch, max_tokens=8, temperature=0, n=2)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]
        assert [c.text for c in r.choices] == [single[0], single[0], single[1], single[1]]
        assert r.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)
        assert r.usage.completion_tokens == 4 * 8
    chunks = list(served.client.completions.create(model="nano", prompt=prompts, max_tokens=8, temperature=0,
                                                   stream=True))
    assert ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in (0, 1)] == single


def test_n_siblings_share_the_prompts_kv_blocks(served, tokenizer):
    """n = 3 siblings prefill their prompt's full blocks once: the other two take them from the
    prefix cache (engine stats), and compute only the last token; seeded, they differ from each
    other and repeat from one request to the next."""
    engine = served.engine
    prompt = [random.Random(7).randrange(256) for _ in range(33)]  # a prompt no other test sends
    full_blocks = (len(prompt) - 1) // engine.blocks.block_size  # the last token is always computed
    wait_idle(engine)
    hit, computed = engine.stats.prefix_blocks_hit, engine.stats.prompt_tokens_computed
    r = served.client.completions.create(model="nano", prompt=prompt, max_tokens=6, n=3, temperature=1.0, seed=5)
    wait_idle(engine)
    assert engine.stats.prefix_blocks_hit - hit == 2 * full_blocks == 8
    assert engine.stats.prompt_tokens_computed - computed == len(prompt) + 2 * (len(prompt) - 8 * full_blocks)
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1
    again = served.client.completions.create(model="nano", prompt=prompt, max_tokens=6, n=3, temperature=1.0, seed=5)
    assert [c.text for c in again.choices] == texts


# --- logprobs and echo ----------------------------------------------------------------------------

def test_completion_logprobs_are_the_models(served, model, tokenizer):
    """logprobs=k: each token's log-probability under the model (real vocabulary), the k most
    likely with it (the chosen one among them when greedy), offsets into the text; the same
    streamed."""
    ids = tokenizer.encode(PROMPT)
    r = served.client.completions.create(model="nano", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3,
                                         extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    out = Engine(model, max_batch_size=1).generate([ids], SamplingParams(temperature=0, max_tokens=10,
                                                                         ignore_eos=True))[0].token_ids
    assert lp.tokens == [tokenizer.decode([t]) for t in out]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), model_logprobs(model, ids + out)[-10:],
                               atol=1e-4, rtol=0)
    seq = ids + out
    logp = model(torch.tensor([seq[:-1]]))[0, -10:, :model.config.vocab_size].log_softmax(-1)
    for token, value, top, row in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, logp):
        assert top[token] == value == max(top.values())  # greedy: the token is the most likely
        assert set(top) == {tokenizer.decode([i]) for i in row.topk(3).indices.tolist()}  # two ids may share a string
    assert lp.text_offset == [sum(map(len, lp.tokens[:j])) for j in range(10)]
    chunks = list(served.client.completions.create(model="nano", prompt=PROMPT, max_tokens=10, temperature=0,
                                                   logprobs=3, stream=True, extra_body={"ignore_eos": True}))
    assert [t for c in chunks for t in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    assert [t for c in chunks for t in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_chat_logprobs_in_openais_content_shape(served, model, tokenizer):
    """logprobs: true, top_logprobs: 2: one entry per generated token (its text, exact bytes and
    the model's log-probability) with the two most likely, greedy's choice first."""
    messages = [{"role": "user", "content": "Tell me a story."}]
    ids = render_prompt(tokenizer, messages)
    out = Engine(model, max_batch_size=1, stop_token_ids=[tokenizer.eos_id, tokenizer.special_tokens[ASSISTANT_END]]
                 ).generate([ids], SamplingParams(temperature=0, max_tokens=8))[0].token_ids
    r = served.client.chat.completions.create(model="nano", messages=messages, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert [bytes(c.bytes) for c in content] == [tokenizer.decode_bytes([t]) for t in out]
    for c in content:
        assert bytes(c.bytes).decode("utf-8", errors="replace") == c.token and len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob and c.top_logprobs[0].bytes == c.bytes
    torch.testing.assert_close(torch.tensor([c.logprob for c in content]),
                               model_logprobs(model, ids + out)[-len(out):], atol=1e-4, rtol=0)
    chunks = list(served.client.chat.completions.create(model="nano", messages=messages, max_tokens=8, temperature=0,
                                                        logprobs=True, top_logprobs=2, n=2, stream=True))
    for i in (0, 1):  # each sibling streams the same greedy reply and log-probabilities under its own index
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == r.choices[0].finish_reason
        assert "".join(c.delta.content or "" for c in mine) == r.choices[0].message.content
        torch.testing.assert_close(torch.tensor([e.logprob for c in mine if c.logprobs for e in c.logprobs.content]),
                                   torch.tensor([c.logprob for c in content]), atol=1e-5, rtol=0)  # another batch
    assert served.client.chat.completions.create(model="nano", messages=messages, max_tokens=3).choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        served.client.chat.completions.create(model="nano", messages=messages, max_tokens=3, top_logprobs=2)


def test_echo_with_prompt_logprobs_as_lm_eval_asks(served, model, tokenizer):
    """lm-evaluation-harness's local-completions loglikelihood request, as it sends it: a batch of
    token-id prompts, echo, logprobs 1, max_tokens 1, temperature 0, seed. Each choice's text
    starts with its prompt; token_logprobs are null for the first prompt token, then the
    model's log-probability of every prompt token (a prompt already in the prefix cache is
    computed again), then the generated token's."""
    prompts = [tokenizer.encode(PROMPT), tokenizer.encode("The little dog ran to the park")]
    served.client.completions.create(model="nano", prompt=prompts[0], max_tokens=1)  # now in the prefix cache
    body = {"model": "nano", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    r = served.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    for ids, c in zip(prompts, choices):
        lp = c["logprobs"]
        assert c["text"].startswith(tokenizer.decode(ids)) and len(lp["tokens"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:len(ids)]), model_logprobs(model, ids),
                                   atol=1e-4, rtol=0)
        for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert top[token] == value and len(top) in (1, 2)  # the most likely, and the token itself
        assert lp["text_offset"][1] == len(tokenizer.decode(ids[:1]))
    text = served.client.completions.create(model="nano", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert text.choices[0].text == PROMPT + greedy_text(model, tokenizer, PROMPT, 4)[0]


# --- chat message shapes -----------------------------------------------------------------------

def test_openai_chat_message_shapes(served):
    """Content as text parts, `name`, the developer role, an assistant turn of null content: each
    rendered as its plain equivalent; an image part or a tool call is a 400 naming it."""
    def reply(messages):
        return served.client.chat.completions.create(model="nano", messages=messages, max_tokens=8,
                                                     temperature=0).choices[0].message.content
    plain = reply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me\na story."},
                   {"role": "assistant", "content": ""}, {"role": "user", "content": "Go on."}])
    assert reply([{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Tell me"},
                                                              {"type": "text", "text": "a story."}]},
                  {"role": "assistant", "content": None}, {"role": "user", "content": "Go on."}]) == plain
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    for message, where in [({"role": "user", "content": [{"type": "text", "text": "hi"}, image]}, "messages[0].content[1]"),
                           ({"role": "user", "content": "hi", "tool_calls": []}, "messages[0].tool_calls"),
                           ({"role": "user", "content": None}, "content must be a string")]:
        r = served.http.post("/v1/chat/completions", json={"messages": [message], "max_tokens": 2})
        assert_openai_error(r, 400, "messages", where)


# --- penalties --------------------------------------------------------------------------------------

def test_presence_and_frequency_penalties_reach_the_sampler(served, model, tokenizer):
    """The server's reply is the engine's under the same penalties, and they change it."""
    ids = tokenizer.encode(PROMPT)
    plain = served.client.completions.create(model="nano", prompt=PROMPT, max_tokens=20, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text
    for penalties in ({"presence_penalty": 2.0}, {"frequency_penalty": 1.5}):
        out = Engine(model, max_batch_size=1).generate([ids], SamplingParams(
            temperature=0, max_tokens=20, ignore_eos=True, **penalties))[0].token_ids
        r = served.client.completions.create(model="nano", prompt=PROMPT, max_tokens=20, temperature=0,
                                             extra_body={"ignore_eos": True}, **penalties)
        assert r.choices[0].text == tokenizer.decode([t for t in out if t not in tokenizer.special_tokens.values()])
        assert r.choices[0].text != plain, penalties


# --- /tokenize, /detokenize ------------------------------------------------------------------------

def test_tokenize_and_detokenize_as_vllm(served, tokenizer):
    r = served.http.post("/tokenize", json={"model": "nano", "prompt": PROMPT, "add_special_tokens": False,
                                            "return_token_strs": True}).json()
    ids = tokenizer.encode(PROMPT)
    assert r["tokens"] == ids and r["count"] == len(ids) and r["max_model_len"] == 64
    assert "".join(r["token_strs"]).replace("\u0120", " ") == PROMPT  # byte-level strings, as HF's tokens
    assert served.http.post("/tokenize", json={"prompt": "hi"}).json()["token_strs"] is None
    messages = [{"role": "user", "content": "Tell me a story."}]
    chat = served.http.post("/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == render_prompt(tokenizer, messages)
    assert served.http.post("/detokenize", json={"model": "nano", "tokens": ids}).json() == {"prompt": PROMPT}
    assert_openai_error(served.http.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens", "not in this tokenizer")
    assert_openai_error(served.http.post("/detokenize", json={"tokens": "abc"}), 400, "tokens")
    assert_openai_error(served.http.post("/tokenize", json={"prompt": "hi", "x": 1}), 400, "x", "unknown field")
    assert_openai_error(served.http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}),
                        400, "add_generation_prompt")
    assert_openai_error(served.http.post("/tokenize", json={"model": "other", "prompt": "hi"}), 404, "model")


# --- API key, full queue --------------------------------------------------------------------------

@pytest.mark.parametrize("protect_health_metrics", [False, True])
def test_api_key_is_required_as_a_bearer_token(model, tokenizer, protect_health_metrics):
    s = serve(model, tokenizer, api_key="sekrit", protect_health_metrics=protect_health_metrics)
    try:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            s.client.completions.create(model="nano", prompt="hi", max_tokens=2)
        for path, body in [("/v1/completions", {"prompt": "hi"}), ("/tokenize", {"prompt": "hi"})]:
            assert_openai_error(s.http.post(path, json=body, headers={"Authorization": "Bearer sekri"}), 401)
        keyed = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
        assert keyed.completions.create(model="nano", prompt="hi", max_tokens=2).choices[0].finish_reason
        assert [m.id for m in keyed.models.list().data] == ["nano"]
        for path in ("/health", "/metrics"):
            assert s.http.get(path).status_code == (401 if protect_health_metrics else 200)
            assert s.http.get(path, headers={"Authorization": "Bearer sekrit"}).status_code == 200
        text = s.http.get("/metrics", headers={"Authorization": "Bearer sekrit"}).text
        assert 'handler="/v1/completions",method="POST",status="401"' in text
    finally:
        s.close()


def test_full_queue_answers_429_with_retry_after_and_counts_it(model, tokenizer):
    s = serve(model, tokenizer, max_waiting=0)
    try:
        for _ in range(3):
            r = s.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert_openai_error(r, 429, None, "queue is full")
            assert r.headers["retry-after"] == "1"
        assert s.metrics()["wetstone:requests_rejected_total[('reason', 'queue_full')]"] == 3
    finally:
        s.close()
    s = serve(model, tokenizer, max_waiting=2)  # a request of more choices than may ever wait: 400
    try:
        assert_openai_error(s.http.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2}), 400, "n", "at most 2")
        assert json.loads(s.http.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 2}).text)["choices"]
    finally:
        s.close()


# --- lm-evaluation-harness's requests -----------------------------------------------------------

def test_lm_eval_loglikelihood_requests_score_as_the_in_process_eval(served, model, tokenizer, stories):
    """The loglikelihood requests lm-evaluation-harness's `local-completions` sends (its
    `_create_payload`: a batch of token-id prompts, echo, logprobs 1, max_tokens 1, temperature
    0, seed 1234), read as its `parse_logprobs` reads them (token_logprobs[ctxlen:-1] summed, in
    choice-index order): every choice's sum and every question's pick are those of
    pipeline.eval.multiple_choice on the same questions (benchmarks/peer_check_lm_eval_server.py
    runs lm-eval itself)."""
    items = []
    for k, story in enumerate(stories[:12]):
        words = story.split()
        options = [" " + w for w in (words[8], words[20], words[30], words[40])]
        items.append(Question(" ".join(words[:8]), options[k % 4:] + options[:k % 4], (4 - k % 4) % 4))
    ours = evaluate(model, tokenizer, items)
    pairs = [encode_pair(tokenizer, q.context, c) for q in items for c in q.choices]
    sums = []
    for first in range(0, len(pairs), 5):  # lm-eval's --batch_size 5
        batch = pairs[first:first + 5]
        body = {"model": "nano", "prompt": [ctx + cont for ctx, cont in batch], "temperature": 0, "max_tokens": 1,
                "logprobs": 1, "seed": 1234, "echo": True}
        r = served.http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        for choice, (ctx, _) in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), batch):
            sums.append(sum(choice["logprobs"]["token_logprobs"][len(ctx):-1]))
    torch.testing.assert_close(torch.tensor(sums, dtype=torch.float64),
                               torch.tensor([s for o in ours for s in o["sums"]], dtype=torch.float64), atol=1e-4, rtol=0)
    picks = [max(range(4), key=lambda c: sums[4 * i + c]) for i in range(len(items))]
    assert [float(p == q.answer) for p, q in zip(picks, items)] == [o["acc"] for o in ours]
