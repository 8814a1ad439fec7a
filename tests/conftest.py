"""Shared fixtures: tiny random models (fast mechanics) and real models (losslessness)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "bench"


def tiny_config(arch: str, vocab: int = 96, **overrides):
    """A 2-layer, hidden-64 config of ``arch`` (llama, qwen2, gpt2, gemma3)."""
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                         bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               max_position_embeddings=1024)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(arch: str = "llama", attn: str = "sdpa", seed: int = 0, vocab: int = 96, **overrides):
    """A tiny randomly initialised causal LM (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    # widen the top-1 margins of the random model (far above fp32 noise) so that greedy
    # comparisons test the algorithm, not rounding; Gemma's scaled embeddings need no help
    if arch != "gemma3":
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(3.0)
    return model.eval()


def repetitive_prompt(vocab: int, length: int, seed: int = 0) -> torch.Tensor:
    """A prompt made of a few repeated random phrases, so the context source has matches."""
    gen = np.random.default_rng(seed)
    phrases = [gen.integers(3, vocab, size=gen.integers(3, 7)).tolist() for _ in range(4)]
    out: list[int] = []
    while len(out) < length:
        out += phrases[gen.integers(0, len(phrases))]
    return torch.tensor([out[:length]])


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct in fp32 (fetched into the cache on first use)."""
    import retrospec

    return retrospec.load_model("smollm2-135m", "float32")


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point the retrospec cache at a temporary directory."""
    monkeypatch.setenv("RETROSPEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny random Llama with the real SmolLM2 tokenizer (for CLI and pipeline tests)."""
    from retrospec.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
