"""What the mixing hook cannot honour, refused with a specific error before any request runs.

Each refusal has its own exception message naming the setting and why (the virtual token ids of mixed steps break it).
"""

from __future__ import annotations

import os
from typing import Any


class MixingRefusal(ValueError):
    """A setting the neighbor-mixing engine cannot honour."""


def check_engine_kwargs(kwargs: dict[str, Any]) -> None:
    """Engine-level settings given to ``LLM(...)`` by llm_factory (driver side, before the engine starts)."""
    if kwargs.get("speculative_config"):
        raise MixingRefusal("speculative decoding is refused: draft/verify paths drop or misread the virtual ids of "
                            "mixed steps (unset speculative_config)")
    if int(kwargs.get("pipeline_parallel_size", 1) or 1) > 1:
        raise MixingRefusal("pipeline_parallel_size > 1 is refused: sampling and embedding would run on different "
                            "ranks, so the mixture table written at sampling is not where the embedding reads it")
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("", "0"):
        raise MixingRefusal("the V2 model runner is refused (VLLM_USE_V2_MODEL_RUNNER=1): its post-update kernel "
                            "writes bin_counts[req, token_id] for virtual ids out of bounds; set it to 0")
    if kwargs.get("structured_outputs_config"):
        raise MixingRefusal("structured output is refused: grammar masks read emitted ids, virtual ids break them")
    gen = kwargs.get("generation_config", "vllm")
    if gen != "vllm":
        raise MixingRefusal(f"generation_config={gen!r} is refused: the model's generation_config.json may set "
                            f"penalties (Qwen2.5: repetition_penalty 1.05); use generation_config='vllm'")


def check_sampling_params(sp: Any, mixing_on: bool) -> None:
    """A ``vllm.SamplingParams`` about to be submitted to a hooked engine."""
    if sp.repetition_penalty != 1.0:
        raise MixingRefusal(f"repetition_penalty={sp.repetition_penalty} is refused: penalties index a vocabulary "
                            f"count table with emitted ids and virtual ids are out of range")
    if sp.presence_penalty != 0.0:
        raise MixingRefusal(f"presence_penalty={sp.presence_penalty} is refused: penalties index a vocabulary count "
                            f"table with emitted ids and virtual ids are out of range")
    if sp.frequency_penalty != 0.0:
        raise MixingRefusal(f"frequency_penalty={sp.frequency_penalty} is refused: penalties index a vocabulary "
                            f"count table with emitted ids and virtual ids are out of range")
    if sp.stop:
        raise MixingRefusal(f"stop strings {sp.stop!r} are refused: they need detokenization, which drops virtual "
                            f"ids; stop with stop_token_ids instead")
    if sp.detokenize:
        raise MixingRefusal("detokenize=True is refused: the tokenizer drops virtual ids; anchors are decoded in "
                            "the driver")
    if getattr(sp, "structured_outputs", None) is not None:
        raise MixingRefusal("structured output is refused: grammar masks read emitted ids, virtual ids break them")
    if sp.bad_words:
        raise MixingRefusal(f"bad_words={sp.bad_words!r} are refused: bad-word matching reads emitted ids and "
                            f"misreads virtual ids")
    if sp.logit_bias:
        raise MixingRefusal("logit_bias is refused: it changes the distribution, so the recorded logprobs would not "
                            "match what the trainer recomputes")
    if sp.allowed_token_ids:
        raise MixingRefusal("allowed_token_ids is refused: it changes the distribution, so the recorded logprobs "
                            "would not match what the trainer recomputes")
    if sp.min_tokens:
        raise MixingRefusal(f"min_tokens={sp.min_tokens} is refused: it masks stop tokens, so the recorded logprobs "
                            f"would not match what the trainer recomputes")
    if sp.seed is not None:
        raise MixingRefusal("a per-request SamplingParams.seed is refused: it can kill the CPU engine when a chunked "
                            "prefill sample is discarded; use the engine seed and mixing.seed")
    if sp.prompt_logprobs is not None:
        raise MixingRefusal("prompt_logprobs are refused: not needed by the trainer and not covered by the hook")
    if sp.logprobs not in (0,):
        raise MixingRefusal(f"logprobs={sp.logprobs} is refused: the hook reports exactly the emitted token's "
                            f"logprob (logprobs=0)")
    if mixing_on and sp.temperature < 1e-5:
        raise MixingRefusal("temperature 0 (greedy) with mixing is refused: the recorded logprob "
                            "log_softmax(logits / temperature) is undefined")


def check_worker_setup(model_runner: Any, vllm_config: Any) -> None:
    """Inside the worker at install: the runner and parallel layout the hook was written for."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    module = type(model_runner).__module__
    if not isinstance(model_runner, GPUModelRunner) or module not in (
        "vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.cpu_model_runner"):
        raise MixingRefusal(f"model runner {type(model_runner).__module__}.{type(model_runner).__name__} is refused: "
                            f"the hook needs the V1 runner (set VLLM_USE_V2_MODEL_RUNNER=0)")
    pc = vllm_config.parallel_config
    if pc.pipeline_parallel_size > 1:
        raise MixingRefusal("pipeline_parallel_size > 1 is refused (sampling and embedding on different ranks)")
    if vllm_config.speculative_config is not None:
        raise MixingRefusal("speculative decoding is refused (it drops or misreads virtual ids)")
    # Async scheduling is allowed: the hook's per-step path reads no tensor value (gates come from the host-side
    # stream, stop markers are detected on device), and it edits the sampled ids in place before vLLM copies them.
