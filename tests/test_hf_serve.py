"""`serve --model <transformers folder>` for a Llama and a Qwen2 folder written by transformers'
save_pretrained, each with a tokenizer of its own kind: the Llama one our BPE represents exactly
(exported by pipeline/hf.py's hf_tokenizer, given Llama 3's BOS post-processor and chat template),
the Qwen2 one trained with the `tokenizers` library with an NFC normalizer, which only that library
runs. Chat templates render as `apply_chat_template`; the openai client gets transformers' greedy
text (pipeline/tokenizer/hf_tokenizer.py, pipeline/tokenizer/chat_template.py, pipeline/inference/serve.py)."""

from __future__ import annotations

import json

import openai
import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from pipeline.hf import hf_tokenizer
from pipeline.tokenizer.bpe import BPETokenizer
from pipeline.tokenizer.chat_template import chat_prompt_ids
from pipeline.tokenizer.hf_tokenizer import load_hf_tokenizer
from tests.test_hf_models import random_hf
from tests.test_inference_server import serve_process

# Llama 3's template, written with block tags on their own lines: trim_blocks and lstrip_blocks shape its text
LLAMA3_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if loop.first and message['role'] == 'system' %}
{{ '<|start_header_id|>system<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
    {% else %}
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{% endif %}"""
QWEN2_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'system' and loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Tell me a story about café 東京.  "},
                {"role": "assistant", "content": "Once upon a time."}, {"role": "user", "content": "Again <|eot_id|>!"}]


def llama_tokenizer(stories: list[str]):
    """Our BPE with Llama 3's special tokens, as a fast tokenizer, given its BOS post-processor."""
    ours = BPETokenizer.train(stories, 420, special_tokens=LLAMA3_SPECIALS)
    fast = hf_tokenizer(ours)
    bos = ours.special_tokens["<|begin_of_text|>"]
    fast.backend_tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])])
    fast.bos_token, fast.eos_token, fast.pad_token = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
    fast.chat_template = LLAMA3_TEMPLATE
    return fast


