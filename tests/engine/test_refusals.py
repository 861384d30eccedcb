"""Done-when 4: each refused setting raises its own clear error before any request runs; a batch that overflows a
deliberately tiny table raises."""

from __future__ import annotations

import pytest

from ngrpo_ray.core.mixing_params import MixingParams
from ngrpo_ray.engine.llm_factory import EngineSpec, engine_kwargs, make_sampling_params
from ngrpo_ray.engine.records_client import EngineHookError, check
from ngrpo_ray.engine.refusals import MixingRefusal
from ngrpo_ray.engine.rollout import generate_rollout

SAMPLING_REFUSALS = [
    ({"repetition_penalty": 1.05}, "repetition_penalty=1.05 is refused"),
    ({"presence_penalty": 0.5}, "presence_penalty=0.5 is refused"),
    ({"frequency_penalty": 0.5}, "frequency_penalty=0.5 is refused"),
    ({"stop": ["</answer>"]}, "stop strings"),
    ({"detokenize": True}, "detokenize=True is refused"),
    ({"bad_words": ["w5"]}, "bad_words"),
    ({"logit_bias": {5: 1.0}}, "logit_bias is refused"),
    ({"allowed_token_ids": [5, 6]}, "allowed_token_ids is refused"),
    ({"min_tokens": 3}, "min_tokens=3 is refused"),
    ({"seed": 3}, "per-request SamplingParams.seed is refused"),
    ({"logprobs": 5}, "logprobs=5 is refused"),
    ({"prompt_logprobs": 1}, "prompt_logprobs are refused"),
    ({"temperature": 0.0}, "temperature 0"),
    ({"n": 2}, "sampling.n != 1 is refused"),
]


@pytest.mark.parametrize("extra,message", SAMPLING_REFUSALS, ids=[m for _, m in SAMPLING_REFUSALS])
def test_each_sampling_refusal_has_its_own_error(extra, message):
    with pytest.raises(MixingRefusal, match=message.replace("[", r"\[").replace("(", r"\(")):
        make_sampling_params({"temperature": 1.0, "max_tokens": 4, **extra}, MixingParams(rho=0.1), [1])


def test_structured_output_is_refused():
    from vllm.sampling_params import StructuredOutputsParams

    with pytest.raises(MixingRefusal, match="structured output is refused"):
        make_sampling_params({"structured_outputs": StructuredOutputsParams(regex="a+")}, MixingParams(rho=0.1), [1])


def test_plain_settings_pass_and_carry_the_options():
    sp = make_sampling_params({"temperature": 0.7, "top_p": 0.9, "max_tokens": 4},
                              MixingParams(rho=0.2, k=2, stop_after_ids=(9,)), [1])
    wire = sp.extra_args["ngrpo"]
    assert (wire["rho"], wire["k"], wire["stop_after_ids"], wire["no_mix_anchor_ids"]) == (0.2, 2, [9], [1])
    assert sp.detokenize is False and sp.logprobs == 0 and sp.stop_token_ids == [1]


@pytest.mark.parametrize("mixing,message", [
    (MixingParams(strategy="soft_thinking", rho=1.0, top_k=None), r"mixing.top_k must be an integer <= 64 in the engine"),
    (MixingParams(strategy="gumbel_topk", rho=0.1, top_k=65), r"mixing.top_k must be an integer <= 64 in the engine"),
])
def test_what_the_engine_cannot_serve_is_refused(mixing, message):
    with pytest.raises(ValueError, match=message):
        make_sampling_params({"temperature": 1.0}, mixing, [1])


@pytest.mark.parametrize("mixing,width", [
    (MixingParams(strategy="gumbel_topk", rho=0.1, top_k=5), 5),
    (MixingParams(strategy="latent_gumbel", rho=1.0, top_k=10, noise_clamp=(-1.0, 2.0), one_sided=False), 10),
    (MixingParams(strategy="soft_thinking", rho=1.0, top_k=10), 10),
    (MixingParams(alpha_source="filtered_probs", emit="sampled", k=2), 2),
])
def test_every_strategy_travels_to_the_engine(mixing, width):
    wire = make_sampling_params({"temperature": 1.0}, mixing, [1]).extra_args["ngrpo"]
    assert (wire["strategy"], wire["width"], wire["alpha_source"], wire["emit"]) == (
        mixing.strategy, width, mixing.alpha_source, mixing.emit)
    assert wire["noise_clamp"] == list(mixing.noise_clamp) and wire["one_sided"] == mixing.one_sided


ENGINE_REFUSALS = [
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}, "speculative decoding is refused"),
    ({"pipeline_parallel_size": 2}, "pipeline_parallel_size > 1 is refused"),
    ({"structured_outputs_config": {"backend": "xgrammar"}}, "structured output is refused"),
    ({"generation_config": "auto"}, "generation_config='auto' is refused"),
]


@pytest.mark.parametrize("extra,message", ENGINE_REFUSALS, ids=[m for _, m in ENGINE_REFUSALS])
def test_each_engine_refusal_has_its_own_error(extra, message):
    spec = EngineSpec(model="unused", extra=tuple(extra.items()))
    with pytest.raises(MixingRefusal, match=message):
        engine_kwargs(spec, hooked=True)


def test_v2_model_runner_is_refused(monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(MixingRefusal, match="V2 model runner is refused"):
        engine_kwargs(EngineSpec(model="unused"), hooked=True)


def test_vanilla_engine_kwargs_have_none_of_the_hook_settings():
    kw = engine_kwargs(EngineSpec(model="m"), hooked=False)
    assert not {"worker_extension_cls", "skip_tokenizer_init", "additional_config"} & set(kw)


@pytest.mark.engine
def test_overflowing_a_tiny_table_raises(qwen2_engine):
    prompts = [[(5 * i + j) % 300 + 2 for j in range(3)] for i in range(4)]
    check(qwen2_engine.collective_rpc("ngrpo_set_slots", args=(2,)))  # 4 rows mix per step: 2 slots collide before they are fed
    try:
        with pytest.raises(EngineHookError, match="mixing table overflow"):
            generate_rollout(qwen2_engine, prompts, {"temperature": 1.0, "max_tokens": 12, "ignore_eos": True},
                             MixingParams(rho=1.0, k=3))
        stats = check(qwen2_engine.collective_rpc("ngrpo_stats"))
        assert stats["stale"] > 0  # the engine also counted the overwritten slots it was fed (eager mode)
    finally:
        check(qwen2_engine.collective_rpc("ngrpo_set_slots", args=(1 << 16,)))
        check(qwen2_engine.collective_rpc("ngrpo_reset_table"))
    # the same batch fits the full table
    batch = generate_rollout(qwen2_engine, prompts, {"temperature": 1.0, "max_tokens": 12, "ignore_eos": True},
                             MixingParams(rho=1.0, k=3))
    assert batch.num_mixed == 48
