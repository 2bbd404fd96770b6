"""The GPT model: shapes, causality, the attention backends (contiguous and paged KV caches,
grouped-query heads), losses, parameter and FLOP accounting, loading final.pt."""

from __future__ import annotations

import argparse
import re

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import load_schema
from pipeline.model.attention import KVCache, PagedKVCache, attention
from pipeline.model.gpt import GPT, MODEL_SIZES, GPTConfig, load_final, size_shape


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig(**{**dict(vocab_size=257, seq_len=16, n_layer=2, n_head=2, n_embd=32), **overrides})


def make_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(**overrides)).eval()


def make_sharp_model(**overrides) -> GPT:
    """Weights x 8: at GPT-2's init the logits are near uniform and greedy decoding repeats one
    token whatever the context, which would hide a wrong position or window."""
    model = make_model(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return model


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


def test_schema_size_names_are_the_model_sizes():
    """The pretrain schema's enum gives config errors that name the key; it must list exactly
    MODEL_SIZES, in order (a size added to one place only fails here), beside the pattern of
    generated d<depth>w<width> sizes, which size_shape must accept."""
    named, generated = load_schema()["properties"]["pretrain"]["properties"]["sizes"]["items"]["anyOf"]
    assert named["enum"] == list(MODEL_SIZES)
    assert re.fullmatch(generated["pattern"].strip("^$"), "d3w96") and size_shape("d3w96")["n_embd"] == 96


# --- the KV cache ---------------------------------------------------------------------------------------

def decode_in_chunks(model: GPT, idx: torch.Tensor, prefix: int, chunk: int) -> torch.Tensor:
    """Logits of idx read through a KV cache: the first `prefix` tokens at once, then `chunk` at a time."""
    cache = model.new_kv_cache(idx.size(0))
    bounds = [0, *range(prefix, idx.size(1), chunk), idx.size(1)]
    with torch.no_grad():
        logits = [model(idx[:, a:b], kv_cache=cache) for a, b in zip(bounds, bounds[1:])]
    assert cache.length == idx.size(1)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
def test_cached_decode_equals_a_full_forward(rope, chunk):
    """Prefill 5 tokens, then decode the rest of the context one token (or 3) at a time: every
    logit equals the cacheless forward's, so positions continue from the cache and a chunk of
    queries attends causally to everything cached."""
    model = make_model(rope=rope)
    idx = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
    torch.testing.assert_close(decode_in_chunks(model, idx, 5, chunk), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope", [False, True])
def test_paged_batches_equal_a_full_forward(rope):
    """Three sequences in blocks of 4 slots, scattered over the pool: prefilled together in one
    packed row (chunks of unequal lengths), then continued together (a decode and two chunks):
    every logit equals the cacheless forward's, so positions, block tables and the causal mask
    are each sequence's own."""
    model = make_model(rope=rope)
    idx = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(4))
    cache = model.new_paged_kv_cache(num_blocks=16, block_size=4)
    tables = [[9, 2, 14, 5], [0, 11, 3, 7], [15, 1, 8, 12]]
    with torch.no_grad():
        full = model(idx)
        first = model(torch.cat([idx[0, :7], idx[1, :1], idx[2, :12]])[None],
                      kv_cache=cache.batch([(tables[0], 0, 7), (tables[1], 0, 1), (tables[2], 0, 12)]))
        second = model(torch.cat([idx[0, 7:8], idx[1, 1:16], idx[2, 12:16]])[None],
                       kv_cache=cache.batch([(tables[0], 7, 1), (tables[1], 1, 15), (tables[2], 12, 4)]))
    paged = [torch.cat([first[0, :7], second[0, :1]]), torch.cat([first[0, 7:8], second[0, 1:16]]),
             torch.cat([first[0, 8:], second[0, 16:]])]
    for row, expected in zip(paged, (full[0, :8], full[1], full[2])):
        torch.testing.assert_close(row, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache", ["none", "contiguous", "paged"])
def test_attention_backends_let_kv_heads_serve_groups_of_query_heads(cache):
    """Grouped-query attention: 4 query heads over 2 K/V heads, through each backend, equals plain
    causal attention with each K/V head repeated for its 2 query heads."""
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1),
                                              is_causal=True)
    if cache == "none":
        y = attention(q, k, v, causal=True)
    elif cache == "contiguous":
        kv = KVCache(torch.zeros(1, 1, 2, 6, 8), torch.zeros(1, 1, 2, 6, 8))  # 4 tokens, then 2
        head = kv.attend(0, q[:, :, :4], k[:, :, :4], v[:, :, :4])
        kv.advance(4)
        y = torch.cat([head, kv.attend(0, q[:, :, 4:], k[:, :, 4:], v[:, :, 4:])], dim=2)
    else:
        batch = PagedKVCache(torch.zeros(1, 2, 4, 4, 2, 8)).batch([([3, 1], 0, 6)])
        y = batch.attend(0, q, k, v)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=0)


