"""Policy losses: values and gradients by hand on 2x3 examples, every clip branch, GSPO == GSPO-token, clip counts,
and the global normalisers making the gradient independent of the micro-batch / rank split."""

import math

import pytest
import torch

from ngrpo_ray.core.losses import (
    AGGREGATIONS,
    GlobalNormalizers,
    PolicyLossConfig,
    finalize_policy_metrics,
    global_normalizers,
    policy_loss,
    reduce_policy_metrics,
)

OLD = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])


def _logp_for(ratios: list[list[float]], old: torch.Tensor = OLD) -> torch.Tensor:
    """logp such that exp(logp - old) = ratios, as a leaf that collects gradients."""
    return (old + torch.tensor(ratios).log()).detach().requires_grad_(True)


def _run(ratios, adv, mask, config, ref_logp=None):
    logp = _logp_for(ratios)
    out = policy_loss(logp, OLD, adv, mask, config, global_normalizers([mask]), ref_logp=ref_logp)
    out.loss.backward()
    return out, logp.grad


# ratios R, advantages A = [1, -2], eps 0.2 both sides; per-token loss L = max(-A R, -A clip(R, 0.8, 1.2))
#   row 0 (A=+1): R=1.1 -> -1.1 (grad -A R = -1.1); R=1.3 -> max(-1.3, -1.2) = -1.2 clipped high (grad 0);
#                 R=0.7 -> max(-0.7, -0.8) = -0.7 (positive A is not clipped below: grad -0.7)
#   row 1 (A=-2): R=0.9 -> 1.8 (grad -A R = 1.8); R=0.5 -> max(1.0, 1.6) = 1.6 clipped low (grad 0); masked token
R = [[1.1, 1.3, 0.7], [0.9, 0.5, 1.5]]
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
TOKEN_GRADS = torch.tensor([[-1.1, 0.0, -0.7], [1.8, 0.0, 0.0]])  # d L_it / d logp_it


def test_grpo_seq_mean_token_mean_by_hand():
    out, grad = _run(R, ADV, MASK, PolicyLossConfig(loss_type="grpo"))
    # row 0: (-1.1 - 1.2 - 0.7) / 3 = -1.0; row 1: (1.8 + 1.6) / 2 = 1.7; mean over 2 sequences = 0.35
    assert out.loss.item() == pytest.approx(0.35)
    torch.testing.assert_close(grad, TOKEN_GRADS / torch.tensor([[3.0], [2.0]]) / 2)
    m = out.metrics
    assert (m["clip_high_count"].item(), m["clip_low_count"].item(), m["clip_count"].item()) == (1, 1, 2)
    assert m["dual_clip_count"].item() == 0 and m["token_count"].item() == 5
    assert m["ratio_sum"].item() == pytest.approx(1.1 + 1.3 + 0.7 + 0.9 + 0.5)
    assert m["ratio_max"].item() == pytest.approx(1.3)
    f = finalize_policy_metrics(m)
    assert f["clip_frac"] == pytest.approx(2 / 5) and f["clip_frac_high"] == pytest.approx(1 / 5)
    assert f["ratio_mean"] == pytest.approx(4.5 / 5) and f["pg_loss"] == pytest.approx(0.35)


def test_grpo_token_mean_by_hand():
    out, grad = _run(R, ADV, MASK, PolicyLossConfig(loss_type="grpo", aggregation="token_mean"))
    # (-1.1 - 1.2 - 0.7 + 1.8 + 1.6) / 5 tokens = 0.4 / 5
    assert out.loss.item() == pytest.approx(0.08)
    torch.testing.assert_close(grad, TOKEN_GRADS / 5)


def test_dr_grpo_sum_over_constant_by_hand():
    out, grad = _run(R, ADV, MASK, PolicyLossConfig(loss_type="dr_grpo", max_len=4))
    # sum of token losses 0.4, / (max_len 4 * 2 sequences)
    assert out.loss.item() == pytest.approx(0.05)
    torch.testing.assert_close(grad, TOKEN_GRADS / 8)


