"""Llama and Qwen2 folders written by transformers itself (small random configs, no download) run
in our model and engine exactly as transformers runs them, and what `load_hf` cannot run it
refuses by name (pipeline/hf.py, pipeline/model/gpt.py)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from pipeline.hf import hf_model, load_hf
from pipeline.inference import Engine, SamplingParams
from pipeline.model.gpt import GPT, GPTConfig

VOCAB = 320
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matmuls: one thread


def random_hf(kind: str, seed: int = 0, **overrides):
    """A transformers model of a small random config, every parameter drawn at random (norm weights
    and biases too, which transformers initialises to 1 and 0, where a mapping error would hide)."""
    config = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    if kind == "llama":  # GQA, an untied head, Llama 3's rope scaling
        config |= dict(tie_word_embeddings=False, rope_parameters=dict(
            rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32))
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, **overrides}))
    else:  # q, k, v biases and tied embeddings
        config |= dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6))
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**config, **overrides}))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = random_hf(request.param)
    model.generation_config.eos_token_id = [7, 11]
    model.save_pretrained(folder)
    return request.param, model, folder


def test_logits_equal_transformers(hf_folder):
    kind, hf, folder = hf_folder
    ours, meta = load_hf(folder)
    config = ours.config
    assert (config.kv_head_count, config.qkv_bias, config.tie_embeddings) == \
        ((2, False, False) if kind == "llama" else (2, True, True))
    assert (config.rope_scaling is not None) == (kind == "llama")
    assert meta["architecture"] == ("LlamaForCausalLM" if kind == "llama" else "Qwen2ForCausalLM")
    assert meta["eos_ids"] == [7, 11]
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (3, 100))  # past original_max_position_embeddings: the scaled band counts
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)[..., :VOCAB]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.99


def test_engine_greedy_equals_transformers_generate(hf_folder):
    """Paged KV blocks of 4, the prefix cache (two prompts share a 9-token start), continuous
    batching (6 prompts, 3 at a time, so requests join mid-run), against `generate` one prompt at a time."""
    _, hf, folder = hf_folder
    ours, _ = load_hf(folder)
    torch.manual_seed(2)
    shared = torch.randint(0, VOCAB, (9,)).tolist()
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (1, 5, 17, 30)] + [shared + [3], shared + [4, 5]]
    engine = Engine(ours, max_batch_size=3, block_size=4)
    got = [c.token_ids for c in engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))]
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert got == expected
    assert engine.stats.prefix_blocks_hit > 0


def test_llama_shape_exports_as_llama_and_comes_back(tmp_path):
    """Our Llama options -> LlamaForCausalLM with the same logits -> load_hf gives our config back."""
    torch.manual_seed(0)
    config = GPTConfig.from_size("nano", architecture="llama", vocab_size=100, seq_len=64, n_kv_head=1)
    ours = GPT(config).eval()
    hf = hf_model(ours, 100, 0, [0])
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, 100, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[..., :100], hf(idx).logits, atol=1e-5, rtol=0)
    hf.save_pretrained(tmp_path)
    back, _ = load_hf(tmp_path)
    same = ("n_layer", "n_head", "kv_head_count", "n_embd", "mlp_hidden", "norm", "mlp", "bias", "tie_embeddings",
            "rope", "rope_theta", "rope_scaling", "seq_len", "vocab_size")
    assert {k: getattr(back.config, k) for k in same} == {k: getattr(config, k) for k in same}
    with torch.no_grad():
        assert torch.equal(back(idx)[..., :100], ours(idx)[..., :100])


def test_sharded_weights_load_and_missing_shards_are_named(tmp_path):
    hf = random_hf("llama")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    ours, _ = load_hf(tmp_path)
    idx = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[..., :VOCAB], hf(idx).logits, atol=1e-4, rtol=0)
    (tmp_path / shards[-1]).rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=f"{shards[-1]}: missing shard"):
        load_hf(tmp_path)


def write_config(folder, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, error", [
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"), "architecture 'MistralForCausalLM'"),
    (dict(sliding_window=4096), "sliding_window = 4096: not computed"),
    (dict(num_local_experts=8), "num_local_experts = 8: not computed"),
    (dict(attention_bias=True), "attention_bias = True: not computed"),
    (dict(hidden_act="gelu"), "hidden_act = 'gelu': not computed"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)), "rope_parameters = .*yarn"),
    (dict(head_dim=32), "head_dim = 32: not computed"),
    (dict(intermediate_size=128), r"mlp.down_proj.weight \(64, 96\) \(config.json says \(64, 128\)\)"),
    (dict(tie_word_embeddings=True), "lm_head.weight differs from model.embed_tokens.weight"),
])
def test_what_our_model_does_not_compute_is_refused_by_name(tmp_path, changes, error):
    random_hf("llama").save_pretrained(tmp_path)
    write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=error):
        load_hf(tmp_path)


def test_qwen2_sliding_window_and_missing_tensors_are_refused(tmp_path):
    random_hf("qwen2").save_pretrained(tmp_path)
    load_hf(tmp_path)  # Qwen2 keeps a window size that use_sliding_window leaves off
    write_config(tmp_path, use_sliding_window=True, sliding_window=64)
    with pytest.raises(ValueError, match="use_sliding_window = True"):
        load_hf(tmp_path)
    write_config(tmp_path, use_sliding_window=False)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.bias"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing model.layers.1.self_attn.k_proj.bias"):
        load_hf(tmp_path)
