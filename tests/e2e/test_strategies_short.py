"""Every exploration strategy the engine serves runs through the real stack on CPU, in ONE Ray session (issue 15):
one training iteration each of gumbel_topk, latent_gumbel and the released code's neighbor mixing (filtered-probability
alpha, sampled text token), and an evaluation with soft thinking (inference only). The options travel the way a run's
do: config section -> components.mixing_params -> the engine actor's per-request options; the rollout is scored,
trained on by the DeepSpeed worker and the weights are synced back.

The trainer rebuilds every mixed input from the records (sum alpha_i E[c_i]) and recomputes the engine's log-probs:
with fp32 on both sides the gap (mismatch/abs_diff_max) stays below 1e-4 for each strategy. A tiny random Llama with
the real SmolLM2 vocabulary stands in for a model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import ray

from ngrpo_ray.config import load_config
from ngrpo_ray.distributed import components
from ngrpo_ray.distributed.driver import iteration
from ngrpo_ray.distributed.session import Session
from ngrpo_ray.distributed.sample_and_score import sample_and_score
from tests.support.tiny_chat_model import write_tiny_chat_model

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.engine]

TRAINED = {  # mixing overrides per strategy, as a preset would set them
    "gumbel_topk": {"strategy": "gumbel_topk", "rho": 0.5, "top_k": 4, "gumbel_tau": 1.0},
    "latent_gumbel": {"strategy": "latent_gumbel", "rho": 1.0, "top_k": 4, "noise_clamp": [-1.5, 3.0]},
    "released_code": {"strategy": "neighbor_mix", "rho": 0.5, "k": 2, "alpha_source": "filtered_probs",
                      "emit": "sampled"},
}
EVALUATED = {"strategy": "soft_thinking", "rho": 1.0, "top_k": 4}


def _cfg(model: Path, out: Path):
    data = out.parent / "data.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(8)))
    # the engine is built for the widest record of the strategies below (top_k 4)
    return load_config("cpu_default", [
        f"model.path={model}", f"data.train={data}", "data.validation=null", "data.limit=4",
        "rollout.group_size=2", "rollout.max_new_tokens=6", "rollout.top_p=0.9", "rollout.top_k=50",
        "trainer.prompts_per_iteration=2", "trainer.mini_batches=1", "trainer.micro_batch_size=4",
        "trainer.iterations=3", "trainer.validate_every=0", "trainer.validate_before=false", "eval.n=2",
        "eval.max_new_tokens=6", f"trainer.output_dir={out}", "mixing.strategy=gumbel_topk", "mixing.top_k=4",
        "cluster.num_cpus=4", "rollout.engine_cpus=1", "trainer.lr=1e-4", "tracking.plots=false"])


def _with_mixing(cfg, overrides: dict):
    return dataclasses.replace(cfg, mixing=dataclasses.replace(cfg.mixing, **overrides))


def test_each_strategy_trains_or_evaluates_in_one_session(tmp_path_factory, capsys):
    model = write_tiny_chat_model(tmp_path_factory.mktemp("models") / "tiny_chat")
    out = tmp_path_factory.mktemp("runs") / "strategies"
    cfg = _cfg(model, out)
    session = Session(cfg, log=lambda *a: None)
    status = "FAILED"
    try:
        results = {}
        for it, (name, overrides) in enumerate(TRAINED.items()):
            session.mixing = components.mixing_params(_with_mixing(cfg, overrides), session.tokenizer)
            metrics = iteration(session, it)
            results[name] = (metrics["mixing/mixed_token_fraction"], metrics["mismatch/abs_diff_max"])
        ev = _with_mixing(cfg, EVALUATED)
        prompts, golds = session.train_set.prompts[:2], session.train_set.golds[:2]
        scored = sample_and_score(session.fleet, session.scorer, prompts, golds, ev.eval.n,
                                  components.eval_sampling(ev), components.mixing_params(ev, session.tokenizer),
                                  session.state.policy_version, session.train_set.kind, purpose="evaluate")
        status = "FINISHED"
    finally:
        session.close(status)
        ray.shutdown()
    with capsys.disabled():
        print(f"\n(mixed token fraction, rollout-vs-trainer max |logprob diff|) per strategy: {results}")
    for name, (fraction, gap) in results.items():
        assert fraction > 0.2, (name, fraction)  # rho 0.5 / 1 over 24 tokens: the strategy really mixed
        assert 0.0 <= gap < 1e-4, (name, gap)  # the trainer rebuilt the strategy's inputs exactly
    assert session.state.policy_version == len(TRAINED)
    assert scored.correct_matrix(2, ev.eval.n).shape == (2, ev.eval.n)
    assert float(scored.mixed_steps.sum()) >= 0.8 * float(scored.length.sum())  # soft thinking at every step
