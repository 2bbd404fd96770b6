"""Our GPT and tokenizer as a Hugging Face model and fast tokenizer, and transformers folders back
into our GPT: what the export_hf stage writes and what `serve --model <folder>` reads.

Architectures, one per set of our model's options (`hf_architecture`):
- `GPT2LMHeadModel`, the GPT-2 shape: same module names (wte, wpe, h.i.{ln_1, attn.c_attn,
  attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_f), the tanh GELU (`gelu_new`), LayerNorm eps
  1e-5, the tied output head; GPT-2's `Conv1D` keeps its weight as (in, out), our `nn.Linear` as
  (out, in): each is transposed; a model without biases (`bias: false`) exports zero biases,
  which computes the same function;
- `LlamaForCausalLM`, the Llama options (RMSNorm, SwiGLU, RoPE with Llama 3's scaling if any, GQA,
  tied or untied head, no biases), and `Qwen2ForCausalLM`, the same with q, k, v biases: our fused
  c_attn is their q, k, v projections side by side and our c_fc their gate and up projections;
- the padded vocabulary rows (ids >= vocab_size; never a target, masked by `generate`) are cut,
  so `vocab_size` is the tokenizer's and HF's `generate` can never pick an id the tokenizer lacks.
  Our eval scores over the same real ids (`pipeline.eval.loss.token_logprobs`), so
  log-probabilities match the exported model's exactly, not only its logits;
- anything else (rotary with LayerNorm, say) is refused, naming what does not fit.

The tokenizer is converted by transformers' own `TikTokenConverter` from our ranks written as a
tiktoken file (our tokenizer encodes exactly as tiktoken does): same regex, byte-level BPE with
`ignore_merges` (a whole piece that is a token is taken as is, tiktoken's rule), and merges for
every split of each token, so the fast tokenizer gives our ids.

Back (`load_hf`: `python -m pipeline serve --model <folder>`): a folder of any of the three
architectures, single or sharded safetensors (no pickle), read through the same name map the other
way, Conv1D weights transposed back, the vocabulary padded again to a multiple of 64 with zero rows
(padding ids are masked wherever we sample or score, so their values never matter), fp32. The
config is checked: an architecture, a feature (sliding window, experts, other RoPE
types, ...) or a tensor shape our model does not compute is an error naming it, never silently
different logits. GPT-2 biases are kept even when all zero (a `bias: false` model comes back as
`bias: true` with zero biases: the same function). `tokenizer_from_hf` reads a tokenizer.json back
into our BPETokenizer where it has our form: byte-level tokens in id order are our ranks, each
token past the 256 bytes is the merge of the two older tokens tiktoken's rule splits it into, the
regex is ours again (the atomic groups back to possessive repeats), the added special tokens keep
their ids (pipeline/tokenizer/hf_tokenizer.py decides when that is exact, else uses the
`tokenizers` library). Tested: the round trip gives back our tokenizer file and our logits
exactly; Llama and Qwen2 folders give transformers' logits (tests/test_hf_models.py).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from pipeline.model.gpt import GPT, LLAMA3_ROPE_SCALING, GPTConfig, gpt_from_state
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

def hf_architecture(config: GPTConfig) -> str:
    """The transformers class that computes exactly what `config` computes: GPT2LMHeadModel for the
    GPT-2 shape, LlamaForCausalLM for the Llama options, Qwen2ForCausalLM for those with q, k, v
    biases. Anything else is refused, naming what does not fit."""
    c, qkv_bias = config, config.bias if config.qkv_bias is None else config.qkv_bias
    if not c.rope:
        gpt2 = dict(norm="layernorm", mlp="gelu", tie_embeddings=True, n_kv_head=c.n_head, qkv_bias=c.bias,
                    mlp_hidden=4 * c.n_embd, norm_eps=1e-5)
        have = dict(norm=c.norm, mlp=c.mlp, tie_embeddings=c.tie_embeddings, n_kv_head=c.kv_head_count,
                    qkv_bias=qkv_bias, mlp_hidden=c.mlp_hidden, norm_eps=c.norm_eps)
        wrong = {k: v for k, v in have.items() if v != gpt2[k]}
        if wrong:
            raise ValueError(f"a model with learned positions exports as GPT2LMHeadModel, which needs {gpt2}; this "
                             f"one has {wrong}")
        return "GPT2LMHeadModel"
    llama = dict(norm="rmsnorm", mlp="swiglu", bias=False)
    wrong = {k: getattr(c, k) for k, v in llama.items() if getattr(c, k) != v}
    if wrong:
        raise ValueError(f"a rotary (rope: true) model with {wrong} is not exportable as GPT2LMHeadModel, which has "
                         f"only learned positions, nor as LlamaForCausalLM, which needs {llama} "
                         "(pretrain.architecture: llama)")
    if qkv_bias and c.rope_scaling is not None:
        raise ValueError("q, k, v biases with Llama 3's rope_scaling: neither LlamaForCausalLM nor Qwen2ForCausalLM")
    return "Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"


def hf_config(config: GPTConfig, vocab_size: int, eos_id: int | None):
    """The transformers config of `hf_architecture(config)`, vocabulary cut to `vocab_size`."""
    import transformers

    architecture = hf_architecture(config)
    if architecture == "GPT2LMHeadModel":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=config.seq_len, n_embd=config.n_embd, n_layer=config.n_layer,
            n_head=config.n_head, activation_function="gelu_new", resid_pdrop=config.dropout,
            embd_pdrop=config.dropout, attn_pdrop=config.dropout, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
            bos_token_id=eos_id, eos_token_id=eos_id, architectures=[architecture])
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {**rope, "rope_type": "llama3", **config.rope_scaling}
    kind = transformers.Qwen2Config if architecture == "Qwen2ForCausalLM" else transformers.LlamaConfig
    return kind(vocab_size=vocab_size, hidden_size=config.n_embd, intermediate_size=config.mlp_hidden,
                num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                num_key_value_heads=config.kv_head_count, max_position_embeddings=config.seq_len,
                rms_norm_eps=config.norm_eps, rope_parameters=rope, tie_word_embeddings=config.tie_embeddings,
                attention_dropout=config.dropout, hidden_act="silu", bos_token_id=eos_id, eos_token_id=eos_id,
                architectures=[architecture])


def hf_names(n_layer: int, architecture: str = "GPT2LMHeadModel") -> dict[str, str | tuple[str, ...]]:
    """Our module names -> the architecture's, for every module whose weight and bias map one to
    one (GPT-2's Conv1D weights transposed), or to several of theirs side by side (Llama's q, k, v
    in our c_attn; its gate and up projections in our c_fc); the embeddings are mapped apart. The
    one definition of the mapping, read forwards by `hf_state_dict` and backwards by `gpt_state_dict`."""
    if architecture == "GPT2LMHeadModel":
        names: dict[str, str | tuple[str, ...]] = {"ln_f": "transformer.ln_f"}
        for i in range(n_layer):
            for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
                names[f"blocks.{i}.{part}"] = f"transformer.h.{i}.{part}"
        return names
    names = {"ln_f": "model.norm"}
    for i in range(n_layer):
        theirs = f"model.layers.{i}"
        names |= {f"blocks.{i}.ln_1": f"{theirs}.input_layernorm", f"blocks.{i}.ln_2": f"{theirs}.post_attention_layernorm",
                  f"blocks.{i}.attn.c_attn": tuple(f"{theirs}.self_attn.{p}_proj" for p in "qkv"),
                  f"blocks.{i}.attn.c_proj": f"{theirs}.self_attn.o_proj",
                  f"blocks.{i}.mlp.c_fc": (f"{theirs}.mlp.gate_proj", f"{theirs}.mlp.up_proj"),
                  f"blocks.{i}.mlp.c_proj": f"{theirs}.mlp.down_proj"}
    return names


def _embedding_names(architecture: str) -> tuple[str, str | None]:
    """(token embedding, learned position table or None) under the architecture's names."""
    if architecture == "GPT2LMHeadModel":
        return "transformer.wte.weight", "transformer.wpe.weight"
    return "model.embed_tokens.weight", None


