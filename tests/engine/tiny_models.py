"""Writes tiny random fp32 Qwen2 / Llama checkpoints (with a WordLevel tokenizer) that vLLM's CPU engine can load."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320
EOS_ID = 1


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": EOS_ID}
    for i in range(2, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<pad>")
    fast.save_pretrained(str(path))


def write_tiny_model(path: Path, family: str, seed: int = 0, tokenizer=None, vocab_size: int = VOCAB,
                     eos_id: int = EOS_ID) -> Path:
    """A 2-layer, head_dim 64 causal LM with random weights (``family`` is "qwen2" or "llama"); by default with a
    320-word tokenizer, else with ``tokenizer`` saved next to it (e.g. the R1 one, vocab_size 151,936)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=512, eos_token_id=eos_id, bos_token_id=eos_id,
        pad_token_id=0, tie_word_embeddings=(family == "qwen2"), torch_dtype="float32",
    )
    torch.manual_seed(seed)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(family)
    with torch.no_grad():  # larger logits than the default init so sampling is not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model = model.to(torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer is None:
        _write_tokenizer(path)
    else:
        tokenizer.save_pretrained(str(path))
    return path
