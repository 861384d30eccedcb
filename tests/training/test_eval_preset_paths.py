"""Eval presets that evaluate a trained checkpoint point at what the training preset's run really writes."""

from pathlib import Path

from ngrpo_ray.config import load_config
from ngrpo_ray.training.run_state import RunState, save_checkpoint

# eval preset -> the training preset whose best checkpoint it evaluates
TRAINED_BY = {"baseline_grpo_soft_thinking_eval_1p5b": "r1_distill_1p5b_grpo"}


def test_eval_preset_points_at_the_best_hf_export_the_training_run_writes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # presets use paths relative to where `ngrpo` runs
    for eval_preset, train_preset in TRAINED_BY.items():
        train_cfg = load_config(train_preset)
        assert train_cfg.data.validation and train_cfg.trainer.validate_every > 0  # so a best checkpoint exists

        def write_trainer(folder: Path) -> None:  # what TrainerGroup.save_checkpoint writes with an HF export
            (folder / "hf").mkdir(parents=True)
            (folder / "hf" / "config.json").write_text("{}")

        state = RunState(iteration=10, policy_version=10, mlflow_run_id="r", config={})
        save_checkpoint(train_cfg.trainer.output_dir, state, write_trainer, best=True)
        model = Path(load_config(eval_preset).model.path)
        assert (model / "config.json").is_file(), (eval_preset, model)
        assert not model.is_absolute()
