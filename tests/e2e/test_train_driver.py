"""End to end on a real local Ray cluster: vLLM engine + DeepSpeed trainer group + weight sync + MLflow + resume.

A tiny random Llama with the real SmolLM2 vocabulary stands in for a model (rewards are mostly 0; the plumbing,
metrics and resume are what is checked)."""

import json
from pathlib import Path

import pytest

from ngrpo_ray.config import load_config
from ngrpo_ray.planning import plan_memory, plan_params
from ngrpo_ray.training.dynamic_sampling import refill_prompts
from ngrpo_ray.training.prompt_order import PromptOrder
from tests.support.faults import inject_faults
from tests.support.runs import train_and_read
from tests.support.tiny_chat_model import write_tiny_chat_model

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.engine]

EVERY_STEP = ["reward/mean", "reward/std", "accuracy", "response_length/mean", "train/kl_mean", "train/clip_frac",
              "train/entropy_mean", "mixing/cosine_mean", "mixing/cosine_min", "mixing/cosine_frac_below_0.95", "mixing/mixed_token_fraction", "reward/mixed_responses", "reward/unmixed_responses",
              "time/generation_s", "time/reward_s", "time/train_s", "time/sync_s", "time/total_s", "sync/bytes",
              "policy_version", "grading/graded"]
DYNAMIC_SAMPLING = ["dynamic_sampling/groups_drawn", "dynamic_sampling/groups_kept", "dynamic_sampling/groups_dropped",
                    "dynamic_sampling/groups_padded", "dynamic_sampling/refill_rounds"]
