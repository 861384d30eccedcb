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


def test_best_checkpoint_is_kept_apart_from_pruning_and_replaced_by_a_better_one(tmp_path):
    from ngrpo_ray.training.run_state import best_checkpoint

    cfg = load_config("cpu_default")

    def writer(it):
        def write(folder):
            (folder / "hf").mkdir(parents=True)
            (folder / "hf" / "model.safetensors").write_text(f"weights of iteration {it}")
            (folder / "ds").mkdir()
        return write

    assert best_checkpoint(tmp_path) is None
    for it, best in ((1, False), (2, True), (3, False), (4, False), (5, True), (6, False)):
        save_checkpoint(tmp_path, RunState(it, it, "r", flatten(cfg), best_value=float(it), best_iteration=it),
                        writer(it), keep=2, best=best)
        if it == 4:  # iteration 2's rolling folder is pruned; the best stays
            assert sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*")) == ["iter_000003", "iter_000004"]
            best_path = best_checkpoint(tmp_path)
            assert (best_path / "trainer" / "hf" / "model.safetensors").read_text() == "weights of iteration 2"
            assert load_checkpoint(best_path, restore_rng=False).iteration == 2
            assert not (best_path / "trainer" / "ds").exists()  # the HF export only, no optimizer states
    best_path = best_checkpoint(tmp_path)
    assert (best_path / "trainer" / "hf" / "model.safetensors").read_text() == "weights of iteration 5"
    assert (best_path / "source").read_text() == "iter_000005"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best", "iter_000005", "iter_000006",
                                                                          "latest"]