def qwen2_tokenizer(stories: list[str]):
    """A byte-level BPE trained by the `tokenizers` library, with Qwen2's NFC normalizer and regex."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(stories, trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                chat_template=QWEN2_TEMPLATE)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def folder(request, stories, tmp_path_factory):
    """(kind, transformers model, its tokenizer, folder) saved as transformers saves them."""
    kind = request.param
    tokenizer = llama_tokenizer(stories) if kind == "llama" else qwen2_tokenizer(stories)
    stop = tokenizer.convert_tokens_to_ids("<|eot_id|>" if kind == "llama" else "<|im_end|>")
    model = random_hf(kind, vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = [stop]
    path = tmp_path_factory.mktemp(kind) / kind
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return kind, model, transformers.AutoTokenizer.from_pretrained(path), path


def test_tokenizer_backend_and_ids_equal_transformers(folder, stories, caplog):
    kind, _, theirs, path = folder
    with caplog.at_level("INFO"):
        ours = load_hf_tokenizer(path)
    assert ours.backend == ("wetstone-bpe" if kind == "llama" else "tokenizers")
    assert ("on our BPE" if kind == "llama" else "normalizer NFC") in caplog.text
    texts = [*stories[:5], "Ünïcödé ﬁ café\u0301 東京 <|eot_id|> <|im_end|>  \n\n x", " leading space", ""]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text)  # BOS where the post-processor adds it, specials parsed
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids)
    assert ours.n_vocab == len(theirs)
    added = ours.encode("x")[:-1]
    assert added == ([ours.special_tokens["<|begin_of_text|>"]] if kind == "llama" else [])


def test_chat_template_renders_as_apply_chat_template(folder):
    _, _, theirs, path = folder
    ours = load_hf_tokenizer(path)
    for messages in (CONVERSATION, CONVERSATION[1:2], [{"role": "user", "content": "hi"}]):
        assert chat_prompt_ids(ours, messages) == theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                                              tokenize=True, return_dict=False)


def test_a_tokenizer_larger_than_the_embedding_is_refused(folder, tmp_path):
    """serve names the tokenizer that does not fit the model (the folder's model cut to fewer rows)."""
    import subprocess
    import sys

    kind, model, tokenizer, _ = folder
    small = random_hf(kind, vocab_size=len(tokenizer) - 10)
    small.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--model", str(tmp_path), "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"tokenizer.json: {len(tokenizer)} ids, but {tmp_path} has an embedding of {len(tokenizer) - 10}" in out.stderr


def test_serve_answers_the_openai_client_as_transformers_generates(folder, tmp_path):
    kind, model, tokenizer, path = folder
    eos = model.generation_config.eos_token_id

    @torch.no_grad()
    def transformers_text(ids: list[int], n: int) -> tuple[str, int]:
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos[0])[0, len(ids):].tolist()
        return tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True), len(out)

    with serve_process(["--model", str(path)], tmp_path / "serve.log") as (_, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == [kind]
        for prompt in ("Once upon a time", "The little dog"):
            text, n = transformers_text(tokenizer.encode(prompt), 10)
            reply = client.completions.create(model=kind, prompt=prompt, max_tokens=10, temperature=0)
            assert (reply.choices[0].text, reply.usage.completion_tokens) == (text, n)
        ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=False)
        text, n = transformers_text(ids, 10)
        reply = client.chat.completions.create(model=kind, messages=CONVERSATION, max_tokens=10, temperature=0)
        assert reply.usage.prompt_tokens == len(ids)
        assert (reply.choices[0].message.content, reply.usage.completion_tokens) == (text, n)

        # the fields lm-eval and other clients send, on this model: echo's prompt log-probs are transformers'
        ids = tokenizer.encode("Once upon a time, a little dog")
        reply = client.completions.create(model=kind, prompt=[ids], max_tokens=1, temperature=0, echo=True, logprobs=1)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        got = reply.choices[0].logprobs.token_logprobs
        assert got[0] is None
        assert got[1:len(ids)] == pytest.approx([logp[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4)
        full = client.completions.create(model=kind, prompt="The little dog", max_tokens=10, temperature=0).choices[0].text
        assert len(full) >= 4, full
        stop = full[len(full) // 2:len(full) // 2 + 2]
        reply = client.completions.create(model=kind, prompt="The little dog", max_tokens=10, temperature=0, stop=[stop])
        assert (reply.choices[0].text, reply.choices[0].finish_reason) == (full[:full.index(stop)], "stop")
        reply = client.completions.create(model=kind, prompt="The little dog", max_tokens=10, temperature=0, n=2)
        assert [c.text for c in reply.choices] == [full, full]
    log = (tmp_path / "serve.log").read_text()
    assert f"tokenizer backend {'wetstone-bpe' if kind == 'llama' else 'tokenizers'}" in log


def test_what_the_tokenizer_loader_cannot_serve_is_named(folder, tmp_path):
    """No chat template: chat is refused naming the folder. A SentencePiece-style (Metaspace)
    decoder, whose text is not its tokens' bytes side by side: refused naming the file. Special
    token strings read as text when asked, on either backend."""
    kind, _, tokenizer, path = folder
    ours = load_hf_tokenizer(path)
    plain = ours.encode("<|im_end|><|eot_id|>", allowed_special=(), add_special_tokens=False)
    assert plain == tokenizer.encode("<|im_end|><|eot_id|>", split_special_tokens=True, add_special_tokens=False)
    assert not set(plain) & set(ours.special_tokens.values())
    ours.chat_template = None
    with pytest.raises(ValueError, match=f"{path} has no chat template"):
        chat_prompt_ids(ours, [{"role": "user", "content": "hi"}])
    data = json.loads((path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**data, "decoder": {"type": "Metaspace", "replacement": "▁",
                                                                               "prepend_scheme": "always", "split": True}}))
    with pytest.raises(ValueError, match="tokenizer.json: decoder 'Metaspace'"):
        load_hf_tokenizer(tmp_path)