MISMATCH = ["mismatch/abs_diff_mean", "mismatch/abs_diff_max", "mismatch/k3_kl", "mismatch/frac_abs_diff_over_0.1",
            "mismatch/seq_ratio_p50", "mismatch/seq_ratio_p90", "mismatch/seq_ratio_max", "mismatch/sequences_measured"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny_chat")


def _cfg(model: Path, out: Path, *extra: str):
    data = out.parent / "data.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(12)))
    return load_config("cpu_default", [
        f"model.path={model}", f"data.train={data}", f"data.validation={data}", "data.limit=6",
        "rollout.group_size=2", "rollout.max_new_tokens=6", "trainer.prompts_per_iteration=2",
        "trainer.mini_batches=1", "trainer.micro_batch_size=2", "trainer.validate_every=2", "eval.n=2",
        "eval.max_new_tokens=6", f"trainer.output_dir={out}", "mixing.rho=0.5", "cluster.num_cpus=4",
        "rollout.engine_cpus=1", "trainer.lr=1e-4", "algorithm.beta=0.01", "trainer.validate_before=false", *extra])


def _first_token_checks(rec, cfg, out: Path) -> None:
    """Latent-GRPO first-token selection ran in every iteration: a group without a correct response has every first
    step zeroed, so with 2 groups of 2 at most 4 first steps are zeroed."""
    groups, zeroed = rec.history("adv/groups_without_correct"), rec.history("adv/first_steps_zeroed")
    assert [s for s, _ in groups] == [s for s, _ in zeroed] == [1, 2, 3]
    B, G = cfg.trainer.prompts_per_iteration, cfg.rollout.group_size
    assert all(0 <= v <= B for _, v in groups) and all(0 <= v <= B * G for _, v in zeroed)
    for (_, acc), (_, without) in zip(rec.history("accuracy"), groups):
        assert without == B if acc == 0 else without < B  # the tiny random model is rarely right


def _dynamic_sampling_checks(rec, cfg, out: Path) -> None:
    """DAPO dynamic sampling: the counts add up, the refill prompts are the iteration's refill stream (a resumed
    iteration would draw the same ones)."""
    for key in DYNAMIC_SAMPLING:
        assert rec.steps(key) == [1, 2, 3], key
    value = lambda key: [v for _, v in rec.history(key)]  # noqa: E731
    B = cfg.trainer.prompts_per_iteration
    for it in range(3):
        drawn, kept, dropped, padded, rounds = (value(k)[it] for k in DYNAMIC_SAMPLING[:5])
        assert kept + padded == B and drawn == kept + dropped + padded
        assert rounds == (0 if kept == B else 1)  # one refill round allowed
        assert drawn == B if rounds == 0 else B < drawn <= 2 * B  # the refill draws the missing groups only
    audit = [json.loads(line) for line in (out / "dynamic_sampling.jsonl").read_text().splitlines()]
    assert len(audit) == 3
    order = PromptOrder(6, B, seed=cfg.trainer.seed)
    for it, entry in enumerate(audit):
        first = order.batch_at(it)
        assert [p.split("/")[-1] for p in entry["rounds"][0]] == [str(i) for i in first]
        if len(entry["rounds"]) > 1:  # the refill is the iteration's stream: a rerun draws the same problems
            refill = refill_prompts(6, first, cfg.trainer.seed, it, 0, len(entry["rounds"][1]))
            assert [p.split("/")[-1] for p in entry["rounds"][1]] == [str(i) for i in refill]


def _best_checkpoint_checks(rec, cfg, out: Path) -> None:
    """Validation every iteration, two rolling checkpoints, the HF export only at the end and for the best: the
    best checkpoint is the iteration with the highest val/<benchmark>/mean_at_n, in checkpoints/best/ whether or not
    its rolling folder was pruned. (Resuming from a checkpoint without an HF export: every resume sends the
    trainer's restored weights to the engines, see the resume test.)"""
    values = rec.history("val/data/mean_at_n")
    assert [s for s, _ in values] == [1, 2, 3] and values == rec.history("val/mean_at_n")
    best_step = max(values, key=lambda sv: (sv[1], -sv[0]))[0]  # the first of the highest (strictly better wins)
    root = out / "checkpoints"
    best = json.loads((root / "best" / "driver_state.json").read_text())
    assert (best["best_iteration"], best["iteration"]) == (best_step, best_step)
    assert best["best_value"] == max(v for _, v in values)
    assert (root / "best" / "source").read_text() == f"iter_{best_step:06d}"
    assert (root / "best" / "trainer" / "hf" / "config.json").exists()
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_000002", "iter_000003"]
    assert (root / "iter_000002" / "trainer" / "hf").exists() == (best_step == 2)  # not an export iteration
    header = (root / "best" / "trainer" / "hf" / "model.safetensors").read_bytes()[8:4096].decode(errors="ignore")
    assert '"dtype":"F32"' in header  # model.dtype float32 on this CPU; a bf16 run exports BF16
    assert rec.run.data.tags["best_iteration"] == str(best_step)


# Two runs, each carrying more capabilities (a driver run costs a minute or more of CI on 2 cores):
# grpo: the CPU default's old_logprobs: rollout (gap measured on the first mini-batch's pre-update forward),
# disaggregated, and the engine split over two tensor-parallel workers (both receive every sync; the gap below is the
# split engine's records against the trainer); with Latent-GRPO's first-token selection.
# gspo: the old-log-prob pass with sequence-level TIS (the weights travel through both trainer ranks), colocated on
# CPU, one engine rank; with dynamic sampling, and with validation every iteration and the best checkpoint kept apart
# from pruning.
@pytest.mark.parametrize("loss_type, layout, extra, more_checks", [
    # 5 logical CPUs: 2 engine bundles (one per TP rank) + 2 trainer bundles, and the reward scorer's 0.1
    ("grpo", "disaggregated", ("rollout.tensor_parallel_size=2", "cluster.num_cpus=5",
                               "algorithm.first_token_selection=true"), (_first_token_checks,)),
    ("gspo", "colocated", ("trainer.old_logprobs=recompute", "algorithm.rollout_correction=tis",
                           "algorithm.rollout_correction_level=sequence",
                           "algorithm.dynamic_sampling=true", "algorithm.max_resample_rounds=1",
                           "trainer.validate_every=1", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=2",
                           "trainer.hf_export_every=0", "trainer.best_metric=val/data/mean_at_n"),
     (_dynamic_sampling_checks, _best_checkpoint_checks)),
], ids=["grpo-disaggregated-tp2-first_token", "gspo-colocated-dynamic_sampling-best_checkpoint"])
def test_three_iterations_two_workers_log_everything(tiny_model, tmp_path, capsys, loss_type, layout, extra,
                                                     more_checks):
    out = tmp_path / loss_type
    cfg = _cfg(tiny_model, out, f"algorithm.loss_type={loss_type}", "trainer.num_workers=2",
               "trainer.iterations=3", "trainer.validate_every=3", f"cluster.placement={layout}",
               # colocated on 4 CPUs: 2 x (trainer 1 + engine 0.5) leaves room for the reward scorer (0.1)
               *(["rollout.engine_cpus=0.5"] if layout == "colocated" else []), *extra)
    rec = train_and_read(cfg)
    assert rec.run.info.status == "FINISHED"
    for key in EVERY_STEP + MISMATCH:
        assert rec.steps(key) == [1, 2, 3], key
    # fp32 engine (vLLM CPU) vs fp32 trainer (DeepSpeed) on the same tokens and mixtures: they agree
    gaps = [v for _, v in rec.history("mismatch/abs_diff_max")]
    with capsys.disabled():
        print(f"\nfp32 rollout-vs-trainer max |diff| per iteration ({loss_type}): {gaps}")
    assert all(0.0 <= g < 1e-4 for g in gaps), gaps
    assert all(v == 1.0 for _, v in rec.history("mismatch/sequences_measured"))  # one mini-batch: all measured
    assert all(abs(v - 1.0) < 1e-3 for _, v in rec.history("mismatch/seq_ratio_max"))
    if loss_type == "gspo":  # ratios ~1: nothing capped, weights ~1
        assert [v for _, v in rec.history("rollout_correction/capped_fraction")] == [0.0, 0.0, 0.0]
        assert all(abs(v - 1.0) < 1e-3 for _, v in rec.history("rollout_correction/weight_mean"))
        assert rec.run.data.params["algorithm.rollout_correction"] == "tis"
    else:
        assert rec.steps("rollout_correction/capped_fraction") == []
    captured = capsys.readouterr()
    assert " | gap " in captured.out + captured.err
    # the engine (both tensor-parallel workers of it, in the grpo run) shares the trainer's host: shared memory
    assert "weight sync open: ngrpo_gloo to 1 engine(s), bytes by shared_memory" in captured.out + captured.err
    assert rec.history("policy_version") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert rec.steps("val/mean_at_n") == ([1, 2, 3] if cfg.trainer.validate_every == 1 else [3])
    assert all(0.0 < v < 1.0 for _, v in rec.history("mixing/mixed_token_fraction"))  # rho 0.5, 24 tokens/iteration
    assert rec.run.data.params["algorithm.loss_type"] == loss_type
    assert {"resolved_config.yaml", "placement_plan.json"} <= rec.artifacts()
    plan = rec.json_artifact("placement_plan.json", tmp_path)
    assert rec.run.data.params["plan.layout"] == plan["placement"] == layout
    assert plan["gpus"] == 0 and plan["transports"] == ["gloo"]
    # colocated on CPU: the engine is a guest on the last trainer rank (1); disaggregated: its own bundle first, one
    # bundle for both of its tensor-parallel ranks
    assert plan["roles"] == ([["trainer 0"], ["trainer 1", "engine 0 tp 0"]] if layout == "colocated"
                             else [["engine 0 tp 0", "engine 0 tp 1"], ["trainer 0"], ["trainer 1"]])
    assert rec.run.data.params["rollout.tensor_parallel_size"] == ("2" if layout == "disaggregated" else "1")
    _memory_checks(rec, cfg, capsys)
    plots = rec.artifacts("plots")
    assert {"plots/reward.png", "plots/timing.png", "plots/mixing.png", "plots/validation.png"} <= plots
    assert (out / "checkpoints" / "iter_000003" / "trainer" / "hf" / "config.json").exists()
    for check in more_checks:
        check(rec, cfg, out)


def _memory_checks(rec, cfg, capsys) -> None:
    """The memory plan's figures as params (`ngrpo plan`'s numbers, its table as an artifact), the trainer ranks'
    measured peaks of the update and the sync every iteration (on CPU the resident high-water mark of the larger
    rank: a whole Python process with torch and DeepSpeed), and the size vLLM gave the engine's KV cache."""
    params = rec.run.data.params
    assert {k: v for k, v in params.items() if k.startswith("memory_plan.")} == plan_params(plan_memory(cfg))
    assert "memory_plan.txt" in rec.artifacts()
    peaks = {phase: [v for _, v in rec.history(f"memory/{phase}_peak_resident_gib")] for phase in ("update", "sync")}
    with capsys.disabled():
        print(f"\ntrainer peak resident GiB per iteration: {peaks}; engine KV cache tokens "
              f"{params['engine.kv_cache_tokens']}")
    assert all(len(v) == 3 and all(0.2 < x < 12 for x in v) for v in peaks.values()), peaks
    assert int(params["engine.kv_cache_tokens"]) > 0


def _prompts_seen(out: Path, cfg) -> list[dict]:
    """prompt_order.jsonl, each line checked against the prompts an uninterrupted run sees in that iteration."""
    seen = [json.loads(line) for line in (out / "prompt_order.jsonl").read_text().splitlines()]
    order = PromptOrder(6, 2, seed=cfg.trainer.seed)
    for s in seen:
        assert [p.split("/")[-1] for p in s["problems"]] == [f"{i}" for i in order.batch_at(s["iteration"] - 1)]
    return seen


def test_resume_continues_the_same_run_with_the_same_prompts(tiny_model, tmp_path, monkeypatch):
    """An asynchronous run (trainer.async_rollouts: iteration i+1's rollout is issued before iteration i's update),
    interrupted during an overlapped rollout and resumed: same MLflow run, same prompts, the in-flight rollout redone.
    Engine 0 is killed right after rollout 3 was issued (during update 2): the driver finds it before the weight
    sync, and rollout 3's chunk is re-issued with the version the fleet then serves (2: staleness 0). During update 4
    the driver gets SIGTERM (`ray job stop`) with rollout 5 in flight; the resumed run redoes iterations 4 and 5 on
    the same prompts (a checkpoint holds no rollout). The resume code (run folder, checkpoint, MLflow run) is the
    synchronous driver's too."""
    out = tmp_path / "resume"
    cfg = _cfg(tiny_model, out, "trainer.iterations=5", "trainer.validate_every=0", "trainer.async_rollouts=true",
               "tracking.plots=false")
    inject_faults(monkeypatch, engine_kills=[(3, 0, "rollout")], interrupts=[4])
    with pytest.raises(KeyboardInterrupt):
        train_and_read(cfg)
    assert [s["iteration"] for s in _prompts_seen(out, cfg)] == [1, 2, 3, 4, 5]  # 5 was issued before update 4
    run_id = json.loads((out / "checkpoints" / "iter_000003" / "driver_state.json").read_text())["mlflow_run_id"]
    second = train_and_read(cfg, resume=True)
    assert second.run_id == run_id and second.run.info.status == "FINISHED"
    assert second.steps("reward/mean") == [1, 2, 3, 4, 5]
    assert second.history("policy_version") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0)]
    # 1: issued and trained at 0; 2: drawn with 0 during update 1; 3: re-issued at 2 after the engine restart;
    # 4: resumed, issued at 3; 5: drawn with 3 during update 4
    assert second.history("staleness/mean") == [(1, 0.0), (2, 1.0), (3, 0.0), (4, 0.0), (5, 1.0)]
    assert [v for _, v in second.history("staleness/dropped_fraction")] == [0.0] * 5
    assert second.history("fault/engine_restarts")[:3] == [(1, 0.0), (2, 1.0), (3, 1.0)]
    restart, = second.json_artifact("restarts.json", tmp_path)  # the first session's: the second had none
    assert (restart["engine"], restart["phase"], restart["iteration"], restart["policy_version"]) == (
        0, "between_rollouts", 3, 2)
    assert [s["iteration"] for s in _prompts_seen(out, cfg)] == [1, 2, 3, 4, 5, 4, 5]  # 4 and 5 again, same prompts
    with pytest.raises(Exception, match="mixing.rho: checkpoint 0.5 != config 0.2"):
        train_and_read(_cfg(tiny_model, out, "trainer.iterations=5", "trainer.validate_every=0",
                            "trainer.async_rollouts=true", "tracking.plots=false", "mixing.rho=0.2"), resume=True)
