"""export-hf: transformers loads our models as GPT2LMHeadModel with our logits, and AutoTokenizer
gives our ids; a rotary model and a mismatched tokenizer are refused with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_tokenizer_bpe import VARIED_TEXTS, wet_texts

from conftest import RESOURCES, seal
from pipeline.artifacts import verify
from pipeline.export_hf import export_hf
from pipeline.hf import hf_tokenizer, load_hf, tokenizer_from_hf
from pipeline.inference import Engine, SamplingParams
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.tokenizer.bpe import ASSISTANT_END, CHAT_SPECIAL_TOKENS, BPETokenizer
from pipeline.tokenizer.chat import render_conversation, render_prompt


@pytest.fixture(scope="module")
def corpus(stories) -> list[str]:
    """The tokenizer tests' varied texts, web pages in many languages, and stories."""
    return VARIED_TEXTS + wet_texts(20) + stories[:20]


@pytest.fixture(scope="module")
def chat_tokenizer(stories) -> BPETokenizer:
    return BPETokenizer.train(stories + wet_texts(20), 600, special_tokens=CHAT_SPECIAL_TOKENS)


def save_final(model: GPT, path: Path) -> Path:
    """A final.pt as the pretrain stage writes it (pipeline/train/engine.py export)."""
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict(), "step": 3,
                "vocab_size": model.config.vocab_size, "eos_id": model.config.vocab_size - 1}, path)
    return path


def tiny_gpt(vocab_size: int, seed: int = 0, **overrides) -> GPT:
    """A small GPT with random weights (biases and LayerNorms too, so a wrong mapping shows)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{"vocab_size": vocab_size, "seq_len": 64, "n_layer": 2, "n_head": 2,
                             "n_embd": 32, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("weight") or p.dim() == 1:
                p.normal_(0.0, 0.1) if name.endswith("bias") else p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_fast_tokenizer_ids_equal_ours(corpus, stories, pattern):
    tok = BPETokenizer.train(stories + wet_texts(20), 700, pattern=pattern)
    fast = hf_tokenizer(tok)
    for text in corpus:
        # the fast tokenizer always reads a special token's string as the token
        ours = tok.encode(text, allowed_special="all")
        assert fast(text, add_special_tokens=False)["input_ids"] == ours, f"{pattern}: {text[:60]!r}"
        assert fast.decode(ours) == tok.decode(ours)


def test_export_loads_in_transformers_with_our_logits(tmp_path, chat_tokenizer, stories):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    tok_path = tmp_path / "tokenizer.json"
    chat_tokenizer.save(tok_path)
    model = tiny_gpt(chat_tokenizer.n_vocab)
    assert model.config.padded_vocab_size > model.config.vocab_size  # the cut rows are exercised
    out = tmp_path / "hf"
    metrics = export_hf(*seal(save_final(model, tmp_path / "final.pt"), tok_path), out)
    assert metrics["vocab_size"] == chat_tokenizer.n_vocab and metrics["chat_template"]
    assert (out / "model.safetensors").exists()

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hf, GPT2LMHeadModel)
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = stories[0]
    ids = chat_tokenizer.encode(text)[:64]
    assert hf_tok(text, add_special_tokens=False)["input_ids"][:64] == ids
    inputs = {"real": torch.tensor([ids]), "random": torch.randint(0, chat_tokenizer.n_vocab, (3, 64))}
    for name, x in inputs.items():
        with torch.no_grad():
            ours = model(x)[..., :chat_tokenizer.n_vocab]
            theirs = hf(x).logits
        assert theirs.shape == ours.shape
        assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), f"{name}: max diff {(ours - theirs).abs().max()}"

    # the chat template renders conversations as render_conversation and render_prompt do
    conversations = [[{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."},
                      {"role": "assistant", "content": "Blue."}]]
    for messages in conversations:
        for prompt_only in (False, True):
            turns = messages[:-1] if prompt_only else messages
            text = hf_tok.apply_chat_template(turns, add_generation_prompt=prompt_only, tokenize=False)
            ours = render_prompt(chat_tokenizer, turns) if prompt_only else render_conversation(chat_tokenizer, turns)[0]
            assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours, text


def test_export_manifest_verifies(tmp_path, chat_tokenizer):
    tok_path = tmp_path / "tokenizer.json"
    chat_tokenizer.save(tok_path)
    out = tmp_path / "hf"
    export_hf(*seal(save_final(tiny_gpt(chat_tokenizer.n_vocab, bias=False), tmp_path / "final.pt"), tok_path), out)
    manifest = json.loads((out / "manifest.json").read_text())
    names = {entry["path"] for entry in manifest["outputs"]}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    checked, problems = verify(out)
    assert checked == len(names) and problems == []
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["vocab_size"] == chat_tokenizer.n_vocab


def test_rotary_model_is_refused(tmp_path, chat_tokenizer):
    tok_path = tmp_path / "tokenizer.json"
    chat_tokenizer.save(tok_path)
    final = save_final(tiny_gpt(chat_tokenizer.n_vocab, rope=True), tmp_path / "final.pt")
    with pytest.raises(ValueError, match="rotary.*not exportable as GPT2LMHeadModel"):
        export_hf(*seal(final, tok_path), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_tokenizer_of_another_vocabulary_is_refused(tmp_path, chat_tokenizer):
    tok_path = tmp_path / "tokenizer.json"
    chat_tokenizer.save(tok_path)
    final = save_final(tiny_gpt(chat_tokenizer.n_vocab + 1), tmp_path / "final.pt")
    with pytest.raises(ValueError, match="tokenizer.json: .* ids, but .*final.pt was trained on a vocabulary"):
        export_hf(*seal(final, tok_path), tmp_path / "hf")


def test_gpt2_files_convert_exactly(corpus):
    gpt2 = BPETokenizer.from_gpt2_files(RESOURCES / "gpt2" / "encoder.json", RESOURCES / "gpt2" / "vocab.bpe")
    fast = hf_tokenizer(gpt2)
    for text in corpus[:25]:
        assert fast(text, add_special_tokens=False)["input_ids"] == gpt2.encode(text, allowed_special="all")


@pytest.mark.parametrize("bias", [True, False])
def test_exported_folder_loads_back_as_our_gpt_and_tokenizer(tmp_path, chat_tokenizer, stories, bias):
    """load_hf and tokenizer_from_hf undo the export: the same logits on the real ids (the padded
    rows come back as zeros), the same tokenizer file, and load_final's metadata."""
    tok_path = tmp_path / "tokenizer.json"
    chat_tokenizer.save(tok_path)
    model = tiny_gpt(chat_tokenizer.n_vocab, bias=bias)
    out = tmp_path / "hf"
    export_hf(*seal(save_final(model, tmp_path / "final.pt"), tok_path), out)
    back, meta = load_hf(out)
    assert meta["eos_id"] == chat_tokenizer.eos_id and meta["vocab_size"] == chat_tokenizer.n_vocab
    assert back.config.padded_vocab_size == model.config.padded_vocab_size
    x = torch.tensor([chat_tokenizer.encode(stories[1])[:64]])
    with torch.no_grad():
        assert torch.equal(back(x)[..., :chat_tokenizer.n_vocab], model(x)[..., :chat_tokenizer.n_vocab])
    assert tokenizer_from_hf(out / "tokenizer.json").to_dict() == chat_tokenizer.to_dict()


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_tokenizer_round_trips_through_the_fast_tokenizer_file(tmp_path, stories, pattern):
    """Trained tokenizers of both regexes, and OpenAI's GPT-2 files: merges, ranks, regex and
    specials all come back (GPT-2's 50,000 merges too, recovered from the ranks alone)."""
    tokenizers = [BPETokenizer.train(stories + wet_texts(20), 700, pattern=pattern)]
    if pattern == "gpt2":
        tokenizers.append(BPETokenizer.from_gpt2_files(RESOURCES / "gpt2" / "encoder.json",
                                                       RESOURCES / "gpt2" / "vocab.bpe"))
    for i, tok in enumerate(tokenizers):
        hf_tokenizer(tok).save_pretrained(tmp_path / str(i))
        assert tokenizer_from_hf(tmp_path / str(i) / "tokenizer.json").to_dict() == tok.to_dict()


