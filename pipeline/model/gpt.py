"""A GPT-2 language model in one file, read top to bottom.

Notable features:
- token + learned position embeddings, or rotary position embeddings (RoPE) with `rope=True`;
- pre-LayerNorm blocks: x + attn(ln(x)), then x + mlp(ln(x)), and a final LayerNorm;
- causal self-attention through `F.scaled_dot_product_attention`, which runs the flash kernel on
  a CUDA GPU in bf16 and a fused CPU kernel here;
- a GELU MLP four times as wide as the model;
- the output projection shares its weight with the token embedding (tied, as GPT-2);
- the vocabulary is padded to a multiple of 64 (see `GPTConfig.padded_vocab_size`);
- the model does its own accounting: `num_params(non_embedding=...)` for the scaling fits and
  `flops_per_token()` for MFU.

Sizes are named in `MODEL_SIZES` or generated as `d<depth>w<width>` (`size_shape`);
`GPTConfig.from_size("tiny", vocab_size=..., seq_len=...)`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary rounded up to a multiple of 64: matmuls whose sizes are multiples of 64
        map onto whole GPU tensor-core tiles (nanoGPT measured ~25% faster with 50257 -> 50304).
        The extra rows are never targets, so training learns to give them low logits, and
        `generate` masks them out."""
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @classmethod
    def from_size(cls, size: str, **overrides) -> GPTConfig:
        return cls(**{**size_shape(size), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# --- rotary position embeddings (Su et al., 2021, https://arxiv.org/abs/2104.09864) -------------

def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (seq_len, head_dim / 2): pair i of a head turns by angle t * base^(-2i/d)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the (first half, second half) pairs of x (B, nh, T, hs) by the position's angle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    T = x.size(-2)
    cos, sin = cos[:T], sin[:T]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


# --- the blocks ------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, f"n_embd {config.n_embd} not divisible by n_head {config.n_head}"
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.rope = config.rope
        if config.rope:
            cos, sin = rope_tables(config.seq_len, config.n_embd // config.n_head)
            # not persistent: derived from the config, so checkpoints hold only learned weights
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.rope:
            q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh * hs): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# --- the model -------------------------------------------------------------------------------------

class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = None if config.rope else nn.Embedding(config.seq_len, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix reads tokens in and writes logits out
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) token ids -> logits (B, T, padded vocab); with targets also the mean
        cross-entropy, computed in fp32 whatever the autocast dtype."""
        B, T = idx.size()
        assert T <= self.config.seq_len, f"sequence of {T} tokens, the model's context is {self.config.seq_len}"
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))  # (T, C) broadcast over B
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    # --- accounting ----------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied matrix counted once. `non_embedding=True` drops the token and
        position tables: Kaplan et al. (2020) fit scaling laws on that N."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B
        (https://arxiv.org/abs/2204.02311): 6 per weight that takes part in a matmul, plus
        12 * n_layer * n_embd * seq_len for the attention scores and their weighted sum. The
        matmul weights are the non-embedding ones plus the (tied) output projection; the
        embedding lookups are not matmuls. The causal mask's saved half is not subtracted, as PaLM."""
        c = self.config
        matmul_params = self.num_params(non_embedding=True) + c.padded_vocab_size * c.n_embd
        return 6 * matmul_params + 12 * c.n_layer * c.n_embd * c.seq_len

    # --- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens. temperature 0 is greedy; otherwise sample from the
        smallest set of tokens whose probability reaches top_p (nucleus sampling, Holtzman et al.,
        2019). No KV cache: this is for a look at what the model learned, not for serving."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.seq_len:])[:, -1, :].float()
            logits[:, self.config.vocab_size:] = -float("inf")  # padding ids are not tokens
            if temperature == 0.0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                sorted_probs, order = probs.sort(dim=-1, descending=True)
                # drop a token when the ones before it already reach top_p (the first always stays)
                sorted_probs[(sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p] = 0.0
                choice = torch.multinomial(sorted_probs, 1, generator=generator)
                next_id = order.gather(-1, choice)
            idx = torch.cat([idx, next_id], dim=1)
        return idx
