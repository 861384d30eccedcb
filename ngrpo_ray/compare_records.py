"""A comparison run's record: what the table needs from one finished (method, seed) run, small enough to commit.

Twelve runs take hours on a CPU machine, longer than one sitting; a record lets the comparison continue in another
checkout on another day (`ngrpo compare --records DIR`) and lets anyone rebuild the table from the committed grades.
A record keeps the run's whole config (minus its own paths and names) and is reused only when every key it shares
with the planned run's config has the same value: a changed preset, override or schedule runs again, while an option
added later (whose default keeps the old behaviour) does not void hours of runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ngrpo_ray.config import Config
from ngrpo_ray.config.load import flatten

# What differs between the runs of one comparison without changing what is measured.
RUN_OWN_KEYS = ("trainer.output_dir", "tracking.tracking_uri", "tracking.run_name", "tracking.experiment",
                "trainer.validate_before")


@dataclass(frozen=True)
class RunRecord:
    method: str
    seed: int
    config: dict  # flat, dotted keys, without RUN_OWN_KEYS
    grades: np.ndarray  # [problems, n] bool: the final validation's per-sample grades
    base_grades: np.ndarray | None  # [problems, base n]: the initial policy's, kept by the run that validated it
    minutes: float | None  # the run's wall time (None for a run recorded after the fact)
    commit: str | None
    machine: str


def measured_config(cfg: Config) -> dict:
    """The config as JSON would store it, without what only names or places the run."""
    flat = {k: v for k, v in flatten(cfg).items() if k not in RUN_OWN_KEYS}
    return json.loads(json.dumps(flat, default=str))


def config_differences(stored: dict, cfg: Config) -> list[str]:
    """Keys both configs have whose values differ."""
    now = measured_config(cfg)
    return sorted(k for k in stored.keys() & now.keys() if stored[k] != now[k])


def record_path(records: Path, method: str, seed: int) -> Path:
    return records / f"{method}_seed{seed}.json"


def read_record(records: Path, method: str, seed: int, cfg: Config,
                needs_base: bool) -> tuple[RunRecord | None, str]:
    """The stored record of this run if it measured this config (and kept the base grades when asked), else None
    and why not ("" when there is no record)."""
    path = record_path(records, method, seed)
    if not path.exists():
        return None, ""
    data = json.loads(path.read_text())
    changed = config_differences(data["config"], cfg)
    if changed:
        return None, f"recorded with other values of {', '.join(changed)}"
    if needs_base and data.get("base_grades") is None:
        return None, "recorded without the base validation this run must now provide"
    record = RunRecord(data["method"], data["seed"], data["config"], _decode(data["grades"]),
                       None if data.get("base_grades") is None else _decode(data["base_grades"]),
                       data.get("minutes"), data.get("commit"), data.get("machine", ""))
    return record, ""


def write_record(records: Path, method: str, seed: int, cfg: Config, run_dir: Path, minutes: float | None,
                 commit: str | None) -> RunRecord:
    """Record a finished run from its folder: the last validation's grades (and step 0's when it validated the base).
    `commit` is the code the run trained with (`code_version()` taken at its start; None when unknown)."""
    final = np.load(run_dir / "validation" / f"step_{cfg.trainer.iterations}.npy").astype(bool)
    base_file = run_dir / "validation" / "step_0.npy"
    base = np.load(base_file).astype(bool) if base_file.exists() else None
    record = RunRecord(method, seed, measured_config(cfg), final, base, minutes, commit, _machine())
    records.mkdir(parents=True, exist_ok=True)
    payload = {"method": method, "seed": seed, "minutes": None if minutes is None else round(minutes, 2),
               "commit": record.commit, "machine": record.machine,
               "recorded": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "grades": _encode(final), "base_grades": None if base is None else _encode(base),
               "config": record.config}
    record_path(records, method, seed).write_text(json.dumps(payload, indent=1) + "\n")
    return record


def _encode(grades: np.ndarray) -> list[str]:
    """One string of 0/1 per problem: readable in a diff, 64 problems x 4 samples in under 1 kB."""
    return ["".join("1" if g else "0" for g in row) for row in grades]


def _decode(rows: list[str]) -> np.ndarray:
    return np.array([[c == "1" for c in row] for row in rows], dtype=bool)


# The files a run's result depends on; records and docs committed during a long comparison are not among them.
CODE_PATHS = ("ngrpo_ray", "workflows", "pyproject.toml")


def code_version(root: Path = Path(__file__).resolve().parents[1]) -> str | None:
    """The checkout's commit, with "+changes" when the code (CODE_PATHS) differs from it; None outside git.
    Taken when a run starts: Ray's workers import the working tree then, so that is the code the run measured."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=root,
                              check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", *CODE_PATHS)
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if changed else "") if head else None


def _machine() -> str:
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPUs, {gib:.0f} GiB"
