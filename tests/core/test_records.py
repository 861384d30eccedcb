"""Input reconstruction from records and alignment with a padded [prompt; response] batch."""

import shutil

import pytest
import torch

from ngrpo_ray.core.records import (ResponseRecord, align_records, mix_embeddings, noise_from_seeds,
                                    rebuild_inputs_embeds)

E_HAND = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 3.0]])


def test_rebuild_hand_example_and_gradients():
    E = E_HAND.clone().requires_grad_(True)
    ids = torch.tensor([[0, 2, 3]])
    mask = torch.tensor([[False, True, False]])
    cand = torch.tensor([[[0, 0], [2, 1], [3, 3]]])
    alpha = torch.tensor([[[1.0, 0.0], [0.75, 0.25], [1.0, 0.0]]], requires_grad=True)
    out = rebuild_inputs_embeds(ids, E, mask, cand, alpha)
    # position 1: 0.75 * [2, 2] + 0.25 * [0, 1] = [1.5, 1.75]; others are plain lookups
    assert out.tolist() == [[[1.0, 0.0], [1.5, 1.75], [-1.0, 3.0]]]
    out.sum().backward()
    # d sum / d E[v] = (number of plain uses + sum of mixture weights on v) * [1, 1]
    assert E.grad.tolist() == [[1.0, 1.0], [0.25, 0.25], [0.75, 0.75], [1.0, 1.0]]
    assert alpha.grad is None  # weights are constants


def test_rebuild_without_mask_is_plain_lookup_and_mix_matches_einsum():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(20, 6, generator=g)
    ids = torch.randint(0, 20, (3, 7), generator=g)
    cand = torch.randint(0, 20, (3, 7, 3), generator=g)
    alpha = torch.softmax(torch.randn(3, 7, 3, generator=g), -1)
    none = torch.zeros(3, 7, dtype=torch.bool)
    assert torch.equal(rebuild_inputs_embeds(ids, E, none, cand, alpha), E[ids])
    mask = torch.rand(3, 7, generator=g) < 0.5
    out = rebuild_inputs_embeds(ids, E, mask, cand, alpha)
    ref = torch.where(mask.unsqueeze(-1), torch.einsum("blk,blkd->bld", alpha, E[cand]), E[ids])
    torch.testing.assert_close(out, ref)
    # bit-identical to the per-step mixture the strategies compute on [B, k]
    assert torch.equal(out[mask], mix_embeddings(E, cand[mask], alpha[mask]))


def test_rebuild_with_noise_only_at_masked_positions():
    ids = torch.tensor([[1, 2]])
    mask = torch.tensor([[True, False]])
    noise = torch.tensor([[[0.5, -0.5], [9.0, 9.0]]])
    out = rebuild_inputs_embeds(ids, E_HAND, mask, torch.zeros(1, 2, 1, dtype=torch.long), torch.ones(1, 2, 1),
                                noise=noise)
    assert out.tolist() == [[[0.5, 0.5], [2.0, 2.0]]]


def test_noise_from_seeds_deterministic_and_negative_is_zero():
    seeds = torch.tensor([[5, -1], [5, 7]])
    n = noise_from_seeds(seeds, 4, 2.0)
    assert n.shape == (2, 2, 4)
    assert torch.equal(n[0, 0], n[1, 0]) and not torch.equal(n[0, 0], n[1, 1])
    assert torch.equal(n[0, 1], torch.zeros(4))
    assert torch.equal(n[1, 1], torch.randn(4, generator=torch.Generator().manual_seed(7)) * 2.0)


def _record(tokens, mixed, cand, alpha):
    T = len(tokens)
    return ResponseRecord(torch.tensor(tokens), torch.zeros(T), torch.tensor(mixed), torch.tensor(cand),
                          torch.tensor(alpha))


@pytest.mark.parametrize("side", ["right", "left"])
def test_align_places_records_at_prompt_len_plus_t(side):
    prompts = [torch.tensor([10, 11, 12]), torch.tensor([20])]
    recs = [_record([5, 6], [True, False], [[5, 7], [6, 6]], [[0.6, 0.4], [1.0, 0.0]]),
            _record([8, 9, 1], [False, True, True], [[8, 8], [9, 3], [1, 2]], [[1, 0], [0.5, 0.5], [0.9, 0.1]])]
    a = align_records(prompts, recs, pad_id=0, padding_side=side)
    assert a.input_ids.shape == (2, 5)
    if side == "right":
        assert a.input_ids.tolist() == [[10, 11, 12, 5, 6], [20, 8, 9, 1, 0]]
        assert a.mixed_mask.tolist() == [[False, False, False, True, False], [False, False, True, True, False]]
        assert a.position_ids[1].tolist() == [0, 1, 2, 3, 3]
        assert a.cand_ids[1, 2].tolist() == [9, 3] and a.alpha[0, 3].tolist() == pytest.approx([0.6, 0.4])
    else:
        assert a.input_ids.tolist() == [[10, 11, 12, 5, 6], [0, 20, 8, 9, 1]]
        assert a.mixed_mask.tolist() == [[False, False, False, True, False], [False, False, False, True, True]]
        assert a.position_ids[1].tolist() == [0, 0, 1, 2, 3]
        assert a.cand_ids[1, 3].tolist() == [9, 3]
    assert a.response_mask.sum(1).tolist() == [2, 3]
    assert a.noise_seed is None


@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_bf16_mixture_is_the_same_compiled_in_the_engine_and_eager_in_the_trainer():
    """vLLM compiles the engine's forward (GPU presets: enforce_eager false); Inductor computes bf16 elementwise chains
    in fp32 and drops the roundings between fused ops. The mixture is therefore defined in fp32 with one rounding:
    the engine's arithmetic (embedding_patch: fp32 sum, noise added in fp32, one cast) compiled equals the trainer's
    eager rebuild bit for bit, noise rows included. Control: the former bf16 chain, compiled, differs from eager."""
    from ngrpo_ray.core.records import _mix_rows, mix_rows_fp32

    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(512, 4, 256, generator=g) * 0.05).bfloat16()
    alpha = torch.softmax(torch.randn(512, 4, generator=g), -1)
    noise = (torch.randn(512, 256, generator=g) * 0.01).bfloat16()

    def engine(rows, alpha, noise):
        return (mix_rows_fp32(rows, alpha) + noise.float()).to(torch.bfloat16)

    compiled = torch.compile(engine, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(rows, alpha, torch.zeros_like(noise)), _mix_rows(rows, alpha))
    one_hot = torch.zeros_like(alpha)
    one_hot[:, 0] = 1.0  # a noise step's record: (token, alpha 1), fed E[token] + noise; the trainer adds in bf16
    assert torch.equal(compiled(rows, one_hot, noise), rows[:, 0] + noise)

    def bf16_chain(rows, alpha):
        a = alpha.to(rows.dtype)
        out = a[:, 0:1] * rows[:, 0]
        for j in range(1, rows.shape[1]):
            out = out + a[:, j:j + 1] * rows[:, j]
        return out

    assert not torch.equal(torch.compile(bf16_chain, fullgraph=True, dynamic=False)(rows, alpha),
                           bf16_chain(rows, alpha))
