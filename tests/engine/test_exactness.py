"""Done-when 1: teacher-forcing the recorded responses and mixtures through the HF model reproduces every anchor,
every alpha (1e-5) and every rollout logprob (1e-4); a control fed plain anchor embeddings differs."""

from __future__ import annotations

import pytest
import torch

from ngrpo_ray.core.mixing_params import MixingParams
from ngrpo_ray.core.neighbors import build_neighbor_table, valid_row_mask
from ngrpo_ray.engine.rollout import generate_rollout

from conftest import engine_for
from hf_oracle import control_max_gap, load_hf, teacher_forced_logits
from tiny_models import EOS_ID

TEMPERATURE = 0.8
PROMPTS = [[(7 * i + j) % 300 + 2 for j in range(3 + i % 4)] for i in range(8)]


def check_batch_against_hf(model, batch, k: int, tau: float) -> dict:
    """Asserts the exactness contract; returns counts so callers can assert mixing really happened."""
    E = model.get_input_embeddings().weight.detach()
    # The engine's neighbor rows: the tokenizer's ids (every row of the tiny models) minus EOS (never_mix default).
    table = build_neighbor_table(E, k, metric="cosine", valid=valid_row_mask(E.shape[0], exclude=[EOS_ID]))
    forced = teacher_forced_logits(model, batch)
    n_mixed = 0
    for b, logits in enumerate(forced):
        resp, mixed = batch.response_ids[b], batch.mixed_mask[b]
        logp = torch.log_softmax(logits / TEMPERATURE, dim=-1)
        expected_lp = logp.gather(1, resp.unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(batch.logprobs[b], expected_lp, atol=1e-4, rtol=0)
        for t in torch.nonzero(mixed).flatten().tolist():
            anchor = int(logits[t].argmax())
            assert int(resp[t]) == anchor, f"response {b} step {t}: emitted {int(resp[t])}, argmax {anchor}"
            assert batch.cand_ids[b][t].tolist() == table[anchor].tolist()
            alpha = torch.softmax(logits[t][table[anchor]] / tau, dim=-1)
            torch.testing.assert_close(batch.alpha[b][t], alpha, atol=1e-5, rtol=0)
            n_mixed += 1
    return {"mixed": n_mixed}


@pytest.mark.engine
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_rollout_matches_hf_teacher_forcing(request, tiny_models, family, eos_id):
    llm = engine_for(request, family)
    mixing = MixingParams(strategy="neighbor_mix", rho=0.5, k=3)
    batch = generate_rollout(llm, PROMPTS, {"temperature": TEMPERATURE, "max_tokens": 24}, mixing,
                             policy_version=3, group_size=2, stop_token_ids=[eos_id])
    assert len(batch) == 16 and batch.policy_version.tolist() == [3] * 16
    model = load_hf(tiny_models[family])
    counts = check_batch_against_hf(model, batch, k=3, tau=TEMPERATURE)
    assert counts["mixed"] >= 20, counts  # about half of ~380 steps: the check above really covered mixtures
    assert control_max_gap(model, batch, TEMPERATURE) > 1e-2
