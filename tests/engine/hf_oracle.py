"""Teacher-forcing a RolloutBatch through the HF model: the oracle of the exactness tests."""

from __future__ import annotations

import torch

from ngrpo_ray.core.records import rebuild_inputs_embeds


def load_hf(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def teacher_forced_logits(model, batch, use_mixtures: bool = True) -> list[torch.Tensor]:
    """Per response: [T, V] logits that predicted each response token (row t comes from position P + t - 1)."""
    padded = batch.to_padded(pad_id=0)
    E = model.get_input_embeddings().weight
    mask = padded.mixed_mask if use_mixtures else torch.zeros_like(padded.mixed_mask)
    embeds = rebuild_inputs_embeds(padded.input_ids, E, mask, padded.cand_ids, padded.alpha)
    logits = model(inputs_embeds=embeds, attention_mask=padded.attention_mask).logits.float()
    out = []
    for b in range(len(batch)):
        P, T = int(batch.prompt_ids[b].numel()), int(batch.response_ids[b].numel())
        out.append(logits[b, P - 1 : P + T - 1])
    return out


def control_max_gap(model, batch, temperature: float) -> float:
    """Largest logprob gap to the rollout's when the mixtures are replaced by plain anchor embeddings (the control:
    without the recorded inputs the trainer could not reproduce the engine)."""
    forced = teacher_forced_logits(model, batch, use_mixtures=False)
    gap = 0.0
    for b, logits in enumerate(forced):
        lp = torch.log_softmax(logits / temperature, -1).gather(1, batch.response_ids[b].unsqueeze(1)).squeeze(1)
        gap = max(gap, float((lp - batch.logprobs[b]).abs().max()))
    return gap
