"""The engine's neighbor tables cover valid rows only (issue 11): on a random Qwen2 with the R1 vocabulary (151,936
embedding rows; the tokenizer AutoTokenizer loads from the folder has 151,651 ids, the R1 ones plus the
<|endoftext|> its Qwen2 class adds; EOS never mixes), every recorded candidate is a tokenizer id other than EOS, and
every table row the engine used equals a brute-force fp32 cosine top-k over the valid rows.

The checkpoint is shaped so that the mask matters: 64 "hot" rows are scaled up (the argmax lands on them), every
padding row is a near-copy of a hot row's direction and EOS is an exact one, so without the mask the used rows would
hold padding ids and EOS."""

from __future__ import annotations

import pytest
import torch

from ngrpo_ray.core.mixing_params import MixingParams
from ngrpo_ray.engine.records_client import check
from ngrpo_ray.engine.rollout import generate_rollout
from ngrpo_ray.models.offline import r1_tokenizer

from conftest import KV_GIB
from tiny_models import write_tiny_model

ROWS, EOS = 151_936, 151_643  # embedding rows, the R1 EOS
HOT = torch.arange(64) * 2_311 + 1_000  # valid, spread over the vocabulary
EMBED = "model.embed_tokens.weight"  # tied: also the LM head


def _shape_checkpoint(path, ids: int) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    state = load_file(str(file))
    E = state[EMBED]
    g = torch.Generator().manual_seed(0)
    pad = torch.arange(ids, ROWS)
    noise = 1 + 0.01 * torch.randn(len(pad), E.shape[1], generator=g)
    E[pad] = E[HOT[torch.arange(len(pad)) % len(HOT)]] * noise  # cosine ~0.9999 with a hot row
    E[EOS] = E[HOT[0]] * 0.5  # cosine 1 with HOT[0], half its logit
    E[HOT] *= 4.0  # logits of hot rows ~4x larger: the argmax lands on them
    save_file(state, str(file), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def r1_engine(tmp_path_factory):
    from safetensors.torch import load_file

    from ngrpo_ray.engine.llm_factory import EngineSpec, build_llm, load_tokenizer
    from ngrpo_ray.models.vocabulary import tokenizer_ids

    path = write_tiny_model(tmp_path_factory.mktemp("r1") / "qwen2", "qwen2", seed=3, tokenizer=r1_tokenizer(),
                            vocab_size=ROWS, eos_id=EOS)
    tokenizer = load_tokenizer(str(path))  # what build_llm reads too
    ids = tokenizer_ids(tokenizer)
    assert ids == 151_651 and tokenizer.eos_token_id == EOS, (ids, tokenizer.eos_token_id)
    _shape_checkpoint(path, ids)
    E = load_file(str(path / "model.safetensors"))[EMBED]
    llm = build_llm(EngineSpec(model=str(path), seed=0, max_model_len=128, max_num_seqs=16, kv_cache_gib=KV_GIB))
    yield llm, E, ids
    llm.llm_engine.engine_core.shutdown()


def brute_force_rows(E: torch.Tensor, anchors: torch.Tensor, valid: torch.Tensor | None, k: int = 3) -> torch.Tensor:
    """fp32 cosine top-(k-1) of each anchor over the valid rows, ties by lower id, the anchor itself first."""
    En = E.float() / E.float().norm(dim=1, keepdim=True)
    s = En[anchors] @ En.T
    if valid is not None:
        s[:, ~valid] = float("-inf")
    s[torch.arange(len(anchors)), anchors] = float("-inf")
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, : k - 1]
    return torch.cat([anchors.unsqueeze(1), order], dim=1)


@pytest.mark.engine
def test_candidates_are_valid_rows_and_rows_equal_brute_force(r1_engine):
    llm, E, ids = r1_engine
    valid = torch.arange(ROWS) < ids
    valid[EOS] = False
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 150_000, (4 + i % 5,), generator=g).tolist() for i in range(16)]
    batch = generate_rollout(llm, prompts, {"temperature": 1.0, "max_tokens": 16, "ignore_eos": True},
                             MixingParams(rho=0.9, k=3, never_mix_ids=(EOS,)))
    cand = torch.cat([c[m] for c, m in zip(batch.cand_ids, batch.mixed_mask)])
    assert len(cand) > 150, len(cand)  # ~0.9 of 256 steps mixed
    assert bool(valid[cand].all()), sorted(set(cand[~valid[cand]].tolist()))  # no padding id, no EOS
    anchors = cand[:, 0].unique()
    expected = dict(zip(anchors.tolist(), brute_force_rows(E, anchors, valid).tolist()))
    assert all(row == expected[row[0]] for row in cand.tolist())
    # The mask mattered: over the tokenizer's ids alone or over all rows, these rows would differ.
    unmasked = brute_force_rows(E, anchors, None)
    assert (unmasked[:, 1:] >= ids).any(dim=1).float().mean() > 0.5

    # The engine's own rows for every hot anchor (and HOT[0], whose nearest row is EOS): brute force again.
    reply = check(llm.collective_rpc("ngrpo_neighbor_rows", args=(HOT.tolist(),)))
    assert (reply["neighbor_valid_rows"], reply["neighbor_rows"], reply["neighbor_mode"]) == (ids - 1, ROWS, "lazy")
    assert reply["rows"] == brute_force_rows(E, HOT, valid).tolist()
    assert brute_force_rows(E, HOT[:1], torch.arange(ROWS) < ids)[0, 1] == EOS  # never-mix exclusion mattered
