"""`ngrpo compare`: GRPO vs N-GRPO vs STHT on the CPU demo task, over several seeds, in one table.

Each (method, seed) is a full training run of the preset (default `compare_cpu`: the demo, shortened) with the method's mixing settings
and the seed in `trainer.seed` / `rollout.seed` / `mixing.seed` (so each seed's responses also gate on their own
streams, core.gate_stream), all in one MLflow store. The initial policy is validated once, by
the first run (the shared "base" row). Each run's final validation (its per-sample grades, validation/step_<N>.npy)
is pooled over seeds per method: Mean@n and unbiased Pass@k with 95% bootstrap intervals that resample seeds as well
as problems (a run is the unit that varies most), and the paired difference of each method's Mean@n to GRPO's and to
the base model's on the same problems. Each finished run leaves a small record (its grades, wall
time, commit and config; compare_records) and a recorded run is reused when the workflow runs again, in
this checkout or another (so an interrupted comparison continues where it stopped, and the table can be rebuilt from
committed records).

Methods differ only in what the rollout feeds at the gated steps (same gate rate, same optimizer and schedule):
- grpo:   no mixing (plain sampling);
- n-grpo: Semantic Neighbor Mixing (the preset's rho and k);
- stht:   Gaussian noise on the sampled token's embedding (the preset's rho and mixing.noise_std).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ngrpo_ray.compare_records import RunRecord, code_version, read_record, write_record
from ngrpo_ray.config import Config, load_config
from ngrpo_ray.core.metrics import mean_at_n, pass_at_k
from ngrpo_ray.core.seed_bootstrap import draw_resamples, interval, resampled_mean_at_n, resampled_pass_at_k
from ngrpo_ray.evaluation.report import PASS_KS

METHODS: dict[str, tuple[str, ...]] = {
    "grpo": ("mixing.strategy=sample", "mixing.rho=0.0"),
    "n-grpo": ("mixing.strategy=neighbor_mix",),
    "stht": ("mixing.strategy=gaussian_noise",),
}
DEFAULT_SEEDS = (0, 1, 2, 3)
BASELINE = "grpo"


@dataclass(frozen=True)
class PlannedRun:
    method: str
    seed: int
    output_dir: Path
    overrides: tuple[str, ...]


def plan_runs(preset: str, overrides: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
              out: Path) -> list[PlannedRun]:
    """One run per (method, seed), the first one also validating the initial policy. Checks every config now."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    plan = []
    for i, (method, seed) in enumerate((m, s) for m in methods for s in seeds):
        folder = out / f"{method}_seed{seed}"
        run_overrides = (*overrides, *METHODS[method], f"trainer.seed={seed}", f"rollout.seed={seed}",
                         f"mixing.seed={seed}",
                         f"trainer.output_dir={folder}", f"tracking.tracking_uri={uri}",
                         "tracking.experiment=ngrpo-compare", f"tracking.run_name={method}_seed{seed}",
                         f"trainer.validate_before={'true' if i == 0 else 'false'}")
        cfg = load_config(preset, list(run_overrides))  # fail before any run starts
        if not cfg.data.validation:
            raise ValueError("the comparison needs data.validation (the held-out split it reports on)")
        run_overrides += (f"trainer.validate_every={cfg.trainer.iterations}",)  # the final validation is compared
        plan.append(PlannedRun(method, seed, folder, run_overrides))
    return plan


def _is_finished(run: PlannedRun, cfg: Config) -> bool:
    return (run.output_dir / "validation" / f"step_{cfg.trainer.iterations}.npy").exists() \
        and (run.output_dir / "summary.json").exists()