def test_load_hf_names_what_it_cannot_read(tmp_path, chat_tokenizer):
    tok_path = tmp_path / "tokenizer.json"
    chat_tokenizer.save(tok_path)
    out = tmp_path / "hf"
    export_hf(*seal(save_final(tiny_gpt(chat_tokenizer.n_vocab), tmp_path / "final.pt"), tok_path), out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="config.json: activation_function is 'relu'"):
        load_hf(out)
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_hf(out)
    with pytest.raises(FileNotFoundError, match="config.json: no such file"):
        load_hf(tmp_path)
    with pytest.raises(ValueError, match="tokenizer.json: not a byte-level BPE"):
        tokenizer_from_hf(tok_path)  # ours, not the fast tokenizer's file


def scripted_gpt(vocab_size: int, seq_len: int, script: dict[int, int]) -> GPT:
    """A GPT whose greedy choice at position p is script[p]: its blocks add nothing (zero output
    projections), so the last layer norm sees wte[token] + wpe[p], and wpe[p] is a large multiple
    of the scripted token's own embedding, which the tied head then scores highest."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab_size, seq_len=seq_len, n_layer=1, n_head=2, n_embd=64))
    with torch.no_grad():
        for block in model.blocks:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_(), proj.bias.zero_()
        model.wpe.weight.zero_()
        for position, token in script.items():
            model.wpe.weight[position] = 30 * model.wte.weight[token]
    return model.eval()


def test_generate_on_a_chat_prompt_stops_where_the_reply_ends(tmp_path, chat_tokenizer):
    """transformers' `generate` on the chat template's prompt ends at <|assistant_end|> (the
    exported generation_config lists it with <|endoftext|>), not at max_new_tokens; the tokenizer
    truncates to the context, so an over-long input still fits the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    messages = [{"role": "user", "content": "What is 12 + 7?"}]
    prompt = render_prompt(chat_tokenizer, messages)
    end = chat_tokenizer.special_tokens[ASSISTANT_END]
    reply = chat_tokenizer.encode("12 + 7 = 19") + [end]
    model = scripted_gpt(chat_tokenizer.n_vocab, 64, {len(prompt) - 1 + i: t for i, t in enumerate(reply)})
    greedy = SamplingParams(temperature=0.0, max_tokens=len(reply))
    assert Engine(model, max_batch_size=1).generate([prompt], greedy)[0].token_ids == reply  # the script holds
    tok_path = tmp_path / "tokenizer.json"
    chat_tokenizer.save(tok_path)
    out = tmp_path / "hf"
    export_hf(*seal(save_final(model, tmp_path / "final.pt"), tok_path), out)

    hf, hf_tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [end, chat_tokenizer.eos_id]
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = hf_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == prompt
    generated = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert generated[0, len(prompt):].tolist() == reply
    assert hf_tok.decode(generated[0, len(prompt):], skip_special_tokens=True) == "12 + 7 = 19"

    assert hf_tok.model_max_length == 64
    long = hf_tok(" ".join(["a long conversation"] * 100), truncation=True, return_tensors="pt")
    assert long["input_ids"].shape == (1, 64)
    assert hf(**long).logits.shape == (1, 64, chat_tokenizer.n_vocab)
