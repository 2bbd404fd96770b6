"""Our GPT and tokenizer as a Hugging Face `GPT2LMHeadModel` and fast tokenizer, and back: what
the export_hf stage writes and what `serve --model <exported folder>` reads.

The mapping to GPT-2's layout:
- our blocks are GPT-2's: same names (wte, wpe, h.i.{ln_1, attn.c_attn, attn.c_proj, ln_2,
  mlp.c_fc, mlp.c_proj}, ln_f), the tanh GELU (`gelu_new`), LayerNorm eps 1e-5, 1/sqrt(head dim)
  attention scaling, and the tied output head;
- GPT-2's `Conv1D` keeps its weight as (in, out), our `nn.Linear` as (out, in): each is transposed;
- the padded vocabulary rows (ids >= vocab_size; never a target, masked by `generate`) are cut, so
  `vocab_size` is the tokenizer's and HF's `generate` can never pick an id the tokenizer lacks. Our
  eval scores over the same real ids (`pipeline.eval.loss.token_logprobs`), so log-probabilities
  match the exported model's exactly, not only its logits;
- a model without biases (`bias: false`) exports zero biases, which computes the same function;
- a rotary model is refused: GPT-2 has only learned positions, and no exact mapping to another
  transformers architecture is written yet (GPT-NeoX's `rotate_half` rotary with
  `use_parallel_residual=False` is the likely one).

The tokenizer is converted by transformers' own `TikTokenConverter` from our ranks written as a
tiktoken file (our tokenizer encodes exactly as tiktoken does): same regex, byte-level BPE with
`ignore_merges` (a whole piece that is a token is taken as is, tiktoken's rule), and merges for
every split of each token, so the fast tokenizer gives our ids.

Back (`load_hf`, `tokenizer_from_hf`: `python -m pipeline serve --model <exported folder>`): the
same name map read the other way, the weights through `safetensors` (no pickle), Conv1D weights
transposed back, the vocabulary padded again to a multiple of 64 with zero rows (padding ids are
masked wherever we sample or score, so their values never matter), biases kept even when all
zero (a `bias: false` model comes back as `bias: true` with zero biases: the same function). The
tokenizer comes back from tokenizer.json: byte-level tokens in id order are our ranks, each token
past the 256 bytes is the merge of the two older tokens tiktoken's rule splits it into, the regex
is ours again (the atomic groups back to possessive repeats), the added special tokens keep their
ids. Tested: the round trip gives back our tokenizer file and our logits exactly.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from pipeline.model.gpt import GPT, GPTConfig
from pipeline.tokenizer.bpe import (ASSISTANT_END, ASSISTANT_START, CHAT_SPECIAL_TOKENS, ENDOFTEXT, USER_END,
                                    USER_START, BPETokenizer, bpe_merge, str_to_token)

# The chat template as Jinja, rendering what `render_conversation` / `render_prompt`
# (pipeline/tokenizer/chat.py) render: <|endoftext|> first, a leading system message folded into
# the first user turn after a blank line, then the turns framed by their role tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}{% set ns.system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}" + USER_START + "{{ ns.system + message['content'] }}" + USER_END
    + "{% set ns.system = '' %}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT_START + "{{ message['content'] }}" + ASSISTANT_END
    + "{% else %}{{ raise_exception('roles are system (first only), user and assistant, not ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT_START + "{% endif %}"
)


# --- the model -------------------------------------------------------------------------------------

def hf_config(config: GPTConfig, vocab_size: int, eos_id: int):
    from transformers import GPT2Config

    if config.rope:
        raise ValueError("a rotary (rope: true) model is not exportable as GPT2LMHeadModel, which has only "
                         "learned positions; no exact mapping to another transformers architecture exists here")
    return GPT2Config(vocab_size=vocab_size, n_positions=config.seq_len, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
                      resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                      layer_norm_epsilon=1e-5, tie_word_embeddings=True,
                      bos_token_id=eos_id, eos_token_id=eos_id, architectures=["GPT2LMHeadModel"])


def hf_names(n_layer: int) -> dict[str, str]:
    """Our module names -> GPT2LMHeadModel's, for every module whose weight (transposed when 2-d:
    Linear vs Conv1D) and bias map one to one; the embeddings are mapped apart. The one
    definition of the mapping, read forwards by `hf_state_dict` and backwards by `gpt_state_dict`."""
    names = {"ln_f": "transformer.ln_f"}
    for i in range(n_layer):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names[f"blocks.{i}.{part}"] = f"transformer.h.{i}.{part}"
    return names


def hf_state_dict(model: GPT, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our weights under GPT2LMHeadModel's names: Linear weights transposed for Conv1D, the
    vocabulary cut to `vocab_size` rows, absent biases as zeros."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {"transformer.wte.weight": state["wte.weight"][:vocab_size],
                                    "transformer.wpe.weight": state["wpe.weight"]}
    for ours, theirs in hf_names(model.config.n_layer).items():
        weight = state[f"{ours}.weight"]
        out[f"{theirs}.weight"] = weight.t() if weight.dim() == 2 else weight
        bias = state.get(f"{ours}.bias")
        out[f"{theirs}.bias"] = bias if bias is not None else torch.zeros(weight.size(0))
    out["lm_head.weight"] = out["transformer.wte.weight"]  # tied
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_model(model: GPT, vocab_size: int, eos_id: int, stop_ids: list[int]):
    """A GPT2LMHeadModel holding our weights (strict load: every name must map) whose generation
    config stops at each of `stop_ids` (the chat turn's end and the document's)."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(hf_config(model.config, vocab_size, eos_id))
    hf.load_state_dict(hf_state_dict(model, vocab_size), strict=True)
    hf.tie_weights()
    hf.generation_config.eos_token_id = stop_ids or None
    hf.generation_config.pad_token_id = eos_id
    return hf.eval()


