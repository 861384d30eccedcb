"""The paper's figure 1: Gaussian noise vs Semantic Neighbor Mixing, measured on any model's input embeddings.

For each chosen token v, two perturbed inputs:
- noise: E[v] + N(0, noise_std^2 I) (STHT-style isotropic noise), and
- neighbor mix: sum_j alpha_j E[c_j] over C = [v] + its k-1 cosine nearest rows of E, alpha = softmax(logits_C / tau)
  (paper eq. 7-11), with the anchor holding the largest logit as it does in rollouts (the anchor is the argmax).
Each is mapped back to its nearest vocabulary row by cosine; "kept" is the fraction still nearest to v. A 2-D PCA
picture draws a line from every original embedding to its two perturbed points.

Pure torch + matplotlib. `python -m ngrpo_ray.evaluation.diagnostics --model PATH` runs it on a model's E.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ngrpo_ray.core.neighbors import LazyNeighborTable


@dataclass
class DriftResult:
    token_ids: torch.Tensor  # [m] the originals (anchors)
    cand_ids: torch.Tensor  # [m, k] anchor then its k-1 cosine neighbors
    alpha: torch.Tensor  # [m, k] mixing weights
    noise_points: torch.Tensor  # [m, d]
    mix_points: torch.Tensor  # [m, d]
    noise_nearest: torch.Tensor  # [m] nearest vocabulary row (cosine) of each noised embedding
    mix_nearest: torch.Tensor  # [m]
    noise_kept: float  # fraction with noise_nearest == token
    mix_kept: float

    def summary(self) -> dict[str, float]:
        return {"tokens": int(self.token_ids.numel()), "noise_kept": self.noise_kept, "mix_kept": self.mix_kept,
                "alpha_anchor_mean": float(self.alpha[:, 0].mean())}


def nearest_tokens(E: torch.Tensor, points: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """[m, d] -> [m] index of the row of E with the largest cosine (ties: lowest id, as argmax gives)."""
    En = torch.nn.functional.normalize(E.float(), dim=-1)
    out = []
    for start in range(0, points.shape[0], chunk):
        p = torch.nn.functional.normalize(points[start:start + chunk].float(), dim=-1)
        out.append((p @ En.T).argmax(dim=-1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def candidate_logits(m: int, k: int, logit_std: float, generator: torch.Generator) -> torch.Tensor:
    """Random [m, k] logits for the candidates, sorted descending so the anchor (column 0) holds the largest."""
    return (torch.randn(m, k, generator=generator) * logit_std).sort(dim=-1, descending=True).values


@torch.no_grad()
def noise_vs_neighbor_drift(E: torch.Tensor, token_ids: Sequence[int] | torch.Tensor, noise_std: float, k: int = 3,
                            logits: torch.Tensor | None = None, tau: float = 1.0, logit_std: float = 1.0,
                            seed: int = 0) -> DriftResult:
    """Perturb E[token_ids] by noise and by neighbor mixing; how often does the nearest token stay the original?

    `logits`: [m, V] next-token logits (alpha = softmax over the candidates' logits / tau, paper eq. 9) or [m, k]
    candidate logits directly; None draws `candidate_logits(m, k, logit_std)` (anchor largest).
    """
    E = E.detach().float()
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    m, (V, d) = ids.numel(), E.shape
    g = torch.Generator().manual_seed(seed)
    cand = LazyNeighborTable(E, k, "cosine").lookup(ids)
    if logits is None:
        cand_logits = candidate_logits(m, k, logit_std, g)
    elif logits.shape == (m, V):
        cand_logits = logits.float().gather(1, cand)
    elif logits.shape == (m, k):
        cand_logits = logits.float()
    else:
        raise ValueError(f"logits must be [m, V]=[{m}, {V}] or [m, k]=[{m}, {k}], got {tuple(logits.shape)}")
    alpha = torch.softmax(cand_logits / tau, dim=-1)
    mix_points = torch.einsum("mk,mkd->md", alpha, E[cand])
    noise_points = E[ids] + noise_std * torch.randn(m, d, generator=g)
    noise_nearest, mix_nearest = nearest_tokens(E, noise_points), nearest_tokens(E, mix_points)
    return DriftResult(ids, cand, alpha, noise_points, mix_points, noise_nearest, mix_nearest,
                       float((noise_nearest == ids).float().mean()), float((mix_nearest == ids).float().mean()))


def pca_2d(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic 2-D PCA by SVD: returns (mean [d], components [d, 2]); the sign makes each component's
    largest-magnitude loading positive so pictures do not flip between runs."""
    mean = X.mean(dim=0)
    _, _, Vh = torch.linalg.svd(X - mean, full_matrices=False)
    comps = Vh[:2].T.clone()
    signs = torch.sign(comps.gather(0, comps.abs().argmax(dim=0, keepdim=True)))
    return mean, comps * signs


def drift_plot(E: torch.Tensor, result: DriftResult, path: str | Path, title: str = "") -> Path:
    """Originals, their noised and neighbor-mixed points in the PCA plane of all three, lines from each original."""
    from ngrpo_ray.tracking.plots import plt, save_figure  # Agg backend, set there

    orig = E.detach().float()[result.token_ids]
    mean, comps = pca_2d(torch.cat([orig, result.noise_points, result.mix_points]))
    o, n, x = ((t - mean) @ comps for t in (orig, result.noise_points, result.mix_points))
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=110)
    for i in range(o.shape[0]):
        ax.plot([o[i, 0], n[i, 0]], [o[i, 1], n[i, 1]], color="tab:red", alpha=0.35, lw=0.8)
        ax.plot([o[i, 0], x[i, 0]], [o[i, 1], x[i, 1]], color="tab:blue", alpha=0.6, lw=0.8)
    ax.scatter(o[:, 0], o[:, 1], s=14, color="black", label="original E[v]", zorder=3)
    ax.scatter(n[:, 0], n[:, 1], s=10, color="tab:red", marker="x",
               label=f"Gaussian noise (nearest kept {100 * result.noise_kept:.0f}%)")
    ax.scatter(x[:, 0], x[:, 1], s=10, color="tab:blue", marker="^",
               label=f"neighbor mix (nearest kept {100 * result.mix_kept:.0f}%)")
    ax.set_title(title or "Gaussian noise vs neighbor mixing (PCA of the embeddings)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def load_input_embeddings(model_path: str, cache_dir: str = "~/.cache/ngrpo_ray/models") -> torch.Tensor:
    """E [V, d] (fp32, detached) of any HF causal LM folder or id; the demo model name resolves to its cache."""
    from transformers import AutoModelForCausalLM

    from ngrpo_ray.models.offline import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(model_path, cache_dir), dtype=torch.float32)
    return model.get_input_embeddings().weight.detach().clone()


