"""Paper figure 1 diagnostic: Gaussian noise vs neighbor mixing, on small embeddings with numbers checked by hand."""

import json
import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from ngrpo_ray.evaluation.diagnostics import (drift_plot, load_input_embeddings, nearest_tokens,
                                              noise_vs_neighbor_drift, pca_2d, run_diagnostics)


@pytest.fixture
def E() -> torch.Tensor:
    return torch.randn(200, 16, generator=torch.Generator().manual_seed(0))


def test_no_noise_keeps_every_token_and_huge_noise_keeps_almost_none(E):
    ids = torch.arange(200)
    assert noise_vs_neighbor_drift(E, ids, noise_std=0.0).noise_kept == 1.0
    # noise 1e4 times the embedding scale: the nearest row is close to uniform over 200 rows (expected kept 1/200)
    assert noise_vs_neighbor_drift(E, ids, noise_std=1e4, seed=3).noise_kept <= 0.03


def test_alpha_on_the_anchor_keeps_every_token(E):
    ids = torch.arange(0, 200, 2)
    logits = torch.tensor([[50.0, 0.0, 0.0]]).repeat(ids.numel(), 1)
    r = noise_vs_neighbor_drift(E, ids, noise_std=1.0, k=3, logits=logits)
    assert r.mix_kept == 1.0
    assert torch.equal(r.mix_nearest, ids)
    assert torch.equal(r.cand_ids[:, 0], ids)  # the anchor is each candidate row's first entry


def test_hand_computed_crossing_and_full_vocab_logits():
    # e0=(1,0), e1=(.8,.6), e2=(0,1): token 0's cosine neighbor is 1. alpha [.4,.6] gives (0.88, 0.36), |.|=0.9508:
    # cos to e0 = 0.88/0.9508 = 0.9255, to e1 = (0.704+0.216)/0.9508 = 0.9676 -> nearest is 1: token 0 not kept.
    E = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    r = noise_vs_neighbor_drift(E, [0], noise_std=0.0, k=2, logits=torch.tensor([[0.0, math.log(1.5)]]))
    assert r.cand_ids.tolist() == [[0, 1]]
    assert torch.allclose(r.alpha, torch.tensor([[0.4, 0.6]]))
    assert torch.allclose(r.mix_points, torch.tensor([[0.88, 0.36]]))
    assert r.mix_nearest.tolist() == [1] and r.mix_kept == 0.0 and r.noise_kept == 1.0
    # [m, V] logits: alpha is the softmax of the candidates' entries (token 2's logit is ignored)
    full = torch.tensor([[0.0, math.log(1.5), 99.0]])
    assert torch.allclose(noise_vs_neighbor_drift(E, [0], 0.0, k=2, logits=full).alpha, torch.tensor([[0.4, 0.6]]))
    with pytest.raises(ValueError, match="logits must be"):
        noise_vs_neighbor_drift(E, [0], 0.0, k=2, logits=torch.zeros(1, 5))


def test_random_logits_give_the_anchor_the_largest_weight(E):
    r = noise_vs_neighbor_drift(E, torch.arange(50), noise_std=0.1, k=4, logit_std=2.0, seed=1)
    assert torch.equal(r.alpha.argmax(dim=-1), torch.zeros(50, dtype=torch.long))
    assert torch.allclose(r.alpha.sum(-1), torch.ones(50))
    assert 0.0 < r.summary()["alpha_anchor_mean"] < 1.0


def test_nearest_tokens_is_cosine_not_distance():
    E = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    assert nearest_tokens(E, torch.tensor([[0.1, 0.09], [0.1, 0.11]])).tolist() == [0, 1]


def test_pca_finds_the_line_and_the_plot_is_written(E, tmp_path):
    t = torch.linspace(-3, 3, 20).unsqueeze(1)
    X = t * torch.tensor([[0.0, 3.0, 4.0]]) / 5 + torch.tensor([1.0, 2.0, 3.0])
    mean, comps = pca_2d(X)
    assert torch.allclose(mean, torch.tensor([1.0, 2.0, 3.0]), atol=1e-5)
    assert torch.allclose(comps[:, 0], torch.tensor([0.0, 0.6, 0.8]), atol=1e-5)
    r = noise_vs_neighbor_drift(E, torch.arange(20), noise_std=0.5)
    png = drift_plot(E, r, tmp_path / "d.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_on_a_saved_model_logs_to_mlflow(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "tiny")
    E = load_input_embeddings(str(tmp_path / "tiny"))
    assert torch.equal(E, model.get_input_embeddings().weight.detach())
    report = run_diagnostics(str(tmp_path / "tiny"), tmp_path / "out", num_tokens=32, noise_std=0.0, k=3,
                             logit_std=0.0, experiment="diag-test")
    # noise 0 keeps everything; logit_std 0 -> alpha uniform over 3 candidates, a real mixture
    assert report["noise_kept"] == 1.0 and report["tokens"] == 32
    assert math.isclose(report["alpha_anchor_mean"], 1 / 3, rel_tol=1e-6)
    assert json.loads((tmp_path / "out" / "drift.json").read_text())["mix_kept"] == report["mix_kept"]
    client = MlflowClient(report["mlflow"]["tracking_uri"])
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.data.metrics["diagnostics/mix_kept"] == report["mix_kept"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "diagnostics")} == {
        "diagnostics/drift.json", "diagnostics/drift.png"}