def test_clip_higher_unclips_the_high_ratio():
    out, grad = _run(R, ADV, MASK, PolicyLossConfig(loss_type="grpo", eps_low=0.2, eps_high=0.35))
    # R=1.3 < 1.35 now: L = -1.3, grad -1.3. row 0 = -3.1/3; loss = (-3.1/3 + 1.7) / 2
    assert out.loss.item() == pytest.approx((-3.1 / 3 + 1.7) / 2)
    assert grad[0, 1].item() == pytest.approx(-1.3 / 3 / 2)
    assert out.metrics["clip_high_count"].item() == 0 and out.metrics["clip_low_count"].item() == 1


def test_dual_clip_each_branch_by_hand():
    ratios = [[4.0, 2.0, 0.5], [4.0, 1.0, 0.5]]
    adv = torch.tensor([-1.0, 1.0])
    mask = torch.ones(2, 3)
    cfg = PolicyLossConfig(loss_type="grpo", dual_clip=3.0, aggregation="token_mean")
    out, grad = _run(ratios, adv, mask, cfg)
    # row 0 (A=-1): R=4 -> max(4, 1.2) = 4, dual: min(4, 3) = 3 (grad 0); R=2 -> 2 (< 3, grad -A R = 2);
    #               R=0.5 -> max(0.5, 0.8) = 0.8 clipped low (grad 0)
    # row 1 (A=+1): R=4 -> max(-4, -1.2) = -1.2 clipped high, dual clip does not apply; R=1 -> -1 (grad -1);
    #               R=0.5 -> -0.5 (grad -0.5)
    assert out.loss.item() == pytest.approx((3 + 2 + 0.8 - 1.2 - 1 - 0.5) / 6)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 2.0, 0.0], [0.0, -1.0, -0.5]]) / 6)
    m = out.metrics
    assert [m[k].item() for k in ("clip_high_count", "clip_low_count", "dual_clip_count", "clip_count")] == [1, 1, 1, 3]
    # without dual clip the R=4, A<0 token is unbounded: loss 4, grad 4
    out2, grad2 = _run(ratios, adv, mask, PolicyLossConfig(loss_type="grpo", aggregation="token_mean"))
    assert out2.loss.item() == pytest.approx((4 + 2 + 0.8 - 1.2 - 1 - 0.5) / 6)
    assert grad2[0, 0].item() == pytest.approx(4 / 6)


def test_kl_loss_term_by_hand():
    logp = _logp_for(R)
    ref = (logp - 1.0).detach()  # log_r = 1 everywhere: k3 = e^-1, d k3 / d logp = 1 - e^-1
    cfg = PolicyLossConfig(loss_type="grpo", beta=0.1, kl_estimator="k3")
    out = policy_loss(logp, OLD, ADV, MASK, cfg, global_normalizers([MASK]), ref_logp=ref)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.35 + 0.1 * math.exp(-1), rel=1e-6)
    expected = (TOKEN_GRADS + 0.1 * (1 - math.exp(-1)) * MASK) / torch.tensor([[3.0], [2.0]]) / 2
    torch.testing.assert_close(logp.grad, expected)
    assert out.metrics["kl_sum"].item() == pytest.approx(5 * math.exp(-1), rel=1e-6)
    assert out.metrics["pg_loss"].item() == pytest.approx(0.35)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, OLD, ADV, MASK, cfg, global_normalizers([MASK]))


# GSPO: log ratios row 0 [0.1, 0.2, 0.3] (mean 0.2, s0 = e^0.2 = 1.221403), row 1 [-0.1, 0.1, masked 5] (s1 = 1)
GSPO_R = [[math.exp(0.1), math.exp(0.2), math.exp(0.3)], [math.exp(-0.1), math.exp(0.1), math.exp(5.0)]]
GSPO_ADV = torch.tensor([1.0, -1.0])