def run_comparison(preset: str = "compare_cpu", overrides: Sequence[str] = (), methods: Sequence[str] = tuple(METHODS),
                   seeds: Sequence[int] = DEFAULT_SEEDS, out: str | Path = "runs/compare",
                   records: str | Path | None = None, log: Callable = print) -> dict:
    """Train every planned run that has no record yet (records default to <out>/records), then build the table
    from the records alone."""
    import ray
    from tqdm import tqdm

    from ngrpo_ray.distributed.driver import train

    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    records = out / "records" if records is None else Path(records).expanduser().resolve()
    plan = plan_runs(preset, overrides, methods, seeds, out)
    started = time.perf_counter()
    log(f"ngrpo compare: {len(methods)} methods x {len(seeds)} seeds = {len(plan)} training runs of '{preset}'; "
        f"records in {records}")
    configs = [load_config(preset, list(run.overrides)) for run in plan]
    found = [read_record(records, r.method, r.seed, c, needs_base=r is plan[0]) for r, c in zip(plan, configs)]
    stale = [f"{r.method} seed {r.seed}: {why}" for r, (_, why) in zip(plan, found) if why]
    if stale:  # its run folder is as stale as its record: refuse rather than mix two configs in one table
        raise ValueError(f"records in {records} measured something else ({'; '.join(stale)}); "
                         "pass another --out and --records, or delete them")
    done: list[RunRecord] = []
    bar = tqdm(list(zip(plan, configs, found)), desc="runs", unit="run", dynamic_ncols=True)
    for run, cfg, (record, _) in bar:
        bar.set_postfix_str(f"{run.method} seed {run.seed}")
        if record is not None:
            bar.write(f"{run.method} seed {run.seed}: recorded earlier ({record.minutes} min at {record.commit}), reused")
            done.append(record)
            continue
        minutes = commit = None  # a run finished before its record was written: its code is not known
        if not _is_finished(run, cfg):
            commit = code_version()
            t0 = time.perf_counter()
            resume = (run.output_dir / "checkpoints" / "latest").exists()
            try:
                train(cfg, resume=resume, log=bar.write)
            finally:
                ray.shutdown()
            minutes = (time.perf_counter() - t0) / 60
            bar.write(f"{run.method} seed {run.seed}: {minutes:.1f} min")
        done.append(write_record(records, run.method, run.seed, cfg, run.output_dir, minutes, commit))
    table = comparison_table(done)
    text = format_comparison(table)
    (out / "compare_table.md").write_text(text + "\n")
    (out / "compare_table.json").write_text(json.dumps(table, indent=2))
    plot = pass_at_k_plot(table, out / "pass_at_k.png")
    _log_to_mlflow(out, [out / "compare_table.md", out / "compare_table.json", plot], table)
    minutes = (time.perf_counter() - started) / 60
    log("\n" + text)
    log(f"\ntable: {out / 'compare_table.md'}; plot: {plot}; this call took {minutes:.1f} minutes")
    return {"table": table, "minutes": minutes, "output_dir": str(out)}


def comparison_table(records: Sequence[RunRecord], n_resamples: int = 2000) -> dict:
    """Per method: its runs' final grades pooled along the sample axis ([problems, n * seeds]) for the point values,
    with 95% intervals that resample seeds as well as problems (core.seed_bootstrap); per seed: Mean@n; the paired
    Mean@n difference to the baseline method and to the base model over the same drawn problems. The base grades are
    the first record's (the run that validated the initial policy)."""
    base = records[0].base_grades
    if base is None:
        raise ValueError(f"the first run ({records[0].method} seed {records[0].seed}) holds no base validation")
    runs: dict[str, list[np.ndarray]] = {"base": [base]}
    per_seed: dict[str, dict[int, float]] = {"base": {}}
    for r in records:
        runs.setdefault(r.method, []).append(r.grades)
        per_seed.setdefault(r.method, {})[r.seed] = float(r.grades.mean())
    stacked = {m: np.stack(g).astype(bool) for m, g in runs.items()}  # [seeds, problems, n]
    pooled_n = {m: x.shape[0] * x.shape[2] for m, x in stacked.items()}
    k_max = min(pooled_n.values())  # Pass@k up to the smallest pool of any row, so rows compare
    res = draw_resamples({m: x.shape[0] for m, x in stacked.items()}, base.shape[0], n_resamples)
    means = {m: resampled_mean_at_n(x, m, res) for m, x in stacked.items()}
    pooled = {m: np.concatenate(list(x), axis=1) for m, x in stacked.items()}  # [problems, n * seeds]
    rows = {}
    for method, x in stacked.items():
        row = {"mean@n": _ci(interval(mean_at_n(pooled[method]), means[method]))}
        for k in (k for k in PASS_KS if k <= k_max):
            row[f"pass@{k}"] = _ci(interval(pass_at_k(pooled[method], k), resampled_pass_at_k(x, method, res, k)))
        row["seeds"] = per_seed[method]
        for ref, key in ((BASELINE, f"mean@n - {BASELINE}"), ("base", "mean@n - base")):
            if method not in ("base", ref) and ref in stacked:
                estimate = mean_at_n(pooled[method]) - mean_at_n(pooled[ref])
                row[key] = _ci(interval(estimate, means[method] - means[ref]))
        rows[method] = row
    timed = [r.minutes for r in records if r.minutes is not None]
    return {"problems": int(base.shape[0]), "n_per_run": int(stacked[records[0].method].shape[2]),
            "base_n": int(base.shape[1]), "pass_k_max": k_max, "n_resamples": n_resamples, "rows": rows,
            "runs": len(records), "run_minutes": round(sum(timed), 1) if len(timed) == len(records) else None,
            "commits": sorted({r.commit for r in records if r.commit}), "machines": sorted({r.machine for r in records})}


