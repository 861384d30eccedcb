"""The metric keys the driver's validation logs, known from the config alone (checked at config time).

Each validation logs every metric twice: pooled as `val/<metric>` and per benchmark as `val/<benchmark>/<metric>`,
where the benchmark is data.validation's name (a file's stem for a local path) and the metrics are Mean@n, unbiased
Pass@k for k in 1, 2, 4, ... up to eval.n, and Mean@n's 95% interval bounds.
"""

from __future__ import annotations

import re
from pathlib import Path

PASS_KS = (1, 2, 4, 8, 16, 32)  # the same as ngrpo_ray.evaluation.report (tested)


def benchmark_label(source: str) -> str:
    """A data source's name in metric keys: the registry name, or a local file's stem (MLflow-safe)."""
    name = Path(source).stem if ("/" in source or Path(source).suffix) else source
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def validation_metrics(n: int) -> list[str]:
    return ["mean_at_n", *[f"pass_at_{k}" for k in PASS_KS if k <= n], "mean_at_n_ci_low", "mean_at_n_ci_high"]


def validation_keys(validation: str | None, n: int) -> list[str]:
    """Every key a validation of `validation` with n samples per problem logs ([] without a validation set)."""
    if not validation:
        return []
    metrics = validation_metrics(n)
    bench = benchmark_label(validation)
    return [f"val/{m}" for m in metrics] + [f"val/{bench}/{m}" for m in metrics]


def per_benchmark(pooled: dict[str, float], validation: str) -> dict[str, float]:
    """The `val/<benchmark>/<metric>` copies of pooled `val/<metric>` values."""
    bench = benchmark_label(validation)
    return {f"val/{bench}/{k[len('val/'):]}": v for k, v in pooled.items() if k.startswith("val/")}
