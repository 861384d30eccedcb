"""Tiny seeded fp32 transformers models (no downloads) for the core tests."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
            initializer_range=0.1)  # large init: peaky logits, so a changed input visibly changes the output


def _build(cls, config_cls, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls(config_cls(**TINY)).float().eval()
    return model


@pytest.fixture(scope="session")
def tiny_qwen2() -> torch.nn.Module:
    return _build(Qwen2ForCausalLM, Qwen2Config, 0)


@pytest.fixture(scope="session")
def tiny_llama() -> torch.nn.Module:
    return _build(LlamaForCausalLM, LlamaConfig, 1)


@pytest.fixture(scope="session")
def prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    lengths = [5, 9, 3, 7, 9, 4, 6, 8]
    return [torch.randint(3, 64, (n,), generator=g) for n in lengths]