def hf_state_dict(model: GPT, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our weights under the names of `hf_architecture(model.config)`: Linear weights transposed
    for GPT-2's Conv1D, fused matrices split, the vocabulary cut to `vocab_size` rows, GPT-2's
    absent biases as zeros."""
    config, state = model.config, model.state_dict()
    architecture = hf_architecture(config)
    gpt2 = architecture == "GPT2LMHeadModel"
    wte, wpe = _embedding_names(architecture)
    out: dict[str, torch.Tensor] = {wte: state["wte.weight"][:vocab_size],
                                    "lm_head.weight": state["lm_head.weight"][:vocab_size]}
    if wpe is not None:
        out[wpe] = state["wpe.weight"]
    kv_width = config.kv_head_count * config.head_dim
    for ours, theirs in hf_names(config.n_layer, architecture).items():
        weight, bias = state[f"{ours}.weight"], state.get(f"{ours}.bias")
        if gpt2:
            out[f"{theirs}.weight"] = weight.t() if weight.dim() == 2 else weight
            out[f"{theirs}.bias"] = bias if bias is not None else torch.zeros(weight.size(0))
            continue
        if isinstance(theirs, str):
            theirs, sizes = (theirs,), [weight.size(0)]
        else:  # c_attn: q, k, v; c_fc: gate, up
            sizes = [config.n_embd, kv_width, kv_width] if len(theirs) == 3 else [config.mlp_hidden] * 2
        for name, w in zip(theirs, weight.split(sizes)):
            out[f"{name}.weight"] = w
        if bias is not None:
            for name, b in zip(theirs, bias.split(sizes)):
                out[f"{name}.bias"] = b
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_model(model: GPT, vocab_size: int, eos_id: int | None, stop_ids: list[int]):
    """The transformers model of `hf_architecture` holding our weights (strict load: every name must
    map) whose generation config stops at each of `stop_ids` (the chat turn's end and the document's)."""
    import transformers

    hf = getattr(transformers, hf_architecture(model.config))(hf_config(model.config, vocab_size, eos_id))
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


# --- back: a transformers folder as our GPT ----------------------------------------------------------

# config.json keys (GPT2Config's names) -> GPTConfig's; the rest must hold what hf_config writes
HF_SHAPE = {"vocab_size": "vocab_size", "n_positions": "seq_len", "n_layer": "n_layer", "n_head": "n_head",
            "n_embd": "n_embd"}
HF_FIXED = {"model_type": "gpt2", "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}
# Llama / Qwen2 config.json keys -> GPTConfig's
LLAMA_SHAPE = {"vocab_size": "vocab_size", "max_position_embeddings": "seq_len", "num_hidden_layers": "n_layer",
               "num_attention_heads": "n_head", "hidden_size": "n_embd", "intermediate_size": "mlp_width"}
# config keys of features our model does not compute (mixture of experts, sliding windows, ...): a
# folder that sets one to anything but off is refused, never run with the feature silently dropped
UNSUPPORTED = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok",
               "use_sliding_window", "sliding_window", "attention_bias", "mlp_bias", "qk_norm", "use_qk_norm",
               "attn_logit_softcapping", "final_logit_softcapping", "partial_rotary_factor")
ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def gpt_config_from_hf(config: dict, where: str) -> GPTConfig:
    """Our GPTConfig from a config.json of one of ARCHITECTURES; a key outside what we compute, or
    an architecture we do not have, names itself."""
    by_type = {t: a for a, t in MODEL_TYPES.items()}
    architecture = (config.get("architectures") or [by_type.get(config.get("model_type"))])[0]
    if architecture not in ARCHITECTURES or config.get("model_type", MODEL_TYPES[architecture]) != MODEL_TYPES[architecture]:
        raise ValueError(f"{where}: architecture {architecture!r} (model_type {config.get('model_type')!r}) is not "
                         f"one this model computes: {', '.join(ARCHITECTURES)}")
    if architecture == "GPT2LMHeadModel":
        return _gpt2_config(config, where)
    missing = [k for k in LLAMA_SHAPE if not isinstance(config.get(k), int)]
    if missing:
        raise ValueError(f"{where}: no integer {', '.join(missing)}: not a {architecture} config")
    layer_types = set(config.get("layer_types") or ["full_attention"])
    unsupported = {k: config[k] for k in UNSUPPORTED if not (config.get(k) in (None, False, 0)
                                                             or k == "partial_rotary_factor" and config[k] == 1.0)}
    if architecture == "Qwen2ForCausalLM":  # Qwen2 keeps a window size that only use_sliding_window turns on
        unsupported.pop("sliding_window", None)
    if layer_types != {"full_attention"}:
        unsupported["layer_types"] = sorted(layer_types)
    if config.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = config["hidden_act"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    if config.get("head_dim") not in (None, head_dim):
        unsupported["head_dim"] = config["head_dim"]
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})  # transformers 5's name, 4's
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3") or rope.get("partial_rotary_factor", 1.0) != 1.0:
        unsupported["rope_parameters"] = rope
    if unsupported:
        raise ValueError(f"{where}: {', '.join(f'{k} = {v!r}' for k, v in unsupported.items())}: not computed by "
                         "our model (it has full causal attention in every layer, one dense SwiGLU MLP, RoPE of "
                         "type default or llama3)")
    scaling = None
    if rope_type == "llama3":
        rope.setdefault("original_max_position_embeddings", config["max_position_embeddings"])
        scaling = {k: rope.get(k) for k in LLAMA3_ROPE_SCALING}
    try:
        return GPTConfig(**{ours: config[theirs] for theirs, ours in LLAMA_SHAPE.items()}, rope=True, bias=False,
                         qkv_bias=architecture == "Qwen2ForCausalLM", norm="rmsnorm",
                         norm_eps=float(config.get("rms_norm_eps", 1e-6)), mlp="swiglu",
                         n_kv_head=config.get("num_key_value_heads"), rope_theta=float(rope["rope_theta"]),
                         rope_scaling=scaling, tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _gpt2_config(config: dict, where: str) -> GPTConfig:
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
    """`hf_state_dict` read backwards: the architecture's weights under our names, Conv1D weights
    transposed, split matrices joined, the vocabulary padded with zero rows to
    `config.padded_vocab_size`. A tied head takes the embedding."""
    architecture = hf_architecture(config)
    wte_name, wpe_name = _embedding_names(architecture)

    def padded(weight: torch.Tensor) -> torch.Tensor:
        out = weight.new_zeros(config.padded_vocab_size, config.n_embd)
        out[:config.vocab_size] = weight
        return out

    wte = padded(hf[wte_name])
    state = {"wte.weight": wte, "lm_head.weight": wte if config.tie_embeddings else padded(hf["lm_head.weight"])}
    if wpe_name is not None:
        state["wpe.weight"] = hf[wpe_name]
    for ours, theirs in hf_names(config.n_layer, architecture).items():
        if architecture == "GPT2LMHeadModel":
            weight = hf[f"{theirs}.weight"]
            state[f"{ours}.weight"] = weight.t() if weight.dim() == 2 else weight
            state[f"{ours}.bias"] = hf[f"{theirs}.bias"]
            continue
        parts = (theirs,) if isinstance(theirs, str) else theirs
        state[f"{ours}.weight"] = torch.cat([hf[f"{p}.weight"] for p in parts])
        if f"{parts[0]}.bias" in hf:
            state[f"{ours}.bias"] = torch.cat([hf[f"{p}.bias"] for p in parts])
    return state


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, or of every shard model.safetensors.index.json names, each
    checked to hold the tensors the index places in it. Errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index_path = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: not a readable index with a weight_map ({e!r})") from e
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
    elif single.is_file():
        shards = {single.name: []}
    else:
        raise FileNotFoundError(f"{single}: no such file, nor {index_path.name} (expected a transformers folder with "
                                "safetensors weights; pickled pytorch_model.bin files are not read)")
    weights: dict[str, torch.Tensor] = {}
    for shard, names in shards.items():
        path = folder / shard
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing shard ({len(names)} tensors of {index_path.name} are in it)")
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        absent = [n for n in names if n not in tensors]
        if absent:
            raise ValueError(f"{path}: lacks {', '.join(absent[:5])}, which {index_path.name} places in it")
        weights |= tensors
    return weights


def check_weights(weights: dict[str, torch.Tensor], config: GPTConfig, where: str) -> None:
    """Every tensor our model needs is there with the shape it needs, and no other: the expected
    names and shapes are `hf_state_dict` of the config's model built on the meta device (no memory)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in hf_state_dict(GPT(config), config.vocab_size).items()}
    if config.tie_embeddings:  # save_pretrained writes a tied matrix once; if both are there, equal
        expected.pop("lm_head.weight")
        wte_name = _embedding_names(hf_architecture(config))[0]
        head = weights.get("lm_head.weight")
        if head is not None and not torch.equal(head, weights.get(wte_name, head)):
            raise ValueError(f"{where}: lm_head.weight differs from {wte_name}, but config.json ties them")
    present = {k for k in weights if not k.endswith("rotary_emb.inv_freq")}  # a buffer older transformers saved
    if config.tie_embeddings:
        present.discard("lm_head.weight")
    missing, unknown = sorted(set(expected) - present), sorted(present - set(expected))
    if missing or unknown:
        raise ValueError(f"{where}: {'missing ' + ', '.join(missing[:5]) if missing else ''}"
                         f"{'; ' if missing and unknown else ''}"
                         f"{'tensors our model has no place for: ' + ', '.join(unknown[:5]) if unknown else ''}")
    wrong = [f"{k} {tuple(weights[k].shape)} (config.json says {shape})" for k, shape in expected.items()
             if tuple(weights[k].shape) != shape]
    if wrong:
        raise ValueError(f"{where}: shapes do not fit config.json: {', '.join(wrong[:5])}")


def eos_ids(folder: Path, config: dict) -> list[int]:
    """The ids that end generation: generation_config.json's eos_token_id (an id or a list), else
    config.json's."""
    path = folder / "generation_config.json"
    source = config
    if path.is_file():
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not readable JSON ({e})") from e
    eos = source.get("eos_token_id", config.get("eos_token_id"))
    ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{path if source is not config else folder / 'config.json'}: eos_token_id {eos!r} is not "
                         "an id or a list of ids")
    return list(ids)


