"""Issue 4, acceptance 6 (and issue 12, done-when 3): the update does not depend on the number of trainer workers,
on the number of micro-batches, or on cutting micro-batches by a token budget instead of a count.

SGD with lr 1, no momentum, no clipping: the parameter change of one step IS minus the gradient. It is compared,
for each aggregation mode, between DeepSpeed groups of 1 worker (ZeRO-0) and 2 workers (ZeRO-2), with 1 and 2
micro-batches, and with token budgets (``max_tokens_per_micro_batch``: sorted, packed by padded size; ranks with
fewer micro-batches run zero-weight dummies), against a plain single-process PyTorch gradient of the full-batch loss
(the ground truth).
The batch has unequal prompt and response lengths, mixed records, an odd sequence count (uneven shards).
Issue 14: the same holds with token-level TIS rollout correction (weights built per rank from its own sequences).
"""

from __future__ import annotations

import pytest
import ray
import torch

from ngrpo_ray.core.losses import GlobalNormalizers, PolicyLossConfig, policy_loss
from ngrpo_ray.core.records import ResponseRecord
from ngrpo_ray.core.rollout_correction import RolloutCorrection
from ngrpo_ray.distributed.trainer_config import TrainerGroupConfig
from ngrpo_ray.distributed.trainer_group import TrainerGroup
from ngrpo_ray.training.deepspeed_config import DeepSpeedSettings
from ngrpo_ray.training.logprobs import response_logprobs
from ngrpo_ray.training.train_step import StepSettings

pytestmark = pytest.mark.ray

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
TIS = RolloutCorrection("tis", "token", 2.0)  # records' log-probs are 0: r = pi_old / 1, weights = pi_old per token
LENGTHS = [(3, 5), (6, 2), (2, 7), (4, 4), (5, 1)]  # (prompt, response): 5 sequences, uneven over 2 ranks
# (micro_batches, token budget): a count, or a budget: 9 tokens puts each sequence alone (rank 0 of 2 runs 3 micro-
# batches, rank 1 runs 2 and a dummy), 18 pairs them, 1 is below every sequence (each alone again)
SPLITS = ((1, None), (2, None), (1, 9), (1, 18), (1, 1))
VOCAB, MAX_LEN, TEMP = 48, 8, 0.8


def _tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).float()


def _batch():
    g = torch.Generator().manual_seed(1)
    prompts, records = [], []
    for P, T in LENGTHS:
        prompts.append(torch.randint(2, VOCAB, (P,), generator=g))
        mixed = torch.rand(T, generator=g) < 0.5
        mixed[0] = True  # every response has a mixed input
        records.append(ResponseRecord(
            response_ids=torch.randint(2, VOCAB, (T,), generator=g), logprobs=torch.zeros(T), mixed_mask=mixed,
            cand_ids=torch.randint(2, VOCAB, (T, 3), generator=g),
            alpha=torch.softmax(torch.randn(T, 3, generator=g), -1)))
    advantages = torch.tensor([1.0, -0.7, 0.4, -1.2, 0.9])
    return prompts, records, advantages


def _loss_config(agg: str) -> PolicyLossConfig:
    return PolicyLossConfig(loss_type="grpo", aggregation=agg, max_len=MAX_LEN)


def _reference_updates(path: str) -> dict[str, dict[str, torch.Tensor]]:
    """-grad of the full-batch loss in one process, per aggregation mode."""
    from transformers import AutoModelForCausalLM

    prompts, records, adv = _batch()
    out = {}
    for agg in AGGREGATIONS:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tb = response_logprobs(model, prompts, records, TEMP)
        norm = GlobalNormalizers(tokens=int(tb.mask.sum()), seqs=len(records))
        loss = policy_loss(tb.logp, tb.logp.detach(), adv, tb.mask, _loss_config(agg), norm).loss
        loss.backward()
        out[agg] = {n: -p.grad.clone() for n, p in model.named_parameters()}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tb = response_logprobs(model, prompts, records, TEMP)
    norm = GlobalNormalizers(tokens=int(tb.mask.sum()), seqs=len(records))
    weights = (tb.logp.detach().exp() * tb.mask).clamp(max=2.0)
    policy_loss(tb.logp, tb.logp.detach(), adv, tb.mask, _loss_config("seq_mean_token_mean"), norm,
                is_weights=weights).loss.backward()
    out["tis"] = {n: -p.grad.clone() for n, p in model.named_parameters()}
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model"))
    _tiny_model().save_pretrained(path)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield path
    ray.shutdown()


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[n] - b[n]).square().sum()) for n in b)
    den = sum(float(b[n].square().sum()) for n in b)
    return (num / den) ** 0.5


def test_update_is_independent_of_workers_and_micro_batches(setup):
    path = setup
    expected = _reference_updates(path)
    prompts, records, adv = _batch()
    ref = ray.put({"prompts": prompts, "records": records})
    got: dict[tuple[int, int, str], dict[str, torch.Tensor]] = {}
    for workers, stage in ((1, 0), (2, 2)):
        cfg = TrainerGroupConfig(model_path=path, num_workers=workers, cpus_per_worker=1,
                                 deepspeed=DeepSpeedSettings(zero_stage=stage, optimizer="sgd", lr=1.0, grad_clip=0.0),
                                 step=StepSettings(temperature=TEMP, shuffle=False))
        with TrainerGroup(cfg) as group:
            initial = group.state_dict()
            for split in SPLITS:
                for agg in AGGREGATIONS:
                    if split[1] is not None and agg != "seq_mean_token_mean":
                        continue  # budgets: one aggregation is enough (the normalisers are shared code)
                    group.load_state_dict(initial)
                    step = StepSettings(temperature=TEMP, micro_batches=split[0], shuffle=False,
                                        max_tokens_per_micro_batch=split[1], logprob_chunk_tokens=3)
                    metrics = group.train([ref], adv, loss=_loss_config(agg), step=step)
                    assert metrics["tokens"] == sum(T for _, T in LENGTHS) and metrics["seqs"] == len(LENGTHS)
                    after = group.state_dict()
                    got[(workers, split, agg)] = {n: after[n] - initial[n] for n in initial}
                # rollout correction: each rank's weights follow its own sequences through the micro-batches
                for micro in (1, 2):
                    group.load_state_dict(initial)
                    metrics = group.train([ref], adv, loss=_loss_config("seq_mean_token_mean"),
                                          step=StepSettings(temperature=TEMP, micro_batches=micro, shuffle=False,
                                                            rollout_correction=TIS))
                    assert metrics["rollout_correction/capped_fraction"] == 0.0
                    assert metrics["mismatch/tokens"] == sum(T for _, T in LENGTHS)
                    after = group.state_dict()
                    got[(workers, micro, "tis")] = {n: after[n] - initial[n] for n in initial}
    for agg in AGGREGATIONS:
        assert _rel(expected[agg], expected["token_mean"]) > 1e-2 or agg == "token_mean"  # modes really differ
        for key in [k for k in got if k[2] == agg]:
            assert _rel(got[key], expected[agg]) < 1e-5, (key, _rel(got[key], expected[agg]))
    assert _rel(expected["tis"], expected["seq_mean_token_mean"]) > 1e-1  # the weights really change the update
    for key in ((1, 1, "tis"), (1, 2, "tis"), (2, 1, "tis"), (2, 2, "tis")):
        assert _rel(got[key], expected["tis"]) < 1e-5, (key, _rel(got[key], expected["tis"]))
    assert len(got) == 2 * (2 * len(AGGREGATIONS) + 3) + 4
