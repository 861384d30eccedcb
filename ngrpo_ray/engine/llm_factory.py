"""Building a vLLM ``LLM`` with the settings the mixing hook needs, and the SamplingParams it accepts.

Scripts that call ``build_llm`` need an ``if __name__ == "__main__":`` guard (vLLM spawns processes).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from ngrpo_ray.engine.refusals import MixingRefusal, check_engine_kwargs, check_sampling_params
from ngrpo_ray.engine.records_client import check
from ngrpo_ray.engine.request_options import EXTRA_ARGS_KEY, to_wire

EXTENSION_QUALNAME = "ngrpo_ray.engine.worker_extension.NgrpoWorkerExtension"
CPU_BLOCK_SIZE = 32  # CPU attention wants a multiple of 32


@dataclass(frozen=True)
class EngineSpec:
    """What differs between engines; everything else is fixed by the hook's needs."""

    model: str
    seed: int = 0
    max_model_len: int = 1024
    max_num_seqs: int = 64
    enforce_eager: bool = True
    kv_cache_gib: float | None = 1.0  # CPU: KV cache bytes (VLLM_CPU_KVCACHE_SPACE equivalent)
    gpu_memory_utilization: float | None = None  # GPU: fraction; CPU: None (use kv_cache_gib)
    num_gpu_blocks_override: int | None = None  # tests force preemption with a tiny cache
    max_num_batched_tokens: int | None = None
    table_capacity: int = 1 << 16  # ring slots allocated in the embedding (mixed steps alive per generate call)
    k_max: int = 3  # record width the ring holds: the largest mixing.k or top_k served (each column costs a gather per token)
    neighbor_mode: str | None = None  # "full": whole table per weight load; "lazy": rows on first use; None:
    # "full" on CUDA, "lazy" on CPU (a 152k table takes ~15 min on a 2-core CPU, 1.7 s on an H200)
    # Neighbor tables cover the tokenizer's ids (None: read from the model folder's tokenizer; else a count n for ids
    # 0..n-1, or the ids) minus never_mix (token names as in mixing.never_mix, "<eos>" = the tokenizer's EOS).
    neighbor_ids: int | tuple[int, ...] | None = None
    never_mix: tuple[str, ...] = ("<eos>",)
    neighbor_metrics: tuple[str, ...] = ()  # tables built at install (then at every weight load), not at first use
    noise_table: bool = False  # allocate the [capacity, d] noise rows that the gaussian_noise (STHT) baseline needs
    hook_seed: int | None = None  # None -> seed
    enable_sleep_mode: bool = False  # colocated on GPU: free weights and KV cache during the trainer's update
    dtype: str = "float32"  # exactness needs fp32 on CPU ("auto" turns fp32 checkpoints into bf16 there)
    tensor_parallel_size: int = 1  # ranks one engine is split over (vocab-parallel mixing embedding); > 1 runs vLLM's
    # multiprocess executor, and on CPU each rank gets its own cores (cpu_thread_binding)
    # vLLM weight-transfer backend the trainer's weights arrive by (weight_sync.choose_sync_backend: ngrpo_gloo on
    # CPU, nccl / ipc on GPU); None: the engine never receives weights (evaluation, benchmarks of generation)
    weight_transfer_backend: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()  # more LLM kwargs, still checked by the refusals


def engine_kwargs(spec: EngineSpec, hooked: bool) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        model=spec.model, seed=spec.seed, max_model_len=spec.max_model_len, max_num_seqs=spec.max_num_seqs,
        enforce_eager=spec.enforce_eager, dtype=spec.dtype, generation_config="vllm",
    )
    if spec.tensor_parallel_size > 1:
        kw["tensor_parallel_size"] = spec.tensor_parallel_size
        kw["distributed_executor_backend"] = "mp"
    if _on_cpu():
        kw["block_size"] = CPU_BLOCK_SIZE
        if spec.kv_cache_gib is not None:
            kw["kv_cache_memory_bytes"] = int(spec.kv_cache_gib * (1 << 30))
    if spec.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = spec.gpu_memory_utilization
    if spec.num_gpu_blocks_override is not None:
        kw["num_gpu_blocks_override"] = spec.num_gpu_blocks_override
    if spec.enable_sleep_mode:
        kw["enable_sleep_mode"] = True
    if spec.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = spec.max_num_batched_tokens
    if spec.weight_transfer_backend is not None:
        kw["weight_transfer_config"] = {"backend": spec.weight_transfer_backend}
    kw.update(dict(spec.extra))
    if hooked:
        kw.update(
            worker_extension_cls=EXTENSION_QUALNAME,
            skip_tokenizer_init=True,  # the frontend never sees a tokenizer, so it never decodes a virtual id
            # GPU: overlap scheduling with the device (the hook's step path never waits for it); vllm-cpu forces it
            # off, so it stays off there.
            async_scheduling=not _on_cpu(),
            additional_config={"ngrpo": {"table_capacity": spec.table_capacity, "k_max": spec.k_max,
                                         "noise": spec.noise_table}},
        )
        check_engine_kwargs(kw)
    return kw