@pytest.mark.parametrize("loss_type", ["gspo", "gspo_token"])
def test_gspo_by_hand(loss_type):
    s0 = math.exp(0.2)
    out, grad = _run(GSPO_R, GSPO_ADV, MASK, PolicyLossConfig(loss_type=loss_type, eps_low=0.2, eps_high=0.3))
    # unclipped: loss_i = -A_i s_i; loss = (-s0 + 1) / 2; d loss_i / d logp_t = -A_i s_i / |o_i|, then / 2 sequences
    assert out.loss.item() == pytest.approx((-s0 + 1.0) / 2, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-s0 / 3 / 2] * 3, [0.25, 0.25, 0.0]]))
    assert out.metrics["clip_count"].item() == 0
    # eps_high 0.2: s0 = 1.2214 > 1.2 with A > 0 -> clipped: loss_0 = -1.2, no gradient; all 3 tokens count as clipped
    out, grad = _run(GSPO_R, GSPO_ADV, MASK, PolicyLossConfig(loss_type=loss_type, eps_low=0.2, eps_high=0.2))
    assert out.loss.item() == pytest.approx((-1.2 + 1.0) / 2, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.0] * 3, [0.25, 0.25, 0.0]]))
    assert out.metrics["clip_high_count"].item() == 3


def test_gspo_and_gspo_token_same_value_and_gradient_random():
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 7, generator=g) * 3
    logp0 = old + torch.randn(4, 7, generator=g) * 0.05
    mask = torch.ones(4, 7)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    for agg in ("seq_mean_token_mean", "token_mean"):
        results = []
        for lt in ("gspo", "gspo_token"):
            logp = logp0.clone().requires_grad_(True)
            cfg = PolicyLossConfig(loss_type=lt, eps_low=0.02, eps_high=0.03, dual_clip=3.0, aggregation=agg)
            out = policy_loss(logp, old, adv, mask, cfg, global_normalizers([mask]))
            out.loss.backward()
            results.append((out.loss.detach(), logp.grad, out.metrics["clip_count"]))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-9)
        assert results[0][2] == results[1][2]
        assert results[0][1].abs().sum() > 0  # not everything clipped


def test_gspo_rejects_token_advantages():
    with pytest.raises(ValueError, match="gspo_token"):
        policy_loss(_logp_for(R), OLD, torch.ones(2, 3), MASK, PolicyLossConfig(loss_type="gspo"),
                    GlobalNormalizers(5, 2))


def test_config_validation_names_allowed_values():
    with pytest.raises(ValueError, match="grpo, gspo, gspo_token, dr_grpo"):
        PolicyLossConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="max_len"):
        PolicyLossConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLossConfig(dual_clip=0.5)


def test_global_normalizers_counts():
    m1 = torch.tensor([[1, 1, 0], [0, 0, 0]])
    m2 = torch.tensor([[1, 1, 1, 1]])
    assert global_normalizers([m1, m2]) == GlobalNormalizers(tokens=6, seqs=2)


# ---- gradient independent of the split (micro-batches, ranks) thanks to global normalisers ----

def _batch():
    g = torch.Generator().manual_seed(11)
    lengths = [6, 2, 4, 1, 5, 3]  # unequal lengths
    b, t = len(lengths), max(lengths)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).float()
    old = -torch.rand(b, t, generator=g) * 2
    logp = old + torch.randn(b, t, generator=g) * 0.3  # big enough to hit the clips
    ref = old + torch.randn(b, t, generator=g) * 0.1
    adv = torch.randn(b, generator=g)
    return logp, old, ref, adv, mask


def _grad(parts, config, norm, logp_full, old, ref, adv, mask):
    """Sum of micro-batch losses over `parts` (row index lists), each trimmed to its own padded length."""
    logp = logp_full.clone().requires_grad_(True)
    total = 0.0
    metrics = []
    for rows in parts:
        rows = torch.tensor(rows)
        width = int(mask[rows].sum(1).max())
        sl = (rows, slice(None, width))
        out = policy_loss(logp[rows][:, :width], old[sl], adv[rows], mask[sl], config, norm, ref_logp=ref[sl])
        total = total + out.loss
        metrics.append(out.metrics)
    total.backward()
    return logp.grad, reduce_policy_metrics(metrics)


CASES = [("grpo", a) for a in AGGREGATIONS] + [("gspo", "seq_mean_token_mean"), ("gspo_token", "token_mean"),
                                               ("dr_grpo", "seq_mean_token_sum_norm")]


