"""`ngrpo eval`: sample n answers per problem on vLLM engines, grade them in killable workers, report the paper's metrics.

Per benchmark: Mean@n and unbiased Pass@k with 95% intervals (report.summarize). Written to the eval folder
(default `<trainer.output_dir>/eval`): `grades.jsonl` (one line per sample), `eval.json/.csv/.md` (with an "average"
row over benchmarks), `pass_at_k.png`; everything is logged to its own MLflow run in the configured experiment, in
the same store as training runs of that output folder. `recompute_from_grades` rebuilds the numbers from
`grades.jsonl` alone (plain Python), so a test can check the reported table against the saved grades.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ngrpo_ray.config import Config, flatten, to_yaml
from ngrpo_ray.evaluation.report import PASS_KS, summarize, write_reports

GRADES_FILE = "grades.jsonl"


def evaluate(cfg: Config, model_path: str | None = None, out_dir: str | Path | None = None,
             log: Callable[[str], Any] = print) -> dict:
    """Evaluate `model_path` (default cfg.model.path) on cfg.eval.benchmarks; returns summaries, paths, MLflow ids."""
    import ray
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from ngrpo_ray.data.prompt_set import build_prompt_set
    from ngrpo_ray.distributed import components
    from ngrpo_ray.distributed.ray_init import init_ray
    from ngrpo_ray.distributed.reward_scorer import RewardScorer
    from ngrpo_ray.distributed.rollout_fleet import RolloutFleet
    from ngrpo_ray.distributed.sample_and_score import sample_and_score
    from ngrpo_ray.models.offline import resolve_model, resolve_tokenizer
    from ngrpo_ray.tracking.mlflow_run import MlflowRun, tracking_uri_for

    e = cfg.eval
    if not e.benchmarks:
        raise ValueError("'eval.benchmarks' is empty: name at least one benchmark or data file")
    run_dir = Path(cfg.trainer.output_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve() if out_dir else run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model(model_path or cfg.model.path, cfg.model.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer(cfg.model.tokenizer, model, cfg.model.cache_dir))
    sets = [build_prompt_set(cfg, name, tokenizer) for name in e.benchmarks]  # cfg.data.limit slices each one
    longest = max(len(p) for s in sets for p in s.prompts)

    mlflow = MlflowRun(tracking_uri_for(run_dir, cfg.tracking.tracking_uri), cfg.tracking.experiment,
                       run_name=cfg.tracking.run_name or f"eval-{Path(model).name}",
                       artifact_root=run_dir / "mlartifacts")
    mlflow.set_tag("kind", "eval")
    mlflow.log_params({**flatten(cfg), "eval.model_path": model})
    (out / "resolved_config.yaml").write_text(to_yaml(cfg))

    started_ray = not ray.is_initialized()
    init_ray(cfg)
    fleet = scorer = None
    status = "FAILED"
    try:
        t0 = time.perf_counter()
        r = cfg.rollout
        fleet = RolloutFleet(components.engine_spec(cfg, model, longest), r.num_engines, num_cpus=r.engine_cpus,
                             num_gpus=r.engine_gpus if cfg.trainer.use_gpu else 0.0,
                             max_restarts=cfg.cluster.engine_max_restarts,
                             restart_timeout_s=cfg.cluster.engine_restart_timeout_s)  # no resync: version 0 is spec's
        scorer = RewardScorer.remote(e.grade_workers, e.grade_timeout_s, e.grading)
        log(f"eval: {len(fleet)} engine(s) started in {time.perf_counter() - t0:.0f}s; model {model}; "
            f"MLflow run {mlflow.run_id} at {mlflow.tracking_uri}")
        sampling = components.eval_sampling(cfg)
        mixing = components.mixing_params(cfg, tokenizer, enabled=e.mixing)
        summaries: dict[str, dict] = {}
        extras: dict[str, dict] = {}
        grades_path = out / GRADES_FILE
        grades_path.write_text("")
        bar = tqdm(sets, desc="benchmarks", unit="bench", dynamic_ncols=True)
        for position, ps in enumerate(bar):
            bar.set_postfix_str(f"{ps.name}: {len(ps.prompts)} problems x {e.n}")
            t_bench = time.perf_counter()
            scored = sample_and_score(fleet, scorer, ps.prompts, ps.golds, e.n, sampling, mixing, 0, ps.kind,
                                      purpose="evaluate", call=position)  # each benchmark its own gate streams
            correct = _checked_correct_matrix(scored, len(ps.prompts), e.n, ps.name)
            with grades_path.open("a") as f:
                for i in np.lexsort((scored.sample, scored.group)):  # problem-major, sample-minor order
                    f.write(json.dumps({
                        "benchmark": ps.name, "problem_id": ps.ids[scored.group[i]],
                        "problem_index": int(scored.group[i]), "sample": int(scored.sample[i]),
                        "correct": bool(scored.rewards[i] > 0.5), "reward": float(scored.rewards[i]),
                        "status": scored.status[i], "length": int(scored.length[i]),
                        "truncated": bool(scored.truncated[i]),
                    }) + "\n")
            summaries[ps.name] = summarize(correct, seed=0)
            extras[ps.name] = {
                "dropped_too_long": ps.dropped_too_long, "grading": dict(scored.grading),
                "truncated_fraction": float(scored.truncated.mean()),
                "response_length_mean": float(scored.length.mean()),
                "mixed_responses_fraction": float((scored.mixed_steps > 0).mean()),
                "seconds": time.perf_counter() - t_bench,
            }
            bar.write(f"{ps.name}: mean@{e.n} {summaries[ps.name]['mean@n']['value']:.3f} over {len(ps.prompts)} "
                      f"problems ({ps.dropped_too_long} over data.max_prompt_tokens dropped)")

        paths = write_reports(summaries, out, stem="eval")
        table = json.loads(paths["json"].read_text())
        paths["grades"] = grades_path
        paths["plot"] = pass_at_k_plot(table, out / "pass_at_k.png")
        mlflow.log_metrics(eval_metrics(table, extras), step=0)
        for path in (*paths.values(), out / "resolved_config.yaml"):
            mlflow.log_artifact(path, "eval")
        status = "FINISHED"
        return {"model": model, "summaries": table, "details": extras,
                "paths": {k: str(v) for k, v in paths.items()},
                "mlflow": {"run_id": mlflow.run_id, "tracking_uri": mlflow.tracking_uri,
                           "experiment": cfg.tracking.experiment}}
    finally:
        _close(fleet, scorer, log)
        mlflow.finish(status)
        if started_ray:
            ray.shutdown()


def _checked_correct_matrix(scored: Any, num_prompts: int, n: int, name: str) -> np.ndarray:
    """Every (problem, sample) cell graded exactly once: a missing sample must not read as a silent 'wrong'."""
    cells = set(zip(scored.group.tolist(), scored.sample.tolist()))
    if len(scored.rewards) != num_prompts * n or len(cells) != num_prompts * n:
        raise RuntimeError(f"{name}: expected {num_prompts} x {n} graded samples, got {len(scored.rewards)} "
                           f"({len(cells)} distinct)")
    return scored.correct_matrix(num_prompts, n)


def eval_metrics(table: dict[str, dict], extras: dict[str, dict] | None = None) -> dict[str, float]:
    """MLflow metrics: eval/<bench>/<metric> (value, ci_low, ci_high), '@' spelled '_at_' by MlflowRun."""
    out: dict[str, float] = {}
    for bench, summary in table.items():
        for key, cell in summary.items():
            if isinstance(cell, dict):
                out[f"eval/{bench}/{key}"] = cell["value"]
                for side in ("ci_low", "ci_high"):
                    if side in cell:
                        out[f"eval/{bench}/{key}_{side}"] = cell[side]
            else:
                out[f"eval/{bench}/{key}"] = float(cell)
    for bench, info in (extras or {}).items():
        out[f"eval/{bench}/dropped_too_long"] = float(info["dropped_too_long"])
        out[f"eval/{bench}/truncated_fraction"] = info["truncated_fraction"]
        out[f"eval/{bench}/response_length_mean"] = info["response_length_mean"]
        out[f"eval/{bench}/time_s"] = info["seconds"]
        for key, value in info["grading"].items():
            out[f"eval/{bench}/grading_{key}"] = float(value)
    return out


def pass_at_k_plot(table: dict[str, dict], path: Path) -> Path:
    """Pass@k against k, one line per benchmark (the average row too), with the 95% interval shaded."""
    from ngrpo_ray.tracking.plots import line_plot

    series, bands = {}, {}
    for bench, summary in table.items():
        ks = sorted(int(key.split("@")[1]) for key in summary if key.startswith("pass@"))
        series[bench] = [(k, summary[f"pass@{k}"]["value"]) for k in ks]
        cells = [(k, summary[f"pass@{k}"]) for k in ks if "ci_low" in summary[f"pass@{k}"]]
        bands[bench] = [(k, c["ci_low"], c["ci_high"]) for k, c in cells]
    return line_plot(path, "Pass@k (unbiased)", series, xlabel="k", ylabel="pass@k", bands=bands)


def _close(fleet: Any, scorer: Any, log: Callable[[str], Any]) -> None:
    import ray

    if fleet is not None:
        try:
            fleet.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down; report and go on
            log(f"warning: engine shutdown failed: {exc!r}")
    if scorer is not None:
        try:
            ray.get(scorer.close.remote(), timeout=30)
            ray.kill(scorer)
        except Exception as exc:  # noqa: BLE001
            log(f"warning: grading pool shutdown failed: {exc!r}")


def recompute_from_grades(jsonl_path: str | Path) -> dict[str, dict]:
    """Mean@n and unbiased Pass@k per benchmark from the saved per-sample grades, in plain Python.

    Independent of numpy and of core.metrics: exact rationals with math.comb, pass@k = 1 - C(n-c, k) / C(n, k),
    converted to float at the end (so the values are correctly rounded). Returns {bench: {"problems", "n",
    "mean@n", "pass@k"...}} with plain float values (no intervals: those are bootstrap estimates).
    """
    samples: dict[str, dict[str, dict[int, bool]]] = defaultdict(lambda: defaultdict(dict))
    for line in Path(jsonl_path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        per_problem = samples[row["benchmark"]][row["problem_id"]]
        if row["sample"] in per_problem:
            raise ValueError(f"duplicate grade: {row['benchmark']} {row['problem_id']} sample {row['sample']}")
        per_problem[row["sample"]] = bool(row["correct"])
    out: dict[str, dict] = {}
    for bench, problems in samples.items():
        sizes = {len(s) for s in problems.values()}
        if len(sizes) != 1:
            raise ValueError(f"{bench}: problems have different sample counts {sorted(sizes)}")
        n = sizes.pop()
        counts = [sum(s.values()) for s in problems.values()]
        P = len(counts)
        result: dict[str, Any] = {"problems": P, "n": n, "mean@n": float(Fraction(sum(counts), P * n))}
        for k in PASS_KS:
            if k > n:
                break
            total = sum(1 - Fraction(math.comb(n - c, k), math.comb(n, k)) for c in counts)
            result[f"pass@{k}"] = float(total / P)
        out[bench] = result
    return out
