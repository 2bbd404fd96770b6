"""export-hf: one of our final.pt models as a Hugging Face folder that `transformers` loads.

    python -m pipeline export-hf --model results/sample/pretrain/tiny/final.pt \\
        --tokenizer results/sample/tokenizer/tokenizer.json --out results/sample/export/pretrain/tiny

writes into <out>: model.safetensors and config.json (`GPT2LMHeadModel`), tokenizer.json,
tokenizer_config.json (with the chat template when the tokenizer has the chat tokens) and
special_tokens_map.json, and manifest.json. `AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` load it, and so do lm-evaluation-harness (`--model hf
--model_args pretrained=<out>`) and vLLM.

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
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from pipeline.artifacts import write_manifest
from pipeline.model.gpt import GPT, GPTConfig, load_final
from pipeline.tokenizer.bpe import (ASSISTANT_END, ASSISTANT_START, CHAT_SPECIAL_TOKENS, ENDOFTEXT, USER_END,
                                    USER_START, BPETokenizer)

log = logging.getLogger(__name__)

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


def hf_state_dict(model: GPT, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our weights under GPT2LMHeadModel's names: Linear weights transposed for Conv1D, the
    vocabulary cut to `vocab_size` rows, absent biases as zeros."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {"transformer.wte.weight": state["wte.weight"][:vocab_size],
                                    "transformer.wpe.weight": state["wpe.weight"]}
    names = {"ln_f": "transformer.ln_f"}
    for i in range(model.config.n_layer):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names[f"blocks.{i}.{part}"] = f"transformer.h.{i}.{part}"
    for ours, theirs in names.items():
        weight = state[f"{ours}.weight"]
        out[f"{theirs}.weight"] = weight.t() if weight.dim() == 2 else weight
        bias = state.get(f"{ours}.bias")
        out[f"{theirs}.bias"] = bias if bias is not None else torch.zeros(weight.size(0))
    out["lm_head.weight"] = out["transformer.wte.weight"]  # tied
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_model(model: GPT, vocab_size: int, eos_id: int):
    """A GPT2LMHeadModel holding our weights (strict load: every name must map)."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(hf_config(model.config, vocab_size, eos_id))
    hf.load_state_dict(hf_state_dict(model, vocab_size), strict=True)
    hf.tie_weights()
    return hf.eval()


# --- the tokenizer ---------------------------------------------------------------------------------

def onig_pattern(pattern: str) -> str:
    """Our regex in the dialect of `tokenizers` (Oniguruma, Ruby syntax), where `x{1,3}+` is not
    possessive but a repeat of a repeat (any number of digits): write it as the atomic group
    `(?>x{1,3})`, which is what possessive means. `++`, `*+` and `?+` are possessive there too."""
    return re.sub(r"(\\p\{\w+\}|\[[^\]]*\]|\\.|[^\\])(\{\d+(?:,\d*)?\})\+", r"(?>\1\2)", pattern)


def hf_tokenizer(tokenizer: BPETokenizer):
    """Our BPE as a transformers fast tokenizer (see the module docstring), specials included and
    the chat template set when the chat tokens exist."""
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
                                   model_max_length=None, clean_up_tokenization_spaces=False,
                                   chat_template=CHAT_TEMPLATE if chat else None)


# --- the stage -------------------------------------------------------------------------------------

def export_hf(model_path: str | os.PathLike, tokenizer_path: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the HF folder at `out` (built beside it, then renamed into place) with a manifest."""
    out = Path(out)
    model, checkpoint = load_final(model_path)
    tokenizer = BPETokenizer.load(tokenizer_path)
    vocab_size = model.config.vocab_size
    if tokenizer.n_vocab != vocab_size:
        raise ValueError(f"{tokenizer_path}: {tokenizer.n_vocab} ids, but {model_path} was trained on a "
                         f"vocabulary of {vocab_size}; export the model with the tokenizer it was trained with")
    hf = hf_model(model, vocab_size, tokenizer.special_tokens.get(ENDOFTEXT))
    hf_tok = hf_tokenizer(tokenizer)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != "manifest.json")
    metrics = {"architecture": "GPT2LMHeadModel", "vocab_size": vocab_size,
               "padded_rows_dropped": model.config.padded_vocab_size - vocab_size,
               "params": sum(p.numel() for p in hf.parameters()), "step": checkpoint.get("step"),
               "chat_template": hf_tok.chat_template is not None}
    write_manifest(out / "manifest.json", stage="export-hf", config={"model_config": model.config.to_dict()},
                   inputs=[model_path, tokenizer_path], outputs={p: None for p in files}, metrics=metrics)
    log.info("exported %s as GPT2LMHeadModel (%d params, vocab %d) to %s", model_path, metrics["params"],
             vocab_size, out)
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="a final.pt (pretrain, sft or grpo)")
    parser.add_argument("--tokenizer", required=True, type=Path, help="the tokenizer.json it was trained with")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write (replaced whole)")


def run(args: argparse.Namespace) -> int:
    export_hf(args.model, args.tokenizer, args.out)
    return 0