@pytest.mark.parametrize("loss_type,aggregation", CASES)
def test_same_gradient_for_any_micro_batch_or_rank_split(loss_type, aggregation):
    logp, old, ref, adv, mask = _batch()
    cfg = PolicyLossConfig(loss_type=loss_type, aggregation=aggregation, max_len=8, eps_low=0.2, eps_high=0.28,
                           dual_clip=3.0, beta=0.01, kl_estimator="k3")
    everything = [[0, 1, 2, 3, 4, 5]]
    two_micro = [[0, 1], [2, 3, 4, 5]]
    rank0, rank1 = [[0], [1, 2]], [[3, 4], [5]]  # 2 ranks x 2 accumulation micro-batches
    norm = global_normalizers([mask[r] for p in (rank0, rank1) for r in p])  # "all-reduced" counts
    assert norm == GlobalNormalizers(tokens=21, seqs=6)

    g_full, m_full = _grad(everything, cfg, norm, logp, old, ref, adv, mask)
    g_two, m_two = _grad(two_micro, cfg, norm, logp, old, ref, adv, mask)
    g_r0, m_r0 = _grad(rank0, cfg, norm, logp, old, ref, adv, mask)
    g_r1, m_r1 = _grad(rank1, cfg, norm, logp, old, ref, adv, mask)
    g_ranks = g_r0 + g_r1  # all-reduce SUM of the rank gradients
    scale = g_full.abs().max()
    assert scale > 0
    assert ((g_two - g_full).abs().max() / scale).item() < 1e-6
    assert ((g_ranks - g_full).abs().max() / scale).item() < 1e-6
    m_ranks = reduce_policy_metrics([m_r0, m_r1])
    for key in ("loss", "clip_count", "ratio_sum", "ratio_max", "kl_sum", "token_count"):
        assert m_two[key].item() == pytest.approx(m_full[key].item(), rel=1e-6)
        assert m_ranks[key].item() == pytest.approx(m_full[key].item(), rel=1e-6)
    assert m_full["clip_count"].item() > 0  # the example does exercise the clips

    # control: per-micro-batch (local) normalisers change the gradient for the length-sensitive modes
    logp_c = logp.clone().requires_grad_(True)
    local = 0.0
    for rows in two_micro:
        rows = torch.tensor(rows)
        local = local + policy_loss(logp_c[rows], old[rows], adv[rows], mask[rows], cfg,
                                    global_normalizers([mask[rows]]), ref_logp=ref[rows]).loss
    local.backward()
    assert (logp_c.grad - g_full).abs().max() / scale > 1e-3


def test_entropy_metric_from_logits():
    logits = torch.zeros(2, 3, 4)  # uniform over 4 tokens: entropy log 4 per token
    out = policy_loss(_logp_for(R), OLD, ADV, MASK, PolicyLossConfig(), global_normalizers([MASK]), logits=logits)
    assert finalize_policy_metrics(out.metrics)["entropy_mean"] == pytest.approx(math.log(4))


def test_per_token_advantages():
    # [B] advantages and their [B, T] broadcast give the same loss; a per-token advantage changes only its token
    out_seq, grad_seq = _run(R, ADV, MASK, PolicyLossConfig(loss_type="grpo"))
    token_adv = ADV[:, None].expand(2, 3).clone()
    out_tok, grad_tok = _run(R, token_adv, MASK, PolicyLossConfig(loss_type="grpo"))
    assert out_tok.loss.item() == pytest.approx(out_seq.loss.item())
    torch.testing.assert_close(grad_tok, grad_seq)
    token_adv[0, 0] = 0.0  # e.g. a first step zeroed by correct-path selection: its token gives no gradient
    out_zero, grad_zero = _run(R, token_adv, MASK, PolicyLossConfig(loss_type="grpo"))
    assert grad_zero[0, 0].item() == 0.0
    assert out_zero.loss.item() == pytest.approx(0.35 + 1.1 / 3 / 2)
    torch.testing.assert_close(grad_zero[1], grad_seq[1])