def load_hf(folder: str | os.PathLike, device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32) -> tuple[GPT, dict]:
    """A transformers folder (config.json, safetensors weights single or sharded, optionally
    generation_config.json) of GPT2LMHeadModel, LlamaForCausalLM or Qwen2ForCausalLM as our GPT in
    eval mode on `device`, weights cast to `dtype`, and metadata shaped as `load_final`'s
    ("model_config", "vocab_size", "eos_id": config.json's, "step": None) plus "architecture" and
    "eos_ids" (every id that ends generation, generation_config.json's). Errors name the file and the key or tensor."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no such file (expected a transformers folder, e.g. written by export-hf)")
    try:
        hf_cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: not readable JSON ({e})") from e
    config = gpt_config_from_hf(hf_cfg, str(config_path))
    weights = read_safetensors(folder)
    check_weights(weights, config, f"{folder} (safetensors)")
    state = gpt_state_dict(weights, config)
    del weights  # the joined and padded tensors are copies: hold the model's weights once, not twice
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    try:
        model = gpt_from_state(config, state)
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{folder}: weights do not fit {config_path}: {e!r}") from e
    eos = hf_cfg.get("eos_token_id")
    meta = {"model_config": config.to_dict(), "vocab_size": config.vocab_size, "step": None,
            "eos_id": eos[0] if isinstance(eos, list) and eos else eos, "eos_ids": eos_ids(folder, hf_cfg),
            "architecture": hf_architecture(config)}
    return model.to(device, dtype).eval(), meta


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
