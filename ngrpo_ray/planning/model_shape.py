"""A causal LM's shape (what memory depends on), read offline from its config.json.

Where `model.path` is a local folder (or in the local HF cache) its config.json is read; otherwise the package's
copies of the paper models' config.json shapes (planning/shapes/, keyed by the hub id) stand in, since the hub may
not be reachable where a run is planned.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

SHAPES_DIR = Path(__file__).resolve().parent / "shapes"


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool  # Qwen2: biases on q, k, v
    qk_norm: bool  # Qwen3: RMSNorm on q and k per head
    source: str = ""  # where the numbers came from

    @classmethod
    def from_config(cls, c: dict, source: str = "") -> "ModelShape":
        text = c.get("text_config") or c  # multimodal wrappers keep the LM's shape there
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        model_type = str(text.get("model_type", ""))
        return cls(
            hidden=hidden,
            intermediate=int(text["intermediate_size"]),
            layers=int(text["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            vocab=int(text["vocab_size"]),
            tied_embeddings=bool(c.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            qkv_bias=bool(text.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type.startswith("qwen3"),
            source=source,
        )

    def layer_params(self) -> int:
        h, d = self.hidden, self.head_dim
        q, kv = self.heads * d, self.kv_heads * d
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0) + (2 * d if self.qk_norm else 0)
        mlp = 3 * h * self.intermediate
        return attn + mlp + 2 * h  # + the two RMSNorm weights

    def params(self) -> int:
        """Parameter count of the causal LM (embedding, layers, final norm, output head unless tied)."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied_embeddings else 2) + self.layers * self.layer_params() + self.hidden


def shipped_shape_file(model_path: str) -> Path:
    return SHAPES_DIR / f"{model_path.strip('/').replace('/', '--')}.json"


def shipped_models() -> list[str]:
    return sorted(p.stem.replace("--", "/") for p in SHAPES_DIR.glob("*.json"))


def read_model_shape(model_path: str, cache_dir: str = "~/.cache/ngrpo_ray/models") -> ModelShape:
    """The shape of `model_path`: its local config.json when there is one, else the shipped copy of its shape."""
    from ngrpo_ray.config.dry_run import find_model_folder

    folder, why = find_model_folder(model_path, cache_dir, prepare_demo=False)
    if folder is not None and (folder / "config.json").exists():
        return ModelShape.from_config(json.loads((folder / "config.json").read_text()), f"{folder / 'config.json'}")
    shipped = shipped_shape_file(model_path)
    if shipped.exists():
        return ModelShape.from_config(json.loads(shipped.read_text()), f"shipped shape of {model_path}")
    producer = producing_preset(model_path)
    if producer is not None:  # a checkpoint another preset's run writes: a fine-tuned model has its base's shape
        name, base = producer
        shape = read_model_shape(base, cache_dir)
        return dataclasses.replace(shape, source=f"{shape.source}; preset {name} trains it into {model_path}")
    raise FileNotFoundError(
        f"no config.json for model.path '{model_path}' ({why}); give a local model folder, or one of the shapes "
        f"shipped for planning: {', '.join(shipped_models())}")


def producing_preset(model_path: str) -> tuple[str, str] | None:
    """(preset name, its model.path) of the preset whose trainer.output_dir holds `model_path`, if one does."""
    from ngrpo_ray.config.load import PRESET_DIR, ConfigError, load_config

    target = Path(model_path).expanduser()
    for preset in sorted(PRESET_DIR.glob("*.yaml")):
        try:
            cfg = load_config(preset.stem)
        except ConfigError:
            continue
        out = Path(cfg.trainer.output_dir).expanduser()
        if cfg.model.path != model_path and target.is_relative_to(out):
            return preset.stem, cfg.model.path
    return None