def cpu_thread_binding(ranks: int, cores: list[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``ranks`` CPU workers: this process's cores split into contiguous groups,
    one per rank ("0|1" for two ranks on two cores). vLLM's automatic binding wants one NUMA node per rank and refuses
    TP 2 on a single-node machine."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    if len(cores) < ranks:
        raise ValueError(f"tensor_parallel_size {ranks} needs at least {ranks} CPU cores, this process has "
                         f"{len(cores)}")
    per = len(cores) // ranks
    groups = [cores[r * per:(r + 1) * per] for r in range(ranks)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


@contextlib.contextmanager
def _env(name: str, value: str | None):
    """``name=value`` in the environment inside the block (nothing when value is None), restored after."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def load_tokenizer(model: str) -> Any | None:
    """The model folder's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError):
        return None


def neighbor_rows(spec: EngineSpec, tokenizer: Any | None) -> dict[str, Any]:
    """ngrpo_install's valid-row arguments (plain int / lists for collective_rpc): the tokenizer's ids as a count or
    a list, and the never-mix ids, which are never neighbors."""
    from ngrpo_ray.models.vocabulary import token_ids_of, tokenizer_ids

    if tokenizer is None and (spec.neighbor_ids is None or spec.never_mix):
        raise ValueError(f"the neighbor tables need the tokenizer of {spec.model!r} (its ids are the valid rows, "
                         f"never_mix={spec.never_mix!r} names tokens): the folder has none; pass "
                         f"EngineSpec.neighbor_ids and never_mix=() instead")
    ids = spec.neighbor_ids if spec.neighbor_ids is not None else tokenizer_ids(tokenizer)
    never = token_ids_of(tokenizer, list(spec.never_mix)) if spec.never_mix else ()
    return {"neighbor_ids": ids if isinstance(ids, int) else [int(i) for i in ids],
            "never_neighbor_ids": [int(i) for i in never]}


def build_llm(spec: EngineSpec, hooked: bool = True, tokenizer: Any | None = None, sole_engine: bool = False):
    """An ``LLM``; when hooked, the mixing hook is installed and checked before it is returned. ``tokenizer``: the
    model's, if the caller has it loaded already (else it is read from the model folder).

    ``sole_engine``: this process hosts this engine and no other (a Ray engine actor). On CPU with one rank, vLLM's
    engine core and its worker then run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, vLLM's uniprocess
    executor) instead of two spawned processes that each import vLLM again: an engine started in 3.3 s instead of
    19.4 s (tiny model, 2026-12-07, 2 cores). The hook, the worker extension and the weight transport are the same
    code in either layout. GPU engines keep vLLM's own layout (the engine core in its own process overlaps the
    scheduler with the device), and two in-process engines cannot share one process."""
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if spec.weight_transfer_backend == "ipc":
        # vLLM's ipc transfer hands raw CUDA IPC handles (tuples of torch types) to collective_rpc, whose msgpack
        # encoder pickles them only with this set; the engine core and workers it spawns inherit it. Its RPC stays
        # inside this host (the engine's own processes).
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM

    if hooked:  # before the engine starts: a missing tokenizer fails fast
        rows = neighbor_rows(spec, tokenizer if tokenizer is not None else load_tokenizer(spec.model))
    kwargs = engine_kwargs(spec, hooked)
    binding = None
    if spec.tensor_parallel_size > 1 and _on_cpu() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        binding = cpu_thread_binding(spec.tensor_parallel_size)  # a user's own binding wins
    in_process = sole_engine and spec.tensor_parallel_size == 1 and _on_cpu()
    # both read while the engine starts; not left for later engines
    with _env("VLLM_CPU_OMP_THREADS_BIND", binding), _env("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if in_process else None):
        llm = LLM(**kwargs)
    if hooked:
        seed = spec.seed if spec.hook_seed is None else spec.hook_seed
        check(llm.collective_rpc("ngrpo_install", kwargs={"seed": seed, "neighbor_mode": spec.neighbor_mode,
                                                          "neighbor_metrics": list(spec.neighbor_metrics), **rows}))
    return llm


def make_sampling_params(sampling: dict[str, Any], mixing: Any, stop_token_ids: list[int]) -> Any:
    """SamplingParams for a hooked engine: detokenize off, logprobs=0, mixing options in extra_args; refusals run."""
    from vllm import SamplingParams

    sampling = dict(sampling or {})
    if "n" in sampling and sampling["n"] != 1:
        raise MixingRefusal("sampling.n != 1 is refused: repeat the prompt instead (each response gets its own "
                            "request, group/sample indices stay explicit)")
    if sampling.get("stop"):  # vLLM's own check (stop needs detokenize) would fire first with a less useful message
        raise MixingRefusal(f"stop strings {sampling['stop']!r} are refused: they need detokenization, which drops "
                            f"virtual ids; stop with stop_token_ids instead")
    stops = sorted({int(x) for x in (*sampling.pop("stop_token_ids", ()), *stop_token_ids)})
    wire = to_wire(mixing, stops)
    extra_args = dict(sampling.pop("extra_args", None) or {})
    extra_args[EXTRA_ARGS_KEY] = wire
    sampling.setdefault("detokenize", False)
    sampling.setdefault("logprobs", 0)
    sp = SamplingParams(stop_token_ids=stops, extra_args=extra_args, **sampling)
    check_sampling_params(sp, mixing_on=wire["rho"] > 0)
    return sp
