"""NeighborTables (the engine's tables, pure torch): valid rows only, fp32 for a bf16 matrix, rebuilt on every bind
(eagerly in full mode), and the valid-row arguments build_llm hands to ngrpo_install. No engine is built here."""

from __future__ import annotations

import pytest
import torch

from ngrpo_ray.core.neighbors import build_neighbor_table, valid_row_mask
from ngrpo_ray.engine.neighbor_tables import NeighborTables, default_mode


def _matrix(seed: int) -> torch.Tensor:
    return torch.randn(300, 16, generator=torch.Generator().manual_seed(seed)).bfloat16()


@pytest.mark.parametrize("mode", ["lazy", "full"])
def test_rows_are_the_fp32_valid_table_and_follow_every_bind(mode):
    valid = valid_row_mask(300, 280, exclude=[5])
    tables = NeighborTables(k_max=3, mode=mode)
    tables.bind(_matrix(0))
    tables.set_valid(valid)
    anchors = torch.tensor([0, 7, 5, 290, 7])
    expected = build_neighbor_table(_matrix(0).float(), 3, valid=valid)[anchors]  # the fp32 values of the bf16 E
    assert torch.equal(tables.rows("cosine", anchors), expected)
    assert tables.rows("cosine", anchors)[2].tolist() == [5, 5, 5]  # an invalid anchor: itself
    assert tables.stats()["neighbor_valid_rows"] == 279
    # A weight load: new E, same mask. Full mode rebuilds the metrics in use at bind, before any lookup.
    version = tables.version
    tables.bind(_matrix(1))
    assert tables.version == version + 1
    if mode == "full":
        assert set(tables._tables) == {"cosine"} and tables.build_seconds > 0
    assert torch.equal(tables.rows("cosine", anchors), build_neighbor_table(_matrix(1).float(), 3, valid=valid)[anchors])


def test_mask_shape_and_mode_are_checked():
    tables = NeighborTables(k_max=3, mode="lazy")
    tables.bind(_matrix(0))
    with pytest.raises(ValueError, match="300 rows"):
        tables.set_valid(torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="neighbor_mode"):
        NeighborTables(k_max=3, mode="eager")
    assert default_mode(torch.device("cpu")) == "lazy" and default_mode(torch.device("cuda", 0)) == "full"


def test_install_arguments_from_the_r1_tokenizer():
    from ngrpo_ray.engine.llm_factory import EngineSpec, neighbor_rows
    from ngrpo_ray.models.offline import r1_tokenizer

    tokenizer = r1_tokenizer()
    rows = neighbor_rows(EngineSpec(model="r1"), tokenizer)
    assert rows == {"neighbor_ids": 151_650, "never_neighbor_ids": [151_643]}  # ids 0..151649, minus EOS
    assert neighbor_rows(EngineSpec(model="r1", never_mix=("<eos>", "</think>")), tokenizer) == {
        "neighbor_ids": 151_650, "never_neighbor_ids": [151_643, 151_649]}
    with pytest.raises(ValueError, match="tokenizer"):
        neighbor_rows(EngineSpec(model="no-tokenizer-here"), None)
    assert neighbor_rows(EngineSpec(model="m", neighbor_ids=(0, 2, 3), never_mix=()), None) == {
        "neighbor_ids": [0, 2, 3], "never_neighbor_ids": []}


@pytest.mark.gpu
def test_a_full_build_on_cuda_peaks_at_the_planned_bytes_and_hands_them_back():
    """planning.engine_memory's "neighbor search (weight load)" term, measured: the R1 shape's full build peaks at most
    at the fp32 keys plus one 512-row score chunk (and small top-k buffers) above E and the table, and afterwards only
    E and the table stay reserved (the engine must not keep them through the trainer's update)."""
    from ngrpo_ray.engine.neighbor_tables import FULL_BUILD_CHUNK_ROWS

    V, d, k = 151_936, 1536, 4
    E = torch.randn(V, d, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).bfloat16()
    tables = NeighborTables(k_max=k, mode="full")
    tables.bind(E)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tables.rows("cosine", torch.tensor([0, 1], device="cuda"))
    tables.bind(E)  # a weight load: the metric in use is rebuilt at once
    torch.cuda.synchronize()
    table = V * k * 8
    planned = V * d * 4 + FULL_BUILD_CHUNK_ROWS * V * 4
    assert torch.cuda.max_memory_allocated() - base <= table + planned * 1.1 + (64 << 20)
    assert torch.cuda.memory_allocated() - base == table
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < (64 << 20)  # the search's blocks went back
