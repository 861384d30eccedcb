"""The train step's off-policy wiring (issue 14) in one process, no Ray or DeepSpeed: ``train_on_sequences`` drives a
plain-PyTorch engine (SGD, lr 1, so one step's parameter change is minus the gradient).

  * recompute: the gap between the trainer's old log-probs and a constructed engine mismatch is logged exactly, and
    the token-TIS update equals minus the gradient of the full-batch loss weighted by hand-made min(r, 2) weights;
  * rollout: the gap is measured on the first mini-batch's pre-update forward (engine log-probs = the trainer's: ~0).
"""

from __future__ import annotations

import pytest
import torch

from ngrpo_ray.core.losses import GlobalNormalizers, PolicyLossConfig, policy_loss
from ngrpo_ray.core.records import ResponseRecord
from ngrpo_ray.core.rollout_correction import RolloutCorrection
from ngrpo_ray.training.logprobs import batched_logprobs, response_logprobs
from ngrpo_ray.training.train_sequence import TrainSequence
from ngrpo_ray.training.train_step import StepSettings, train_on_sequences

VOCAB, TEMP = 48, 0.8
LENGTHS = [(3, 5), (6, 2), (2, 7), (4, 4), (5, 1)]  # (prompt, response)
ADV = [1.0, -0.7, 0.4, -1.2, 0.9]


class PlainEngine:
    """The engine interface train_on_sequences uses, in plain PyTorch."""

    def __init__(self, model: torch.nn.Module):
        self.module = model
        self.opt = torch.optim.SGD(model.parameters(), lr=1.0)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False) -> None:
        loss.backward()

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad()


def _model() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).float()


def _sequences(model, log_ratio: list[torch.Tensor] | None) -> list[TrainSequence]:
    """Sequences whose records carry behaviour log-probs = trainer's - log_ratio (the constructed mismatch)."""
    g = torch.Generator().manual_seed(1)
    seqs = []
    for i, (P, T) in enumerate(LENGTHS):
        mixed = torch.rand(T, generator=g) < 0.5
        rec = ResponseRecord(response_ids=torch.randint(2, VOCAB, (T,), generator=g), logprobs=torch.zeros(T),
                             mixed_mask=mixed, cand_ids=torch.randint(2, VOCAB, (T, 3), generator=g),
                             alpha=torch.softmax(torch.randn(T, 3, generator=g), -1))
        seqs.append(TrainSequence(prompt_ids=torch.randint(2, VOCAB, (P,), generator=g), record=rec,
                                  advantage=torch.tensor(ADV[i]), index=i))
    model.eval()
    trainer = batched_logprobs(model, seqs, TEMP, 0)
    for s, lp, i in zip(seqs, trainer, range(len(seqs))):
        s.record.logprobs = lp - (log_ratio[i] if log_ratio is not None else 0.0)
    return seqs