def run_diagnostics(model_path: str, out_dir: str | Path, num_tokens: int = 256, noise_std: float = 0.05,
                    k: int = 3, tau: float = 1.0, logit_std: float = 1.0, seed: int = 0,
                    tracking_uri: str | None = None, experiment: str | None = None) -> dict[str, Any]:
    """Figure 1 for one model: `num_tokens` random vocabulary rows; writes drift.json and drift.png to out_dir and,
    when `experiment` is given, logs both (and the kept fractions as metrics) to its own MLflow run."""
    E = load_input_embeddings(model_path)
    ids = torch.randperm(E.shape[0], generator=torch.Generator().manual_seed(seed))[:num_tokens]
    result = noise_vs_neighbor_drift(E, ids, noise_std, k, tau=tau, logit_std=logit_std, seed=seed)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": model_path, "num_tokens": num_tokens, "noise_std": noise_std, "k": k, "tau": tau,
                "logit_std": logit_std, "seed": seed, "embedding_norm_mean": float(E.norm(dim=-1).mean())}
    report = {**settings, **result.summary()}
    (out / "drift.json").write_text(json.dumps(report, indent=2))
    png = drift_plot(E, result, out / "drift.png",
                     f"{Path(model_path).name}: noise std {noise_std:g} vs neighbor mix k={k}")
    report["paths"] = {"json": str(out / "drift.json"), "png": str(png)}
    if experiment:
        from ngrpo_ray.tracking.mlflow_run import MlflowRun, tracking_uri_for

        run = MlflowRun(tracking_uri_for(out, tracking_uri), experiment, run_name=f"diagnostics-{Path(model_path).name}",
                        artifact_root=out / "mlartifacts")
        run.set_tag("kind", "diagnostics")
        run.log_params(settings)
        run.log_metrics({"diagnostics/noise_kept": result.noise_kept, "diagnostics/mix_kept": result.mix_kept}, step=0)
        run.log_artifact(out / "drift.json", "diagnostics")
        run.log_artifact(png, "diagnostics")
        run.finish()
        report["mlflow"] = {"run_id": run.run_id, "tracking_uri": run.tracking_uri}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ngrpo_ray.evaluation.diagnostics",
                                description="Paper figure 1: Gaussian noise vs neighbor mixing on a model's embeddings.")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", default="runs/diagnostics")
    p.add_argument("--num-tokens", type=int, default=256)
    p.add_argument("--noise-std", type=float, default=0.05)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiment", default="ngrpo", help="MLflow experiment ('' to skip MLflow)")
    p.add_argument("--tracking-uri", default=None)
    a = p.parse_args(argv)
    print(json.dumps(run_diagnostics(a.model, a.out, a.num_tokens, a.noise_std, a.k, a.tau, a.logit_std, a.seed,
                                     a.tracking_uri, a.experiment or None), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