def _ci(c) -> dict:
    return {"value": c.estimate, "ci_low": c.low, "ci_high": c.high}


def _cell(c: dict | None, signed: bool = False) -> str:
    if c is None:
        return "-"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"{fmt.format(100 * c['value'])} [{fmt.format(100 * c['ci_low'])}, {fmt.format(100 * c['ci_high'])}]"


def format_comparison(t: dict) -> str:
    rows = t["rows"]
    pass_keys = [k for k in rows["base"] if k.startswith("pass@")]
    header = (["method", "Mean@n"] + [k.replace("pass", "Pass") for k in pass_keys]
              + ["Mean@n per seed", f"vs {BASELINE} (paired)", "vs base (paired)"])
    lines = [f"Held-out problems: {t['problems']}; base n = {t['base_n']}, each run n = {t['n_per_run']} "
             "(seeds pooled per method); values in %, 95% bootstrap intervals that resample seeds and problems", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows.items():
        seeds = ", ".join(f"{100 * v:.1f}" for _, v in sorted(r.get("seeds", {}).items())) or "-"
        cells = ([name, _cell(r["mean@n"])] + [_cell(r[k]) for k in pass_keys]
                 + [seeds, _cell(r.get(f"mean@n - {BASELINE}"), True), _cell(r.get("mean@n - base"), True)])
        lines.append("| " + " | ".join(cells) + " |")
    if "runs" in t:
        wall = "wall time not recorded for every run" if t["run_minutes"] is None else \
            f"{t['run_minutes']:.0f} minutes of training and validation in all"
        lines += ["", f"{t['runs']} runs, {wall}; code {', '.join(t['commits']) or 'unknown'}; "
                      f"machine {'; '.join(t['machines'])}"]
    return "\n".join(lines)


def pass_at_k_plot(t: dict, path: Path) -> Path:
    from ngrpo_ray.tracking.plots import line_plot

    series = {name: [(int(k.split("@")[1]), v["value"]) for k, v in r.items() if k.startswith("pass@")]
              for name, r in t["rows"].items()}
    return line_plot(path, "Pass@k on the held-out split", series, xlabel="k", ylabel="Pass@k")


def _log_to_mlflow(out: Path, files: Sequence[Path], table: dict) -> None:
    from ngrpo_ray.tracking.mlflow_run import MlflowRun

    run = MlflowRun(f"sqlite:///{(out / 'mlflow.db').resolve()}", "ngrpo-compare", run_name="comparison",
                    artifact_root=out / "mlartifacts")
    for name, row in table["rows"].items():
        metrics = {f"{name}/mean_at_n": row["mean@n"]["value"]}
        for key in (f"mean@n - {BASELINE}", "mean@n - base"):
            if key in row:
                metrics[f"{name}/{key.replace('mean@n - ', 'diff_vs_')}"] = row[key]["value"]
        run.log_metrics(metrics, step=0)
    for f in files:
        run.log_artifact(f, "comparison")
    run.finish("FINISHED")