def _flat(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_recompute_logs_the_gap_and_tis_scales_the_update():
    g = torch.Generator().manual_seed(5)
    # r = pi_old / pi_engine per token, spread over [0.3, 3.5]: some above the cap 2
    ratios = [0.3 + 3.2 * torch.rand(T, generator=g) for _, T in LENGTHS]
    log_ratio = [r.log() for r in ratios]
    model = _model()
    seqs = _sequences(model, log_ratio)
    before = _flat(model)

    # ground truth: minus the gradient of the full-batch loss with each token's term times min(r, 2)
    ref_model = _model()
    tb = response_logprobs(ref_model, [s.prompt_ids for s in seqs], [s.record for s in seqs], TEMP)
    weights = torch.zeros_like(tb.logp)
    for i, r in enumerate(ratios):
        weights[i, : r.numel()] = r.clamp(max=2.0)
    norm = GlobalNormalizers(tokens=int(tb.mask.sum()), seqs=len(seqs))
    cfg = PolicyLossConfig(loss_type="grpo")
    policy_loss(tb.logp, tb.logp.detach(), torch.tensor(ADV), tb.mask, cfg, norm, is_weights=weights).loss.backward()
    expected = {n: -p.grad for n, p in ref_model.named_parameters()}

    step = StepSettings(temperature=TEMP, micro_batches=2, shuffle=False,
                        rollout_correction=RolloutCorrection("tis", "token", 2.0))
    m = train_on_sequences(PlainEngine(model), seqs, list(range(len(seqs))), step, cfg)
    got = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    num = sum(float((got[n] - expected[n]).square().sum()) for n in expected)
    den = sum(float(expected[n].square().sum()) for n in expected)
    assert (num / den) ** 0.5 < 1e-5

    all_d = torch.cat(log_ratio).double()
    assert m["mismatch/abs_diff_mean"] == pytest.approx(float(all_d.abs().mean()), rel=1e-4)
    assert m["mismatch/abs_diff_max"] == pytest.approx(float(all_d.abs().max()), rel=1e-4)
    assert m["mismatch/k3_kl"] == pytest.approx(float((all_d.exp() - 1 - all_d).mean()), rel=1e-3)
    assert m["mismatch/frac_abs_diff_over_0.1"] == pytest.approx(float((all_d.abs() > 0.1).double().mean()))
    seq_ratio = torch.tensor([float(d.sum()) for d in log_ratio]).exp()
    assert m["mismatch/seq_ratio_max"] == pytest.approx(float(seq_ratio.max()), rel=1e-4)
    assert m["mismatch/seq_ratio_p50"] == pytest.approx(float(seq_ratio.median()), rel=1e-4)
    assert m["mismatch/tokens"] == sum(T for _, T in LENGTHS) and m["mismatch/sequences_measured"] == 1.0
    capped = torch.cat(ratios) > 2.0
    assert 0 < capped.sum() < capped.numel()
    assert m["rollout_correction/capped_fraction"] == pytest.approx(float(capped.double().mean()))
    assert m["rollout_correction/weight_mean"] == pytest.approx(float(torch.cat(ratios).clamp(max=2).mean()),
                                                                rel=1e-5)


def test_rollout_mode_measures_the_first_mini_batch_before_the_update():
    model = _model()
    seqs = _sequences(model, None)  # the engine's log-probs are the trainer's own
    step = StepSettings(temperature=TEMP, mini_batches=2, old_logprobs="rollout", shuffle=False)
    m = train_on_sequences(PlainEngine(model), seqs, list(range(len(seqs))), step, PolicyLossConfig())
    # mini-batch 1 of 2 holds sequences 0, 1 (round(5 / 2) = 2): 7 tokens, measured before the first step
    assert m["mismatch/sequences_measured"] == pytest.approx(2 / 5) and m["mismatch/tokens"] == 7
    assert m["mismatch/abs_diff_max"] < 1e-5 and m["mismatch/seq_ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert not any(k.startswith("rollout_correction/") for k in m)


def test_correction_refused_with_rollout_log_probs():
    step = StepSettings(old_logprobs="rollout", rollout_correction=RolloutCorrection("mis"))
    with pytest.raises(ValueError, match="trainer.old_logprobs='recompute'"):
        step.validate()


def test_one_step_per_batch_takes_old_log_probs_from_its_own_forward():
    """mini_batches 1, epochs 1: no separate pass for the old log-probs (one forward per micro-batch, not one more per
    sequence chunk before), the ratio is exactly 1 on every token, and the update is the one of the full-batch loss."""
    model = _model()
    seqs = _sequences(model, None)
    before = _flat(model)
    ref_model = _model()
    tb = response_logprobs(ref_model, [s.prompt_ids for s in seqs], [s.record for s in seqs], TEMP)
    norm = GlobalNormalizers(tokens=int(tb.mask.sum()), seqs=len(seqs))
    policy_loss(tb.logp, tb.logp.detach(), torch.tensor(ADV), tb.mask, PolicyLossConfig(), norm).loss.backward()
    expected = {n: -p.grad for n, p in ref_model.named_parameters()}

    calls = []
    handle = model.model.register_forward_hook(lambda *a: calls.append(1))
    step = StepSettings(temperature=TEMP, micro_batches=2, shuffle=False)
    m = train_on_sequences(PlainEngine(model), seqs, list(range(len(seqs))), step, PolicyLossConfig())
    handle.remove()
    assert len(calls) == 2  # the two micro-batches' training forwards, nothing before them
    assert m["ratio_max"] == 1.0 and m["clip_frac"] == 0.0
    assert m["mismatch/tokens"] == sum(T for _, T in LENGTHS) and m["mismatch/abs_diff_max"] < 1e-5
    got = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    num = sum(float((got[n] - expected[n]).square().sum()) for n in expected)
    den = sum(float(expected[n].square().sum()) for n in expected)
    assert (num / den) ** 0.5 < 1e-5