# --- the tokenizer ---------------------------------------------------------------------------------

# an atom (\p{..}, a [class], an escape or a character) and a counted repeat {m} / {m,} / {m,n}
COUNTED_REPEAT = r"(\\p\{\w+\}|\[[^\]]*\]|\\.|[^\\])(\{\d+(?:,\d*)?\})"


def onig_pattern(pattern: str) -> str:
    """Our regex in the dialect of `tokenizers` (Oniguruma, Ruby syntax), where `x{1,3}+` is not
    possessive but a repeat of a repeat (any number of digits): write it as the atomic group
    `(?>x{1,3})`, which is what possessive means. `++`, `*+` and `?+` are possessive there too."""
    return re.sub(COUNTED_REPEAT + r"\+", r"(?>\1\2)", pattern)


def ours_pattern(pattern: str) -> str:
    """`onig_pattern` undone: each atomic counted repeat `(?>x{1,3})` back to `x{1,3}+`."""
    return re.sub(r"\(\?>" + COUNTED_REPEAT + r"\)", r"\1\2+", pattern)


def hf_tokenizer(tokenizer: BPETokenizer, model_max_length: int | None = None):
    """Our BPE as a transformers fast tokenizer (see the module docstring), specials included, the
    chat template set when the chat tokens exist, and `model_max_length` (the model's context)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class FromRanks(TikTokenConverter):
        """The converter reads a tiktoken file into {token bytes: rank}; ours has that dict already."""

        def load_tiktoken_bpe(self, _: str) -> dict[bytes, int]:
            return tokenizer.ranks

    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.__getitem__)
    if [tokenizer.special_tokens[s] for s in specials] != list(range(len(tokenizer.vocab), tokenizer.n_vocab)):
        raise ValueError(f"special token ids {tokenizer.special_tokens} do not follow the {len(tokenizer.vocab)} "
                         f"ordinary ids without gaps; the fast tokenizer numbers added tokens that way")
    fast = FromRanks(pattern=onig_pattern(tokenizer.pattern), extra_special_tokens=specials).converted()
    chat = all(token in tokenizer.special_tokens for token in CHAT_SPECIAL_TOKENS)
    eos = ENDOFTEXT if ENDOFTEXT in tokenizer.special_tokens else None
    return PreTrainedTokenizerFast(tokenizer_object=fast, bos_token=eos, eos_token=eos, pad_token=eos,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False,
                                   chat_template=CHAT_TEMPLATE if chat else None)


# --- back: an exported folder as our GPT and tokenizer ---------------------------------------------

# config.json keys (GPT2Config's names) -> GPTConfig's; the rest must hold what hf_config writes
HF_SHAPE = {"vocab_size": "vocab_size", "n_positions": "seq_len", "n_layer": "n_layer", "n_head": "n_head",
            "n_embd": "n_embd"}
HF_FIXED = {"model_type": "gpt2", "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}


def gpt_config_from_hf(config: dict, where: str) -> GPTConfig:
    """Our GPTConfig from a GPT2LMHeadModel config.json; a key outside what we compute names itself."""
    missing = [k for k in HF_SHAPE if not isinstance(config.get(k), int)]
    if missing:
        raise ValueError(f"{where}: no integer {', '.join(missing)}: not a GPT-2 config")
    for key, value in HF_FIXED.items():
        if config.get(key, value) != value:
            raise ValueError(f"{where}: {key} is {config[key]!r}; our GPT computes only {key} = {value!r}")
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        raise ValueError(f"{where}: n_inner {config['n_inner']}; our MLP is 4 x n_embd = {4 * config['n_embd']} wide")
    return GPTConfig(**{ours: config[theirs] for theirs, ours in HF_SHAPE.items()}, bias=True,
                     dropout=float(config.get("resid_pdrop") or 0.0))


def gpt_state_dict(hf: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """`hf_state_dict` read backwards: GPT2LMHeadModel's weights under our names, Conv1D weights
    transposed, the vocabulary padded with zero rows to `config.padded_vocab_size`."""
    wte = torch.zeros(config.padded_vocab_size, config.n_embd, dtype=hf["transformer.wte.weight"].dtype)
    wte[:config.vocab_size] = hf["transformer.wte.weight"]
    state = {"wte.weight": wte, "lm_head.weight": wte, "wpe.weight": hf["transformer.wpe.weight"]}
    for ours, theirs in hf_names(config.n_layer).items():
        weight = hf[f"{theirs}.weight"]
        state[f"{ours}.weight"] = weight.t() if weight.dim() == 2 else weight
        state[f"{ours}.bias"] = hf[f"{theirs}.bias"]
    return state


def load_hf(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """An export-hf folder (config.json + model.safetensors) as our GPT in eval mode on `device`,
    and metadata shaped as `load_final`'s ("model_config", "vocab_size", "eos_id", "step": None).
    Errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (expected a folder written by export-hf)")
    try:
        hf_cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: not readable JSON ({e})") from e
    config = gpt_config_from_hf(hf_cfg, str(config_path))
    try:
        weights = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from e
    known = {f"{theirs}.{kind}" for theirs in hf_names(config.n_layer).values() for kind in ("weight", "bias")}
    unknown = sorted(set(weights) - known - {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"})
    if unknown:
        raise ValueError(f"{weights_path}: tensors our GPT has no place for: {', '.join(unknown[:5])}")
    head = weights.get("lm_head.weight")  # save_pretrained keeps a tied matrix once; if both are there, equal
    if head is not None and not torch.equal(head, weights.get("transformer.wte.weight", head)):
        raise ValueError(f"{weights_path}: lm_head.weight differs from transformer.wte.weight; ours are tied")
    model = GPT(config)
    try:
        model.load_state_dict(gpt_state_dict(weights, config), strict=True)
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{weights_path}: weights do not fit {config_path}: {e!r}") from e
    meta = {"model_config": config.to_dict(), "vocab_size": config.vocab_size, "eos_id": hf_cfg.get("eos_token_id"),
            "step": None}
    return model.to(device).eval(), meta


def tokenizer_from_hf(path: str | os.PathLike) -> BPETokenizer:
    """Our BPETokenizer from a tokenizer.json that `hf_tokenizer` wrote (see the module docstring);
    the file's own name is in every error."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable tokenizer file ({e})") from e
    model = data.get("model") or {}
    splits = [p for p in (data.get("pre_tokenizer") or {}).get("pretokenizers", [])
              if p.get("type") == "Split" and "Regex" in p.get("pattern", {})]
    if model.get("type") != "BPE" or not model.get("ignore_merges") or len(splits) != 1:
        raise ValueError(f"{path}: not a byte-level BPE with ignore_merges and one Split regex "
                         f"(the form export-hf writes; model.type {model.get('type')!r})")
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError(f"{path}: model.vocab ids are not 0..{len(by_id) - 1} without gaps")
    vocab = [str_to_token(s, f"{path} model.vocab[{i}]") for s, i in by_id]
    if any(len(token) != 1 for token in vocab[:256]):
        raise ValueError(f"{path}: ids 0..255 must be the 256 single bytes")
    # each later token is the merge of the two parts tiktoken's rule splits it into with the older tokens
    ranks, merges = {token: i for i, token in enumerate(vocab[:256])}, []
    for i, token in enumerate(vocab[256:], start=256):
        parts = bpe_merge(token, ranks)
        if len(parts) != 2:
            raise ValueError(f"{path}: model.vocab[{i}] {token!r} is not one merge of two older tokens "
                             f"(the older tokens split it into {len(parts)})")
        merges.append((parts[0], parts[1]))
        ranks[token] = i
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    return BPETokenizer(vocab, merges, ours_pattern(splits[0]["pattern"]["Regex"]), specials)
