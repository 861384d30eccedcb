import random

import numpy as np
import pytest
import torch

from ngrpo_ray.config import flatten, load_config
from ngrpo_ray.training.run_state import (
    ResumeMismatch, RunState, check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint)


def test_checkpoint_round_trip_restores_rng_and_prunes(tmp_path):
    cfg = load_config("cpu_default")
    for it in (1, 2, 3):
        random.seed(it)
        np.random.seed(it)
        torch.manual_seed(it)
        state = RunState(iteration=it, policy_version=it, mlflow_run_id="abc", config=flatten(cfg),
                         history={"reward": [0.1] * it})
        save_checkpoint(tmp_path, state, write_trainer=lambda d: (d.mkdir(), (d / "w.bin").write_bytes(b"x")))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = latest_checkpoint(tmp_path)
    assert path.name == "iter_000003" and (path / "trainer" / "w.bin").read_bytes() == b"x"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*")) == ["iter_000002", "iter_000003"]
    random.seed(99)
    state = load_checkpoint(path)
    assert (state.iteration, state.policy_version, state.history["reward"]) == (3, 3, [0.1] * 3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_half_written_checkpoint_is_not_latest(tmp_path):
    cfg = load_config("cpu_default")
    save_checkpoint(tmp_path, RunState(1, 1, "r", flatten(cfg)))

    def crash(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, RunState(2, 2, "r", flatten(cfg)), write_trainer=crash)
    assert latest_checkpoint(tmp_path).name == "iter_000001"


def test_resume_refuses_a_different_config_and_names_keys():
    saved = flatten(load_config("cpu_default"))
    check_resumable(saved, load_config("cpu_default", ["trainer.iterations=50", "tracking.experiment=x"]))
    with pytest.raises(ResumeMismatch) as err:
        # an lr derived from the preset's, so the test does not depend on what the CPU default uses
        check_resumable(saved, load_config("cpu_default", ["mixing.rho=0.3", f"trainer.lr={2 * saved['trainer.lr']}"]))
    assert "mixing.rho: checkpoint 0.1 != config 0.3" in str(err.value)
    assert "trainer.lr" in str(err.value)
