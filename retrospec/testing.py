"""Helpers for fast mechanics tests: a tiny random model with a real tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_model(path: str | Path, tokenizer: str = "smollm2-135m", seed: int = 0) -> str:
    """Save a 2-layer, hidden-64 random Llama with ``tokenizer``'s vocabulary (and the
    tokenizer itself) to ``path``; return the path. Loads and generates in milliseconds:
    for testing wiring (CLI, pipelines), not text quality."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from retrospec.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve(tokenizer))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
