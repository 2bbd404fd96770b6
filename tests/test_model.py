"""The GPT model: shapes, causality, parameter and FLOP accounting, sampling."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.gpt import GPT, MODEL_SIZES, GPTConfig


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=257, seq_len=16, n_layer=2, n_head=2, n_embd=32), **overrides})


def make_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(**overrides)).eval()


def test_vocab_is_padded_to_a_multiple_of_64():
    assert tiny_config(vocab_size=257).padded_vocab_size == 320
    assert tiny_config(vocab_size=50257).padded_vocab_size == 50304  # nanoGPT's figure
    assert tiny_config(vocab_size=4096).padded_vocab_size == 4096


def test_shapes_and_loss():
    model = make_model()
    idx = torch.randint(0, 257, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 320)
    assert loss.shape == () and torch.isfinite(loss)
    # an untrained model is near uniform over the padded vocabulary: loss ~ ln(320)
    assert abs(loss.item() - torch.log(torch.tensor(320.0)).item()) < 0.5


@pytest.mark.parametrize("rope", [False, True])
def test_attention_is_causal(rope):
    """Changing the token at position t changes no logit before t, and does change those from t."""
    model = make_model(rope=rope)
    idx = torch.randint(0, 257, (2, 16))
    changed = idx.clone()
    t = 9
    changed[:, t] = (changed[:, t] + 1) % 257
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def hand_count(n_layer: int, d: int, vocab_padded: int, seq_len: int, rope: bool) -> tuple[int, int]:
    """(total, non-embedding) by hand: per block two LayerNorms (weight + bias), qkv (d x 3d + 3d),
    attention output (d x d + d), MLP in (d x 4d + 4d) and out (4d x d + d); a final LayerNorm;
    the token table (shared with the output head); the position table unless RoPE."""
    block = 2 * (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    non_embedding = n_layer * block + 2 * d
    embedding = vocab_padded * d + (0 if rope else seq_len * d)
    return non_embedding + embedding, non_embedding


@pytest.mark.parametrize("rope", [False, True])
def test_param_counts_match_a_hand_count(rope):
    model = make_model(rope=rope)
    total, non_embedding = hand_count(2, 32, 320, 16, rope)
    assert model.num_params() == total
    assert model.num_params(non_embedding=True) == non_embedding
    assert model.lm_head.weight is model.wte.weight  # tied: counted once above


def test_gpt2_124m_shape_has_the_published_parameter_count():
    """GPT-2 small has 124,439,808 parameters (Hugging Face `gpt2`, 50257 vocabulary, position
    table included); padding the vocabulary to 50304 adds 47 x 768."""
    model_config = GPTConfig.from_size("gpt2-124m", vocab_size=50257, seq_len=1024)
    total, non_embedding = hand_count(12, 768, 50304, 1024, False)
    assert total == 124_439_808 + 47 * 768
    assert MODEL_SIZES["gpt2-350m"] == dict(n_layer=24, n_head=16, n_embd=1024)
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(model_config)
    assert (model.num_params(), model.num_params(non_embedding=True)) == (total, non_embedding)


def test_flops_per_token_is_6n_plus_attention():
    model = make_model()
    _, non_embedding = hand_count(2, 32, 320, 16, False)
    matmul_params = non_embedding + 320 * 32  # the tied output head is a matmul
    assert model.flops_per_token() == 6 * matmul_params + 12 * 2 * 32 * 16


def test_unknown_size_names_the_known_ones():
    with pytest.raises(ValueError, match="tiny"):
        GPTConfig.from_size("huge", vocab_size=10)


def test_generation_never_emits_padding_ids():
    """Rig the model so the padding ids have the highest logits; greedy and sampled tokens must
    still be real ids."""
    model = make_model(vocab_size=65)  # padded to 128
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)  # final hidden state: all ones
        model.wte.weight.zero_()
        model.wte.weight[65:] = 1.0  # padding logits 32, real ones 0
    idx = torch.zeros(1, 1, dtype=torch.long)
    greedy = model.generate(idx, 5)
    sampled = model.generate(idx, 5, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert greedy.max() < 65 and sampled.max() < 65


def test_tiny_top_p_is_greedy_and_generation_is_seeded():
    model = make_model()
    idx = torch.randint(0, 257, (2, 4))
    greedy = model.generate(idx, 6)
    nucleus = model.generate(idx, 6, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, nucleus)  # the top token alone reaches any tiny p
    a = model.generate(idx, 6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(2))
    b = model.generate(idx, 6, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.shape == (2, 10)
