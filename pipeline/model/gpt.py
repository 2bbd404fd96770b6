"""A GPT language model in one file, read top to bottom: GPT-2 by default, the Llama family
(Llama 2/3, Qwen2) through config options.

Notable features:
- token + learned position embeddings, or rotary position embeddings (RoPE) with `rope=True`, with
  a configurable base (`rope_theta`) and Llama 3's frequency scaling (`rope_scaling`);
- pre-norm blocks: x + attn(ln(x)), then x + mlp(ln(x)), and a final norm: LayerNorm (GPT-2) or
  RMSNorm (`norm="rmsnorm"`, Llama);
- grouped-query attention: `n_kv_head` K/V heads, each serving n_head / n_kv_head query heads;
- causal self-attention through `F.scaled_dot_product_attention`, which runs the flash kernel on
  a CUDA GPU in bf16 and a fused CPU kernel here;
- one forward for training and decoding: each block hands its q, k, v to an attention backend
  (pipeline/model/attention.py): plain causal attention (training), the contiguous KV cache
  (`GPT.new_kv_cache`), or the paged KV cache of the inference engine (`GPT.new_paged_kv_cache`),
  which also says at which positions the tokens sit;
- a GELU MLP four times as wide as the model, or Llama's SwiGLU MLP (`mlp="swiglu"`);
- the output projection shares its weight with the token embedding (tied, as GPT-2), or has its
  own (`tie_embeddings=False`, Llama);
- biases in every Linear and LayerNorm (`bias`, GPT-2), or on q, k, v alone (`qkv_bias`, Qwen2);
- the vocabulary is padded to a multiple of 64 (see `GPTConfig.padded_vocab_size`);
- fp32 cross-entropy with targets of -1 ignored (prompt and padding positions), reduced to the
  mean, the sum (for token-weighted losses over micro-batches) or per-token losses ("none");
- the model does its own accounting: `num_params(non_embedding=...)` for the scaling fits and
  `flops_per_token()` for MFU;
- `load_final`, the one loader of final.pt files. Generation is the inference engine's
  (`pipeline.inference.Engine`), which calls this forward.

Sizes are named in `MODEL_SIZES` or generated as `d<depth>w<width>` (`size_shape`);
`GPTConfig.from_size("tiny", vocab_size=..., seq_len=...)`. `ARCHITECTURES` names the options that
make a Llama of a size (`GPTConfig.from_size("tiny", architecture="llama", ...)`). Every option's
default is GPT-2's, so a final.pt written before an option existed loads as it was trained.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.model.attention import KVCache, PagedBatch, PagedKVCache, attention, check_context

# name -> (n_layer, n_head, n_embd). "nano" is for tests, "tiny" the default CPU run, "small" a
# larger CPU model; the last two are the GPT-2 124M and 350M shapes (Radford et al., 2019).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "nano": dict(n_layer=2, n_head=2, n_embd=32),
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "small": dict(n_layer=6, n_head=6, n_embd=192),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024),
}
VOCAB_MULTIPLE = 64
LOSS_REDUCTIONS = ("mean", "sum", "none")
FINAL_KEYS = ("model_config", "model", "step", "vocab_size", "eos_id")  # what pretrain writes to final.pt

# the options that make each architecture; the rest (n_kv_head, rope_theta, ...) stay free
ARCHITECTURES: dict[str, dict] = {
    "gpt2": dict(rope=False, norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "llama": dict(rope=True, norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
}
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
LLAMA3_ROPE_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

GENERATED_SIZE = re.compile(r"d(\d+)w(\d+)")  # "d<depth>w<width>", e.g. d12w768 (= gpt2-124m's shape)


def size_shape(size: str) -> dict[str, int]:
    """A size name -> (n_layer, n_head, n_embd): a MODEL_SIZES name, or a generated `d<depth>w<width>`
    with 64-wide heads as GPT-2 (nanochat's rule; one head below width 128), so a scaling sweep can
    name any shape without editing this file."""
    if size in MODEL_SIZES:
        return MODEL_SIZES[size]
    match = GENERATED_SIZE.fullmatch(size)
    if match is None:
        raise ValueError(f"unknown model size {size!r}; known: {', '.join(MODEL_SIZES)}, or d<depth>w<width>")
    depth, width = int(match[1]), int(match[2])
    heads = max(1, width // 64)
    if depth < 1 or width < 1 or width % heads:
        raise ValueError(f"model size {size!r}: needs depth >= 1 and a width divisible by its "
                         f"{heads} heads (width // 64)")
    return dict(n_layer=depth, n_head=heads, n_embd=width)


@dataclass
class GPTConfig:
    vocab_size: int  # the tokenizer's vocabulary; ids >= this are padding (never seen, never sampled)
    seq_len: int = 1024  # the longest context (GPT-2: 1024)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    rope: bool = False  # rotary position embeddings instead of a learned position table
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    qkv_bias: bool | None = None  # biases on q, k, v (Qwen2: True with bias False); None: as `bias`
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" (GPT-2) or "swiglu" (Llama)
    mlp_width: int | None = None  # the MLP's hidden width; None: 4 x n_embd, or 8/3 x n_embd for swiglu
    n_kv_head: int | None = None  # K/V heads (grouped-query attention); None: n_head
    rope_theta: float = 10000.0  # the RoPE base
    rope_scaling: dict | None = None  # Llama 3's: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    tie_embeddings: bool = True  # the output projection is the token embedding (GPT-2)

    def __post_init__(self):
        if self.norm not in NORMS or self.mlp not in MLPS:
            raise ValueError(f"norm {self.norm!r}, mlp {self.mlp!r}: norm is one of {NORMS}, mlp one of {MLPS}")
        if self.n_embd % self.n_head or self.n_head % self.kv_head_count:
            raise ValueError(f"n_embd {self.n_embd}, n_head {self.n_head}, n_kv_head {self.n_kv_head}: n_embd must "
                             "divide into n_head heads and n_head into n_kv_head groups")
        if self.rope_scaling is not None:
            missing = [k for k in LLAMA3_ROPE_SCALING if k not in self.rope_scaling]
            if not self.rope or missing:
                raise ValueError(f"rope_scaling {self.rope_scaling}: Llama 3's scaling needs rope: true and the keys "
                                 f"{', '.join(LLAMA3_ROPE_SCALING)}")

    @property
    def kv_head_count(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: `mlp_width`, else GPT-2's 4 x n_embd, or for SwiGLU (three
        matrices, not two) 8/3 x n_embd rounded up to a multiple of 64, the same parameters."""
        if self.mlp_width is not None:
            return self.mlp_width
        return 4 * self.n_embd if self.mlp == "gelu" else math.ceil(8 * self.n_embd / 3 / 64) * 64

    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary rounded up to a multiple of 64: matmuls whose sizes are multiples of 64
        map onto whole GPU tensor-core tiles (nanoGPT measured ~25% faster with 50257 -> 50304).
        The extra rows are never targets, so training learns to give them low logits, and
        `generate` masks them out."""
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @classmethod
    def from_size(cls, size: str, architecture: str = "gpt2", **overrides) -> GPTConfig:
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
        return cls(**{**size_shape(size), **ARCHITECTURES[architecture], **overrides})

    @classmethod
    def for_pretrain(cls, size: str, cfg: dict, vocab_size: int) -> GPTConfig:
        """The model pretrain trains at `size` under its config section (workflow/schemas/pretrain):
        the `architecture`'s options (gpt2 takes `rope` as set; llama is always rotary),
        `n_kv_head`, `seq_len` and `dropout`."""
        rope = {"rope": cfg["rope"]} if cfg["architecture"] == "gpt2" else {}
        return cls.from_size(size, cfg["architecture"], vocab_size=vocab_size, seq_len=cfg["seq_len"],
                             n_kv_head=cfg["n_kv_head"], dropout=cfg["dropout"], **rope)

    def to_dict(self) -> dict:
        return asdict(self)


# --- rotary position embeddings (Su et al., 2021, https://arxiv.org/abs/2104.09864) -------------

def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (seq_len, head_dim / 2): pair i of a head turns by angle t * base^(-2i/d),
    with Llama 3's scaling of the low frequencies when `scaling` is given. (transformers computes
    1 / base^(2i/d), which can differ in the last bit: logits move by ~1e-7, far inside parity.)"""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is not None:
        inv_freq = llama3_scaled(inv_freq, **{k: scaling[k] for k in LLAMA3_ROPE_SCALING})
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def llama3_scaled(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                  original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1's context extension: wavelengths longer than the original context / low_freq_factor
    are slowed by `factor`, those shorter than context / high_freq_factor kept, and the band between
    interpolated smoothly (transformers' `_compute_llama3_parameters`)."""
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the (first half, second half) pairs of x (B, nh, T, hs) by each token's angle: cos and
    sin are the tables' rows at the tokens' positions, (B or 1, 1, T, hs / 2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


# --- the blocks ------------------------------------------------------------------------------------

# an attention backend (pipeline/model/attention.py): None is plain causal attention
Backend = KVCache | PagedBatch | None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer  # this layer's slot in a KV cache
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_head_count, config.head_dim
        self.n_embd, self.dropout = config.n_embd, config.dropout
        kv_width = self.n_kv_head * self.head_dim
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_width, bias=qkv_bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache: Backend = None) -> torch.Tensor:
        B, T, C = x.size()
        hs, kv_width = self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv_width, kv_width], dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv_head, T, hs)
        v = v.view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, n_kv_head, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is None:
            y = attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:  # decoding: no dropout
            y = kv_cache.attend(self.layer, q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh * hs): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's: c_proj(gelu(c_fc(x))). SwiGLU (Shazeer, 2020, https://arxiv.org/abs/2002.05202; Llama's):
    c_fc computes the gate and the up projection in one matmul, then c_proj(silu(gate) * up)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu, hidden = config.mlp == "swiglu", config.mlp_hidden
        self.c_fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * hidden, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.dropout(self.c_proj(F.silu(gate) * up))
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


def norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)
        self.activation_checkpointing = False  # set by pipeline.train.parallel.parallelize

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv_cache: Backend = None) -> torch.Tensor:
        if self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled():
            # keep only the block's input for backward, which reruns the block to get the rest back:
            # activation memory of one block instead of n_layer, for about a third more compute. The
            # rerun sees the same dropout masks (checkpoint restores the RNG state), so the gradients
            # are those of the plain forward. Never on a cache: the rerun would write it again.
            return checkpoint(self._forward, x, rope, use_reentrant=False)
        return self._forward(x, rope, kv_cache)

    def _forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                 kv_cache: Backend = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache)
        return x + self.mlp(self.ln_2(x))


# --- the model -------------------------------------------------------------------------------------

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = None if config.rope else nn.Embedding(config.seq_len, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # tied: one matrix reads tokens in and writes logits out
        if config.rope:
            cos, sin = rope_tables(config.seq_len, config.head_dim, config.rope_theta, config.rope_scaling)
            # not persistent: derived from the config, so checkpoints hold only learned weights
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), since each block adds two
        # of them to the residual stream and its variance would otherwise grow with depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: Backend = None, loss_reduction: str = "mean"):
        """idx (B, T) token ids -> logits (B, T, padded vocab); with targets (B, T) also the fp32
        cross-entropy (whatever the autocast dtype), targets of -1 ignored, reduced by
        `loss_reduction`: "mean" over the counted targets (0, not NaN, when there are none: a
        micro-batch whose targets are all masked adds nothing), "sum" (divide by a token count of
        your own for token-weighted losses), or "none" (the (B, T) per-token losses, 0 where ignored).
        With `kv_cache` (a `KVCache`, or a `PagedBatch` of a paged cache), idx continues the cached
        tokens at the positions the cache gives."""
        logits = self.logits(self.hidden(idx, kv_cache))  # (B, T, V)
        if targets is None:
            return logits
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction {loss_reduction!r}; one of {', '.join(LOSS_REDUCTIONS)}")
        if targets.shape != idx.shape:
            raise ValueError(f"targets of shape {tuple(targets.shape)} for idx of shape {tuple(idx.shape)}")
        B, T = idx.size()
        losses = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                 ignore_index=-1, reduction="none").view(B, T)  # 0 where ignored
        if loss_reduction == "none":
            return logits, losses
        if loss_reduction == "sum":
            return logits, losses.sum()
        return logits, losses.sum() / (targets != -1).sum().clamp(min=1)

    def hidden(self, idx: torch.Tensor, kv_cache: Backend = None) -> torch.Tensor:
        """The final hidden states (B, T, C), after ln_f: the forward up to the output projection.
        The inference engine reads the logits of only the tokens it samples from (`logits`)."""
        B, T = idx.size()
        if kv_cache is None:
            check_context(0, T - 1, self.config.seq_len)
            positions = torch.arange(T, device=idx.device)[None]  # (1, T)
        else:
            positions = kv_cache.positions(B, T, self.config.seq_len)  # (1, T)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(positions)  # (1, T, C) broadcast over B
        x = self.drop(x)
        # the rotary angles at the tokens' positions, (1, 1, T, hs / 2): the same for every head
        rope = (self.cos[positions][:, None], self.sin[positions][:, None]) if self.config.rope else None
        for block in self.blocks:
            x = block(x, rope, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., padded vocab), in the weights' (or autocast) dtype."""
        return self.lm_head(hidden)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KVCache for batch_size rows of up to max_len tokens (default: the context), on
        the model's device. dtype defaults to that of the keys it will hold: the autocast dtype
        when called inside autocast, else the weights'."""
        max_len = self.config.seq_len if max_len is None else max_len
        if not 0 < max_len <= self.config.seq_len:
            raise ValueError(f"KV cache max_len {max_len}: must be in 1..{self.config.seq_len} (the model's context)")
        n_kv_head, head_dim = self.kv_heads()
        shape = (self.config.n_layer, batch_size, n_kv_head, max_len, head_dim)
        dtype, device = self._cache_dtype(dtype), self.wte.weight.device
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def new_paged_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None) -> PagedKVCache:
        """An empty PagedKVCache of num_blocks blocks of block_size token slots on the model's device
        (dtype as for `new_kv_cache`)."""
        n_kv_head, head_dim = self.kv_heads()
        shape = (self.config.n_layer, 2, num_blocks, block_size, n_kv_head, head_dim)
        return PagedKVCache(torch.zeros(shape, dtype=self._cache_dtype(dtype), device=self.wte.weight.device))

    def kv_heads(self) -> tuple[int, int]:
        """(K/V heads, head size): what a cache stores per token and layer."""
        return self.config.kv_head_count, self.config.head_dim

    def _cache_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        if dtype is not None:
            return dtype
        device = self.wte.weight.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.wte.weight.dtype

    # --- accounting ----------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, a tied matrix counted once. `non_embedding=True` drops the token and
        position tables (an untied output head stays): Kaplan et al. (2020) fit scaling laws on that N."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B
        (https://arxiv.org/abs/2204.02311): 6 per weight that takes part in a matmul, plus
        12 * n_layer * n_embd * seq_len for the attention scores and their weighted sum. The
        matmul weights are the non-embedding ones plus a tied output projection (an untied one is
        among the non-embedding ones); the embedding lookups are not matmuls. The causal mask's
        saved half is not subtracted, as PaLM."""
        c = self.config
        matmul_params = self.num_params(non_embedding=True) + c.tie_embeddings * c.padded_vocab_size * c.n_embd
        return 6 * matmul_params + 12 * c.n_layer * c.n_embd * c.seq_len


# --- loading ---------------------------------------------------------------------------------------

def gpt_from_state(config: GPTConfig, state: dict[str, torch.Tensor]) -> GPT:
    """A GPT of `config` holding the tensors of `state` (strict: every name and shape), built on the
    meta device and given the tensors themselves, so no weight is drawn only to be overwritten and
    none is held twice: a 1B model's load costs its weights once. Raises RuntimeError on a misfit."""
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:  # assign gives each name its own Parameter: tie them again
        model.lm_head.weight = model.wte.weight
    if config.rope:  # derived, not in the state: computed for real now
        model.cos, model.sin = rope_tables(config.seq_len, config.head_dim, config.rope_theta, config.rope_scaling)
    return model


def load_final(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """Load a final.pt (pretrain's export: a torch.save of FINAL_KEYS) with weights_only=True,
    which unpickles only tensors and plain containers, never code. Returns the GPT in eval mode on
    `device` and the file's metadata: every key but "model" ("model_config" as a dict, "step",
    "vocab_size", "eos_id", and whatever else the writer added). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a final.pt written by pretrain)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise ValueError(f"{path}: not a torch.save file (not a zip archive)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only met a pickled object, not weights: loading it could run code
        what = re.search(r"GLOBAL (\S+)", str(e))
        raise ValueError(f"{path}: refused, it pickles {what[1] if what else 'objects beyond tensors'} "
                         "(final.pt holds only tensors and plain values; torch.load weights_only=True)") from e
    except RuntimeError as e:
        raise ValueError(f"{path}: unreadable torch.save file ({str(e).splitlines()[0]})") from e
    missing = [k for k in FINAL_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise ValueError(f"{path}: not a final.pt, missing {', '.join(missing)}")
    try:
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: model_config and weights do not fit: {e}") from e
    return model.to(device).eval(), {k: v for k, v in checkpoint.items() if k != "model"}
