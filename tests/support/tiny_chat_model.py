"""A tiny random Llama that speaks the real SmolLM2 vocabulary (49,152 tokens, chat template included).

Engine-and-trainer plumbing tests need a tokenizer that round-trips text (prompts are rendered from problems and
responses graded as text); the weights are random, so the model is fast and its answers are noise.
"""

from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_chat_model(path: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ngrpo_ray.models.offline import resolve_model

    if (path / "config.json").exists():
        return path
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # larger than the default init so sampling is not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path