def test_the_cache_refuses_positions_past_the_context_and_a_wrong_batch():
    model = make_model()
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        model(torch.zeros(2, 16, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="positions 16..16: past the model's context of 16"):
            model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache of batch 2"):
            model(torch.zeros(3, 1, dtype=torch.long), kv_cache=model.new_kv_cache(2))
    with pytest.raises(ValueError, match="max_len 17"):
        model.new_kv_cache(1, 17)


# --- losses ----------------------------------------------------------------------------------------------

def masked_targets() -> torch.Tensor:
    targets = torch.randint(0, 257, (3, 16), generator=torch.Generator().manual_seed(5))
    targets[0, :10] = -1  # a prompt
    targets[2, 12:] = -1  # padding
    return targets


def test_ignored_targets_count_as_if_dropped():
    model = make_model()
    idx, targets = torch.randint(0, 257, (3, 16)), masked_targets()
    logits, loss = model(idx, targets)
    keep = targets != -1
    assert keep.sum() == 48 - 14
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep].float(), targets[keep]))


def test_sum_and_per_token_losses_agree_with_the_mean():
    model = make_model()
    idx, targets = torch.randint(0, 257, (3, 16)), masked_targets()
    keep = targets != -1
    logits, mean = model(idx, targets)
    _, total = model(idx, targets, loss_reduction="sum")
    _, per_token = model(idx, targets, loss_reduction="none")
    torch.testing.assert_close(total, mean * keep.sum())
    assert per_token.shape == (3, 16) and torch.all(per_token[~keep] == 0)
    torch.testing.assert_close(per_token[keep], F.cross_entropy(logits[keep].float(), targets[keep], reduction="none"))
    torch.testing.assert_close(per_token.sum(), total)


def test_a_batch_without_targets_has_zero_mean_loss_not_nan():
    model = make_model().train()
    idx = torch.randint(0, 257, (2, 16))
    _, loss = model(idx, torch.full((2, 16), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.all(p.grad == 0) for p in model.parameters())


def test_bad_loss_arguments_are_named():
    model = make_model()
    idx = torch.randint(0, 257, (2, 16))
    with pytest.raises(ValueError, match="loss_reduction 'avg'"):
        model(idx, idx, loss_reduction="avg")
    with pytest.raises(ValueError, match=r"targets of shape \(2, 15\)"):
        model(idx, idx[:, 1:])


def saved_bytes_and_grads(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(loss, gradients, bytes saved for backward) of one training forward and backward, with
    dropout on (so the recompute must replay the same masks)."""
    model = make_model(dropout=0.2).train()
    for block in model.blocks:
        block.activation_checkpointing = checkpointing
    idx, targets = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(1)), masked_targets()
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, torch.cat([targets, targets[:1]]))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}, saved[0]


def test_activation_checkpointing_gives_the_same_loss_and_gradients_from_fewer_saved_activations():
    loss, grads, saved = saved_bytes_and_grads(checkpointing=False)
    loss_ac, grads_ac, saved_ac = saved_bytes_and_grads(checkpointing=True)
    assert saved_ac < 0.6 * saved  # the blocks keep only their inputs
    assert torch.equal(loss_ac, loss)
    assert grads_ac.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grads_ac[name], grad), name


def test_a_forward_on_the_kv_cache_is_never_checkpointed():
    """A recompute in backward would run after the cache moved on: the cached path stays plain,
    even with gradients on (sampling under autograd, say)."""
    model = make_model()
    for block in model.blocks:
        block.activation_checkpointing = True
    idx = torch.randint(0, 257, (2, 16))
    full = model(idx)
    cache = model.new_kv_cache(2)
    chunked = torch.cat([model(idx[:, :10], kv_cache=cache), model(idx[:, 10:], kv_cache=cache)], dim=1)
    torch.testing.assert_close(chunked, full)


# --- load_final -----------------------------------------------------------------------------------------

def save_final(path, model: GPT, **extra) -> None:
    """What pretrain writes (pipeline/train/engine.py export)."""
    torch.save({"model_config": model.config.to_dict(), "model": model.state_dict(), "step": 8,
                "vocab_size": 257, "eos_id": 256, **extra}, path)


@pytest.mark.parametrize("rope", [False, True])
def test_load_final_roundtrip(tmp_path, rope):
    model = make_model(rope=rope)
    save_final(tmp_path / "final.pt", model)
    loaded, meta = load_final(tmp_path / "final.pt")
    assert not loaded.training and loaded.config == model.config
    assert meta == {"model_config": model.config.to_dict(), "step": 8, "vocab_size": 257, "eos_id": 256}
    idx = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_load_final_refuses_a_pickled_object(tmp_path):
    save_final(tmp_path / "final.pt", make_model(), args=argparse.Namespace(lr=0.1))
    with pytest.raises(ValueError, match=r"final.pt: refused, it pickles argparse.Namespace"):
        load_final(tmp_path / "final.pt")


def test_load_final_names_the_file_at_fault(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_final(tmp_path / "absent.pt")
    torch.save({"model": make_model().state_dict()}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="weights.pt: not a final.pt, missing model_config, step, vocab_size, eos_id"):
        load_final(tmp_path / "weights.pt")
    (tmp_path / "notes.pt").write_text("not torch")
    with pytest.raises(ValueError, match="notes.pt: not a torch.save file \\(not a zip archive\\)"):
        load_final(tmp_path / "notes.pt")
    save_final(tmp_path / "wrong.pt", make_model(), model_config=tiny_config(n_embd=64).to_dict())
    with pytest.raises(ValueError, match="wrong.pt: model_config and weights do not fit"):
        load_final(tmp_path / "wrong.pt")
